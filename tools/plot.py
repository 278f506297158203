"""
Pictures of runs, of speed, and of what each concept reads.

    python plot.py out/tiny_mlm out/tiny_mlm_standard --out=curves.png   # runs' log.jsonl, overlaid
    python plot.py --bench=bench.json --out=speed.png                    # bench.py throughput against N
    python plot.py --concepts --ckpt=out/tiny_mlm/ckpt.pt --text="..." --out=concepts.html

Curves: validation loss (the NLL bound for diffusion runs), validation accuracy and the concepts'
effective rank against tokens seen, one line per run, labelled by its directory (or --labels).
Speed: training and encoding tokens/s against the sequence length N, log-log, one line per model
and stage. Concepts: the last encoder layer's concept-to-token attention, averaged over heads, as
a self-contained HTML page (a concepts x tokens heatmap and each concept's top tokens) and a short
summary on the terminal.

The command line is argparse rather than configurator.py: run directories are positional and
--concepts is a bare flag, neither of which configurator's config-file/--key=value grammar has.
"""
import argparse
import html
import json
import math
import os
import sys

import torch

# ----------------------------------------------------------------------------------------------
# training curves from log.jsonl


def read_run(run_dir):
    """The evaluation records of a run directory (or of a log.jsonl path), in order."""
    path = run_dir if run_dir.endswith('.jsonl') else os.path.join(run_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise SystemExit(f"{run_dir}: no log.jsonl there; give a training run's out_dir (e.g. out/tiny_mlm)")
    try:
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
        raise SystemExit(f"{path} is not one JSON object per line ({e})")
    if not records:
        raise SystemExit(f"{path} is empty: the run has not evaluated yet")
    return records


# (panel title, the keys a record may carry for it, first found wins)
CURVES = (('validation loss (nats; diffusion: NLL bound)', ('val_nll_bound', 'val_loss')),
          ('validation accuracy', ('val_accuracy',)),
          ('concept effective rank', ('erank',)))


def plot_curves(runs, labels=None):
    """runs: {label: records}. One panel per CURVES entry, one line per run -> matplotlib Figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8))
    for ax, (title, keys) in zip(axes, CURVES):
        for label, records in runs.items():
            key = next((k for k in keys if any(r.get(k) is not None for r in records)), None)
            if key is None:
                continue
            points = [(r.get('tokens_seen', r['iter']), r[key]) for r in records if r.get(key) is not None]
            x, y = zip(*points)
            ax.plot(x, y, marker='o', markersize=3, label=label if key == keys[-1] else f"{label} ({key})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('tokens seen')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# throughput from bench.py's JSON

def read_bench(path):
    if not os.path.isfile(path):
        raise SystemExit(f"--bench={path} not found; write one with python bench.py ... --json={path}")
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        rows = data['rows']
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--bench={path} is not a bench.py JSON (a 'rows' list; {type(e).__name__}: {e})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(f"--bench={path} is not a bench.py JSON: 'rows' must be a list of objects")
    if not any('train_tokens_per_s' in r for r in rows):
        raise SystemExit(f"--bench={path} has no measured row (every row is an error or out of memory)")
    return data


def plot_bench(data):
    """Training and encoding tokens/s against N, log-log: one line per (model, stage); colour is
    the stage, the line style the model (solid: concept, dashed: the standard encoder)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = [r for r in data['rows'] if 'train_tokens_per_s' in r]
    series = sorted({(r['model'], r['stage']) for r in rows})
    stages = sorted({s for _, s in series})
    colours = {s: f"C{i}" for i, s in enumerate(stages)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ('train_tokens_per_s', 'infer_tokens_per_s'),
                              ('training step (forward, backward, AdamW)', 'encoding (forward, no grad)')):
        for model, stage in series:
            points = sorted((r['seq_len'], r[key]) for r in rows if (r['model'], r['stage']) == (model, stage))
            x, y = zip(*points)
            ax.plot(x, y, marker='o', markersize=3, color=colours[stage],
                    linestyle='-' if model == 'concept' else '--', label=f"{model} {stage}")
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        lens = sorted({r['seq_len'] for r in rows})
        ax.set_xticks(lens, [str(n) for n in lens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel('sequence length N (tokens)')
        ax.set_ylabel('tokens / s')
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=8)
    m = data.get('machine')
    if isinstance(m, dict):
        shape = m.get('shape') or {}
        fig.suptitle(f"{m.get('device_name', '?')} ({m.get('device', '?')}, {m.get('threads', '?')} threads), torch "
                     f"{m.get('torch', '?')}, compile={m.get('compile', '?')}; H={shape.get('n_embd', '?')}, "
                     f"{shape.get('n_layer', '?')} layers, C={shape.get('n_concepts', '?')}", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, out):
    """Written beside out first, then moved into place: a failed save leaves no half picture."""
    ext = os.path.splitext(out)[1].lstrip('.').lower() or 'png'
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        fig.savefig(tmp, format=ext, dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# what each concept reads

def _last_layer(encoder):
    """The module whose (last) call is the last concept-reads-tokens step, and the kind of layer."""
    layer = encoder.layers[-1]
    return (layer, 'bixt') if encoder.cfg.bixt else (layer.cross_attn, 'cross')


@torch.no_grad()
def concept_attention(model, idx, attn_mask=None):
    """(n_head, C, N) float32, for the first sequence of idx: the softmax over tokens of the last
    encoder layer's concept queries against the token keys, recomputed from that layer's own weights and the inputs it received in
    an ordinary encoder forward (a pre-hook records them; model.forward is untouched)."""
    encoder = model.encoder
    module, kind = _last_layer(encoder)
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args: seen.update(args=args))
    try:
        encoder(idx, attn_mask)
    finally:
        hook.remove()
    if kind == 'cross':
        x, kv, key_mask = seen['args'][:3]                      # ln_1(c) (B, C, H); keys (B, nh, N, hs)
        B, C, H = x.shape
        q = module.c_q(x).view(B, C, module.n_head, H // module.n_head).transpose(1, 2)  # (B, nh, C, hs)
        k = kv[0]
    else:
        c, x, key_mask = seen['args'][:3]                       # concepts (B, C, H), tokens (B, N, H)
        q, _ = module._heads(module.c_ref_val(module.ln_c(c)))  # (B, nh, C, hs)
        k, _ = module._heads(module.t_ref_val(module.ln_t(x)))  # (B, nh, N, hs)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, nh, C, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    return scores.softmax(-1)[0]


def concept_reading(ckpt_path, text, top_k=5, device='cpu'):
    """(tokens as text, (C, N) head-averaged attention, top tokens per concept) for one text, read
    as '[cls] text' the way encode() reads it (cut at the model's block_size)."""
    import runtime
    ckpt = runtime.load_checkpoint(ckpt_path)
    if ckpt['model_args'].get('encoder', 'concept') == 'standard':
        raise SystemExit(f"{ckpt_path} is a standard-encoder checkpoint: it has no concepts, and its token-to-token "
                         f"self-attention is not what this page draws; give a concept-encoder checkpoint")
    import prepare_data
    tok = prepare_data.tokenizer_from_recipe(ckpt['tokenizer'], ckpt['data_dir'])
    model = runtime.model_from_checkpoint(ckpt).to(device).eval()
    ids = [tok.cls_id] + tok.encode(text)
    cut = len(ids) > model.cfg.block_size
    ids = ids[:model.cfg.block_size]
    att = concept_attention(model, torch.tensor([ids], device=device)).mean(0).cpu()  # (C, N)
    tokens = [tok.decode([i]) for i in ids]
    top = [[(int(j), float(att[c, j])) for j in att[c].topk(min(top_k, len(ids))).indices] for c in range(len(att))]
    return tokens, att, top, cut


def entropy(att):
    """Mean over concepts of the entropy (nats) of each concept's attention over the tokens."""
    return float(-(att * att.clamp_min(1e-12).log()).sum(-1).mean())


def _show(token):
    return html.escape(token.replace(' ', '\u2423').replace('\n', '\u21b5').replace('\t', '\u21e5')) or '&nbsp;'


def concept_page(tokens, att, top, title, cut=False):
    """Self-contained HTML: inline CSS only, no scripts, nothing fetched. Cells are shaded against
    the page's largest weight, so a concept that reads all tokens alike stays pale rather than
    looking as sharp as one that reads a single token; a cell's tooltip has its weight."""
    C, N = att.shape
    shade = (att / att.max().clamp_min(1e-12)).tolist()
    head = ''.join(f'<th class="t">{_show(t)}</th>' for t in tokens)
    rows = []
    for c in range(C):
        cells = ''.join(f'<td style="background:rgba(31,81,160,{s:.3f})" title="{_show(tokens[j])}: '
                        f'{float(att[c, j]):.4f}"></td>' for j, s in enumerate(shade[c]))
        rows.append(f'<tr><th class="c">{c}</th>{cells}</tr>')
    tops = ''.join('<li><b>concept {}</b>: {}</li>'.format(
        c, ', '.join(f'<code>{_show(tokens[j])}</code> {w:.3f}' for j, w in top[c])) for c in range(C))
    uniform = math.log(N)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.wrap {{ overflow-x: auto; }}
table.heat {{ border-collapse: collapse; }}
table.heat td {{ width: 14px; height: 14px; padding: 0; border: 1px solid #eee; }}
th.t {{ writing-mode: vertical-rl; transform: rotate(180deg); font: 11px monospace; font-weight: normal;
        padding: 2px 0; vertical-align: bottom; }}
th.c {{ font: 11px monospace; font-weight: normal; text-align: right; padding-right: 4px; }}
ol, ul {{ font-size: 13px; }} code {{ background: #f2f2f2; padding: 0 2px; }}
</style></head><body>
<h1 style="font-size:18px">What each concept reads: {html.escape(title)}</h1>
<p>The last encoder layer's concept-to-token attention, averaged over heads: {C} concepts (rows) &times;
{N} tokens (columns, <code>[cls]</code> first{', the text cut at the model&rsquo;s block_size' if cut else ''}).
Shade: the weight against the page's largest ({float(att.max()):.3f}; uniform reading would be
{1 / N:.3f}); hover a cell for its weight. Mean entropy of a concept's
attention: {entropy(att):.2f} nats (uniform over the {N} tokens: {uniform:.2f}).</p>
<div class="wrap"><table class="heat"><tr><th></th>{head}</tr>
{chr(10).join(rows)}
</table></div>
<h2 style="font-size:15px">Top tokens of each concept</h2>
<ul>{tops}</ul>
</body></html>
"""


def summary(tokens, att, top, n_show=8):
    """The terminal view: entropy against the uniform baseline, and the first concepts' top tokens."""
    C, N = att.shape
    lines = [f"{C} concepts x {N} tokens; mean attention entropy {entropy(att):.2f} nats "
             f"(uniform: ln {N} = {math.log(N):.2f})"]
    for c in range(min(C, n_show)):
        lines.append(f"concept {c:3d}: " + ', '.join(f"{tokens[j]!r} {w:.2f}" for j, w in top[c]))
    if C > n_show:
        lines.append(f"... {C - n_show} more in the page")
    return '\n'.join(lines)


def write_text(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(f"plot.py: {message} (see python plot.py --help)")


def check_out(out, suffixes):
    if not out:
        raise SystemExit(f"--out is needed, e.g. --out=plot{suffixes[0]}")
    if os.path.isdir(out):
        example = os.path.join(out, 'plot' + suffixes[0])
        raise SystemExit(f"--out={out} is a directory; give a file name, e.g. --out={example}")
    if not out.lower().endswith(suffixes):
        raise SystemExit(f"--out={out} should end in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SystemExit(f"--out={out}: the directory {folder} does not exist or is not writable; create it first")


def main(argv=None):
    p = OneLineParser(description=__doc__.split('\n\n')[1] if __doc__ else None,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='*', help='run directories (out_dir) whose log.jsonl to plot')
    p.add_argument('--out', default='', help='output file: .png/.pdf/.svg for plots, .html for --concepts')
    p.add_argument('--labels', default='', help='comma-separated legend labels, one per run')
    p.add_argument('--bench', default='', help="a bench.py JSON (--json=...) to plot against N")
    p.add_argument('--concepts', action='store_true', help='the concept-to-token attention page')
    p.add_argument('--ckpt', default='', help='--concepts: a ckpt.pt, an exported directory or a hub id')
    p.add_argument('--text', default='', help='--concepts: the text to read')
    p.add_argument('--top_k', type=int, default=5, help="--concepts: top tokens listed per concept")
    a = p.parse_args(argv)
    modes = sum([bool(a.runs), bool(a.bench), a.concepts])
    if modes != 1:
        raise SystemExit("plot.py: give run directories, or --bench=bench.json, or --concepts --ckpt=... --text=..., "
                         "one of the three")
    if a.concepts:
        if not a.ckpt or not a.text.strip():
            raise SystemExit("plot.py --concepts needs --ckpt=<checkpoint> and a non-empty --text=\"...\"")
        if a.top_k < 1:
            raise SystemExit(f"--top_k={a.top_k} must be >= 1")
        check_out(a.out, ('.html', '.htm'))
        tokens, att, top, cut = concept_reading(a.ckpt, a.text, a.top_k)
        write_text(a.out, concept_page(tokens, att, top, a.ckpt, cut))
        print(summary(tokens, att, top))
    elif a.bench:
        check_out(a.out, ('.png', '.pdf', '.svg'))
        save_figure(plot_bench(read_bench(a.bench)), a.out)
    else:
        check_out(a.out, ('.png', '.pdf', '.svg'))
        labels = [s.strip() for s in a.labels.split(',')] if a.labels else [os.path.basename(os.path.normpath(r))
                                                                          for r in a.runs]
        if len(labels) != len(a.runs) or len(set(labels)) != len(labels):
            raise SystemExit(f"--labels needs one distinct label per run ({len(a.runs)} runs, labels {labels}); "
                             f"pass --labels=a,b,...")
        save_figure(plot_curves({lab: read_run(r) for lab, r in zip(labels, a.runs)}), a.out)
    print(f"wrote {a.out}")


if __name__ == '__main__':
    import runtime
    runtime.one_line_errors()  # a moved data directory (the tokenizer) is one line too
    sys.exit(main())
