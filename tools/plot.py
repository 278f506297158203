"""
Pictures of runs, speed and transfer; what each concept reads; the collapse diagnostics of a checkpoint.

    python tools/plot.py --runs=out/tiny_mlm,out/tiny_mlm_standard --out=curves.png [--labels=concept,standard]
    python tools/plot.py --bench=bench.json --out=speed.png                 # bench.py's tokens/s against N
    python tools/plot.py --transfer=concept:5:a.json,concept:20:b.json,standard:20:c.json --out=transfer.png
    python tools/plot.py --concepts=True --ckpt=out/tiny_mlm/ckpt.pt --text="..." --out=concepts.html
    python tools/plot.py --geometry=True --ckpt=out/tiny_mlm/ckpt.pt        # also with --concepts=True
"""
import html
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from anywhere

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch

import common
from eval_glue import TASKS
from model import concept_diagnostics

runs = ''              # comma-separated run directories (out_dir) whose log.jsonl to plot
labels = ''            # their legend labels, comma-separated (default: the directory names)
bench = ''             # a bench.py JSON to plot against N
transfer = ''          # eval_glue.py scores against a pretraining budget (any unit): <line>:<budget>:<results.json>,...
concepts = False       # the concept-to-token attention page of --ckpt reading --text
geometry = False       # the collapse diagnostics of --ckpt on its validation text
ckpt = ''              # a ckpt.pt, an export or a hub id
text = ''
top_k = 5              # top tokens listed per concept
data_dir = ''          # geometry: another prepared data directory than the checkpoint's own
n_batches = 10         # geometry: fixed validation windows ...
batch_size = 16        # ... of this many sequences
device = 'cpu'
out = ''               # .png/.pdf/.svg for plots, .html for the concept page


# (panel title, the keys a record may carry for it, first found wins)
CURVES = (('validation loss (nats; diffusion: NLL bound)', ('val_nll_bound', 'val_loss')),
          ('validation accuracy', ('val_accuracy',)),
          ('concept effective rank', ('erank',)))


def plot_curves(run_dirs, names=None):
    """One panel per CURVES entry, one line per run, labelled names (by default the directory names) -> Figure."""
    names = names or [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    if len(names) != len(run_dirs) or len(set(names)) != len(names):
        raise common.InputError(f"--labels needs one distinct label per run ({len(run_dirs)} runs, labels {names}); "
                                f"pass --labels=a,b,...")
    found = {}
    for name, run in zip(names, run_dirs):
        path = run if run.endswith('.jsonl') else os.path.join(run, 'log.jsonl')
        if not os.path.isfile(path):
            raise common.InputError(f"{run}: no log.jsonl there; give a training run's out_dir (e.g. out/tiny_mlm)")
        records = found[name] = common.read_log(path)
        if not records:
            raise common.InputError(f"{path} has no evaluation record: the run has not evaluated yet")
        if not any(r.get(k) is not None for r in records for _, keys in CURVES for k in keys):
            raise common.InputError(f"{path}: none of its {len(records)} records has a plotted key "
                                    f"({', '.join(k for _, keys in CURVES for k in keys)}); "
                                    f"nothing to plot (not a training run's log?)")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8), layout='tight')
    for ax, (title, keys) in zip(axes, CURVES):
        for label, records in found.items():
            key = next((k for k in keys if any(r.get(k) is not None for r in records)), None)
            if key is not None:
                x, y = zip(*[(r.get('tokens_seen', r['iter']), r[key]) for r in records if r.get(key) is not None])
                ax.plot(x, y, marker='o', markersize=3, label=label if key == keys[-1] else f"{label} ({key})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('tokens seen')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def plot_bench(path):
    """bench.py's JSON -> training and encoding tokens/s against N, log-log, one line per (model, stage):
    colour is the stage, the line style the model (solid: concept, dashed: standard)."""
    if not os.path.isfile(path):
        raise common.InputError(f"--bench={path} not found; write one with python bench.py ... --out={path}")
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        rows = [r for r in data['rows'] if isinstance(r, dict) and 'train_tokens_per_s' in r]
    except (ValueError, KeyError, TypeError) as e:
        raise common.InputError(f"--bench={path} is not a bench.py JSON (a 'rows' list; {type(e).__name__}: {e})")
    if not rows:
        raise common.InputError(f"--bench={path} has no measured row (every row is an error or out of memory)")
    series = sorted({(r['model'], r['stage']) for r in rows})
    colours = {s: f"C{i}" for i, s in enumerate(sorted({s for _, s in series}))}
    lens = sorted({r['seq_len'] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout='tight')
    for ax, key, title in zip(axes, ('train_tokens_per_s', 'infer_tokens_per_s'),
                              ('training step (forward, backward, AdamW)', 'encoding (forward, no grad)')):
        for model, stage in series:
            x, y = zip(*sorted((r['seq_len'], r[key]) for r in rows if (r['model'], r['stage']) == (model, stage)))
            ax.plot(x, y, marker='o', markersize=3, color=colours[stage],
                    linestyle='-' if model == 'concept' else '--', label=f"{model} {stage}")
        ax.set_xscale('log', base=2)
        ax.set_xticks(lens, [str(n) for n in lens])
        ax.set_xticks([], minor=True)
        ax.set(yscale='log', xlabel='sequence length N (tokens)', ylabel='tokens / s')
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=8)
    m = data.get('machine')
    if isinstance(m, dict):
        shape = m.get('shape') or {}
        fig.suptitle(f"{m.get('device_name', '?')} ({m.get('device', '?')}, {m.get('threads', '?')} threads), torch "
                     f"{m.get('torch', '?')}, compile={m.get('compile', '?')}; H={shape.get('n_embd', '?')}, "
                     f"{shape.get('n_layer', '?')} layers, C={shape.get('n_concepts', '?')}", fontsize=9)
    return fig


def plot_transfer(spec):
    """<line>:<budget>:<eval_glue results.json>,... -> a panel per task: each line's first metric (mean ± std over
    seeds) against the budget; bag of words and majority as horizontal lines, random init as a hollow marker."""
    lines, baselines = {}, {}  # task -> line -> [(budget, mean, std, random-init mean or None)]; task -> (bow, majority)
    for item in spec.split(','):
        try:
            name, budget, path = item.strip().split(':', 2)
            budget = float(budget)
        except ValueError:
            raise common.InputError(f"--transfer item {item!r}: each is <line>:<budget>:<results.json>, e.g. "
                                    f"concept:20:out/pretrain_20/glue_probe.json")
        try:
            with open(path, encoding='utf-8') as f:
                results = json.load(f)['results']
            for task, r in results.items():
                metric = TASKS[task].metrics[0] if task in TASKS else 'accuracy'
                lines.setdefault(task, {}).setdefault(name, []).append(
                    (budget, r[metric], r.get('std', {}).get(metric, 0.0), (r.get('random_init') or {}).get(metric)))
                baselines[task] = (r['bow'][metric], r['majority'][metric], metric)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise common.InputError(f"--transfer: {path} is not an eval_glue.py results file ({type(e).__name__}: {e})")
    fig, axes = plt.subplots(1, len(lines), figsize=(4.5 * len(lines), 3.8), squeeze=False, layout='tight')
    for ax, (task, named) in zip(axes[0], sorted(lines.items())):
        for i, (name, points) in enumerate(sorted(named.items())):
            x, y, err, control = zip(*sorted(points))
            ax.errorbar(x, y, yerr=err, marker='o', markersize=4, capsize=3, color=f"C{i}", label=name)
            hollow = [(a, c) for a, c in zip(x, control) if c is not None]
            if hollow:
                ax.scatter(*zip(*hollow), facecolors='none', edgecolors=f"C{i}", label=f"{name}, random init")
        bow, majority, metric = baselines[task]
        ax.axhline(bow, color='k', linestyle='--', linewidth=1, label='bag of words')
        ax.axhline(majority, color='grey', linestyle=':', linewidth=1, label='majority')
        ax.set(title=task, xlabel='pretraining budget', ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


@torch.no_grad()
def concept_attention(model, idx, attn_mask=None):
    """(n_head, C, N) float32 for the first sequence of idx: the last encoder layer's concept-to-token softmax,
    recomputed from its weights and the inputs a pre-hook records in an ordinary forward (model.py needs no code)."""
    encoder = model.encoder
    module = encoder.layers[-1] if encoder.cfg.bixt else encoder.layers[-1].cross_attn  # the last concepts-read-tokens
    seen = {}
    with module.register_forward_pre_hook(lambda m, args: seen.update(args=args)):
        encoder(idx, attn_mask)
    if not encoder.cfg.bixt:
        x, (k, _), key_mask = seen['args'][:3]                  # ln_1(c) (B, C, H); keys (B, nh, N, hs)
        q = module.c_q(x).unflatten(-1, (module.n_head, -1)).transpose(1, 2)  # (B, nh, C, hs)
    else:
        c, x, key_mask = seen['args'][:3]                       # concepts (B, C, H), tokens (B, N, H)
        q, _ = module._heads(module.c_ref_val(module.ln_c(c)))  # (B, nh, C, hs)
        k, _ = module._heads(module.t_ref_val(module.ln_t(x)))  # (B, nh, N, hs)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, nh, C, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    return scores.softmax(-1)[0]


def concept_model(ckpt, device, what):
    """(model, checkpoint) of a concept-encoder checkpoint; the standard arm has no concepts to read."""
    checkpoint = common.load_checkpoint(ckpt)
    if checkpoint['model_args'].get('encoder', 'concept') == 'standard':
        raise common.InputError(f"{ckpt} is a standard-encoder checkpoint: it has no concepts, so {what} do not "
                                f"apply; give a concept-encoder checkpoint")
    return common.load_model(checkpoint, ckpt, device)


def concept_geometry(ckpt, data_dir=None, split='val', n_batches=10, batch_size=16, device='cpu', seed=1337):
    """model.concept_diagnostics of any checkpoint averaged over n_batches fixed windows of clean text of a
    prepared data directory (by default its own): whether a finished model's concepts collapsed."""
    for name, value in (('n_batches', n_batches), ('batch_size', batch_size)):
        if not (type(value) is int and value > 0):
            raise common.InputError(f"concept_geometry: {name}={value!r} must be a positive integer")
    model, checkpoint = concept_model(ckpt, device, "the collapse diagnostics")
    data_dir = data_dir or checkpoint.get('trained_on') or checkpoint.get('data_dir')  # an export holds no text
    if not data_dir:
        raise common.InputError(f"{ckpt} does not record its data directory: pass --data_dir=<a prepared data directory>")
    common.check_vocab(checkpoint, common.load_meta(data_dir), ckpt, data_dir)
    batches = common.fixed_batches(data_dir, split, model.cfg.block_size, batch_size, n_batches, True, seed, 0, device)
    with torch.no_grad():
        report = common.mean_diagnostics([concept_diagnostics(model.encoder(idx)) for idx, _ in batches])
    if not all(math.isfinite(v) for v in report.values()):
        raise common.InputError(f"{ckpt}: the concepts are not finite on {data_dir}'s {split} windows (the weights are "
                                f"finite, the model's outputs overflow): the run diverged; use an earlier checkpoint")
    return report


def entropy(att):
    """Mean over concepts of the entropy (nats) of each concept's attention over the tokens."""
    return float(-(att * att.clamp_min(1e-12).log()).sum(-1).mean())


def concept_page(tokens, att, top, title, cut=False):
    """Self-contained HTML (inline CSS, no scripts). Cells are shaded against the page's largest weight, so a
    concept that reads all tokens alike stays pale rather than looking as sharp as one that reads a single token."""
    C, N = att.shape
    shade = (att / att.max().clamp_min(1e-12)).tolist()
    shown = [html.escape(t.replace(' ', '\u2423').replace('\n', '\u21b5').replace('\t', '\u21e5')) or '&nbsp;'
             for t in tokens]  # whitespace made visible
    head = ''.join(f'<th class="t">{t}</th>' for t in shown)
    rows = ''.join(f'<tr><th class="c">{c}</th>' + ''.join(
        f'<td style="background:rgba(31,81,160,{s:.3f})" title="{shown[j]}: {float(att[c, j]):.4f}"></td>'
        for j, s in enumerate(shade[c])) + '</tr>\n' for c in range(C))
    tops = ''.join('<li><b>concept {}</b>: {}</li>'.format(
        c, ', '.join(f'<code>{shown[j]}</code> {w:.3f}' for j, w in top[c])) for c in range(C))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }} .wrap {{ overflow-x: auto; }}
table.heat {{ border-collapse: collapse; }} table.heat td {{ width: 14px; height: 14px; padding: 0; border: 1px solid #eee; }}
th.t {{ writing-mode: vertical-rl; transform: rotate(180deg); font: 11px monospace; padding: 2px 0; vertical-align: bottom; }}
th.c {{ font: 11px monospace; text-align: right; padding-right: 4px; }} th {{ font-weight: normal; }}
ul {{ font-size: 13px; }} code {{ background: #f2f2f2; padding: 0 2px; }}
</style></head><body>
<h1 style="font-size:18px">What each concept reads: {html.escape(title)}</h1>
<p>The last encoder layer's concept-to-token attention, averaged over heads: {C} concepts (rows) &times;
{N} tokens (columns, <code>[cls]</code> first{', the text cut at the model&rsquo;s block_size' if cut else ''}).
Shade: the weight against the page's largest ({float(att.max()):.3f}; uniform reading would be
{1 / N:.3f}); hover a cell for its weight. Mean entropy of a concept's
attention: {entropy(att):.2f} nats (uniform over the {N} tokens: {math.log(N):.2f}).</p>
<div class="wrap"><table class="heat"><tr><th></th>{head}</tr>
{rows}</table></div>
<h2 style="font-size:15px">Top tokens of each concept</h2>
<ul>{tops}</ul>
</body></html>
"""


def main():
    if [bool(runs), bool(bench), bool(transfer), concepts or geometry].count(True) != 1:
        raise common.InputError("give --runs=<run dirs>, --bench=<bench.json>, --transfer=<line:budget:results.json,...>, "
                                "or --concepts=True / --geometry=True with --ckpt=..., one of the four")
    if top_k < 1:
        raise common.InputError(f"--top_k={top_k} must be >= 1")
    if (concepts or geometry) and not ckpt:
        raise common.InputError("--concepts and --geometry need --ckpt=<a ckpt.pt, an export or a hub id>")
    if concepts and not text.strip():
        raise common.InputError('--concepts=True needs a non-empty --text="..."')
    if runs or bench or transfer or concepts:
        suffixes = ('.html', '.htm') if concepts else ('.png', '.pdf', '.svg')
        if not out:
            raise common.InputError(f"--out is needed, e.g. --out=plot{suffixes[0]}")
        common.check_output(out, '--out')
        if not out.lower().endswith(suffixes):
            raise common.InputError(f"--out={out} should end in {' or '.join(suffixes)}")
    dev = common.resolve_device(device)
    if concepts:
        model, checkpoint = concept_model(ckpt, dev, "the concept-to-token attention and this page")
        tok = common.checkpoint_tokenizer(checkpoint)
        ids = [tok.cls_id] + tok.encode(text)  # read as encode() reads it, cut at the block_size
        cut, ids = len(ids) > model.cfg.block_size, ids[:model.cfg.block_size]
        att = concept_attention(model, torch.tensor([ids], device=dev)).mean(0).cpu()  # (C, N), averaged over heads
        tokens, (C, N) = [tok.decode([i]) for i in ids], att.shape
        top = [[(int(j), float(att[c, j])) for j in att[c].topk(min(top_k, N)).indices] for c in range(C)]
        common.write_text(out, concept_page(tokens, att, top, ckpt, cut))
        print(f"{C} concepts x {N} tokens; mean attention entropy {entropy(att):.2f} nats (uniform: ln {N} = "
              f"{math.log(N):.2f})")
        print('\n'.join([f"concept {c:3d}: " + ', '.join(f"{tokens[j]!r} {w:.2f}" for j, w in top[c])
                         for c in range(min(C, 8))] + ([f"... {C - 8} more in the page"] if C > 8 else [])))
    if geometry:
        report = concept_geometry(ckpt, data_dir or None, n_batches=n_batches, batch_size=batch_size, device=dev)
        print(f"concept geometry over {n_batches} x {batch_size} validation windows (collapse: erank and participation "
              f"ratio near 1, cosines near 1): " + ', '.join(f"{k} {v:.4f}" for k, v in report.items()))
    if runs or bench or transfer:
        fig = plot_bench(bench) if bench else plot_transfer(transfer) if transfer else plot_curves(
            [r.strip() for r in runs.split(',')], [s.strip() for s in labels.split(',')] if labels else None)
        common.atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.rsplit('.', 1)[1].lower(), dpi=100))
    if runs or bench or transfer or concepts:
        print(f"wrote {out}")


if __name__ == '__main__':
    bare = [a for a in sys.argv[1:] if not a.startswith('--') and os.path.isdir(a)]  # plot.py's old command line
    if bare:
        raise common.InputError(f"give run directories as --runs={','.join(bare)} (a bare argument is a config file)")
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configurator.py')).read())
    try:
        main()
    except KeyboardInterrupt:
        common.interrupted(f"{out} is unchanged" if out and os.path.exists(out) else "nothing was written")
