"""
The masked-token loss (MLM) or NLL bound (diffusion) of a checkpoint on any text, in nats/token, each scored span
read in windows of several context lengths: the scored tokens and their noise are the same at every length, so
the rows differ only in the context the model reads.

    python tools/score_text.py --ckpt=out/long_mlm/ckpt.pt --data_dir=data/gutenberg --split=val --contexts=512,4096,32768
    python tools/score_text.py --ckpt=out/tiny_diffusion/ckpt.pt --text=../shared/corpus/wikipedia/wiki_00.txt.xz
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import prepare_data  # noqa: E402
from model import IGNORE_INDEX, ConceptDiffusion, gather_and_pack  # noqa: E402

ckpt = 'out/tiny_diffusion/ckpt.pt'
text = ''                # a text file (.txt/.jsonl, plain or .xz/.gz/.bz2) or a folder of them; or:
data_dir = ''            # a prepared data directory (its tokenizer must be the checkpoint's) and its
split = 'val'            # split
max_tokens = 2_000_000   # read at most this many tokens of the text
contexts = ''            # comma-separated window lengths; '' = the checkpoint's block_size
n_spans = 16             # scored spans, spread evenly over the text, each in the middle of its windows ...
span_len = 0             # ... of this many tokens; 0 = the shortest context, at most 256
mask_prob = 0.15         # MLM checkpoints: the share of a window's tokens masked, as in training
bound_levels = 8         # diffusion checkpoints: levels of t of the bound's midpoint rule
device = 'cpu'
dtype = 'bfloat16'
seed = 1337
out = ''                 # write the rows as JSON
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configurator.py')).read())

settings = {k: globals()[k] for k in ('max_tokens', 'n_spans', 'span_len', 'mask_prob', 'bound_levels', 'seed',
                                      'dtype', 'contexts')}
common.check_settings(settings)
for key in ('max_tokens', 'n_spans'):
    if not settings[key] >= 1:
        raise common.InputError(f"{key}={settings[key]!r} must be >= 1")
if bool(text) == bool(data_dir):
    raise common.InputError("give the text to score: --text=<a file or folder> or --data_dir=<a prepared data "
                            "directory> (with --split), one of the two")
if out:
    common.check_output(out)
device = common.resolve_device(device)
model, checkpoint = common.load_model(ckpt, ckpt, device)
context_list = [int(c) for c in contexts.split(',') if c.strip()] if contexts else [model.cfg.block_size]
span_len = settings['span_len'] = span_len or min(256, *context_list)
if not all(c >= span_len for c in context_list):
    raise common.InputError(f"contexts={','.join(map(str, context_list))}: every context must hold the "
                            f"span_len={span_len} scored tokens; give a shorter --span_len or longer --contexts")
if data_dir:
    meta = common.load_meta(data_dir)
    common.check_vocab(checkpoint, meta, ckpt, data_dir)
    tokens = np.asarray(common.open_split(data_dir, split, meta)[0][:max_tokens], dtype=np.int64)
else:
    tok, tokens = common.checkpoint_tokenizer(checkpoint), []
    for doc in prepare_data.local_texts(text):  # documents joined by <|endofdoc|>
        tokens += tok.encode(doc) + [tok.eod_id]
        if len(tokens) >= max_tokens:
            break
    tokens = np.array(tokens[:max_tokens], dtype=np.int64)
longest = max(context_list)
if len(tokens) < longest:
    raise common.InputError(f"the text has {len(tokens):,} tokens, fewer than the longest context of {longest:,}; "
                            f"score a longer text or shorter --contexts")
diffusion = isinstance(model, ConceptDiffusion)
if checkpoint.get('stage') == 'tsdae':
    raise common.InputError(f"{ckpt} is a TSDAE checkpoint: it rebuilds deleted tokens, and this tool scores masked "
                            f"ones (MLM) or the diffusion bound; give an mlm or diffusion checkpoint")
if diffusion and model.cfg.condition == 'clean':
    raise common.InputError(f"{ckpt} is a condition='clean' diffusion model (an autoencoder): it has no NLL bound")
# spans spread evenly, each far enough from both ends for the longest window to be centred on it
span_starts = np.linspace(longest // 2, len(tokens) - longest // 2 - span_len, n_spans).astype(np.int64) \
    if len(tokens) >= longest + span_len else np.full(n_spans, (len(tokens) - span_len) // 2)


rows = []
with torch.no_grad(), common.autocast(device, dtype):
    for context in context_list:
        t0, total, n_scored = time.time(), 0.0, 0.0
        for k, s in enumerate(span_starts.tolist()):
            a = min(max(0, s + span_len // 2 - context // 2), len(tokens) - context)  # the window, centred
            window = torch.from_numpy(tokens[a:a + context]).to(device)[None]  # (1, context)
            span = slice(s - a, s - a + span_len)
            for level in range(bound_levels if diffusion else 1):
                # the span's noise from a generator of (span, level) alone: the same at every context length
                g_span = torch.Generator(device).manual_seed(seed + 1000 * k + level)
                g_rest = torch.Generator(device).manual_seed(seed + 1000 * k + level + 7919 * context)
                if diffusion:  # MDLM's bound on the span: Σ over its masked tokens of CE / t, per level
                    t = torch.full((1,), (level + 0.5) / bound_levels, device=device)
                    x, _, _ = model.add_noise(window, t, generator=g_rest)
                    x[:, span], masked, maskable = model.add_noise(window[:, span], t, generator=g_span)
                    chosen = torch.zeros_like(window, dtype=torch.bool)
                    chosen[:, span] = masked
                    pos, _, packing = gather_and_pack(chosen)
                    logits = model.lm_head(model.denoise(model.encode(window, x, t), x, pos, t, packing))
                    ce = F.cross_entropy(logits.float(), packing.pack(torch.gather(window, 1, pos)), reduction='sum')
                    total += ce.item() / t.item() / bound_levels
                    n_scored += int(maskable.sum()) / bound_levels
                else:
                    x, _ = model.mlm_noise(window, g_rest, mask_prob)
                    x[:, span], span_targets = model.mlm_noise(window[:, span], g_span, mask_prob)
                    targets = torch.full_like(window, IGNORE_INDEX)
                    targets[:, span] = span_targets
                    _, loss, stats = model(x, targets)
                    total += loss.item() * stats['n_pred']
                    n_scored += stats['n_pred']
        rows.append({'context': context, 'nats_per_token': total / max(n_scored, 1e-9), 'tokens_scored': n_scored,
                     'seconds': round(time.time() - t0, 2)})
        print(f"context {context:>7,}: {'NLL bound' if diffusion else 'masked-token loss'} "
              f"{rows[-1]['nats_per_token']:.4f} nats/token on {n_scored:,.0f} scored tokens ({rows[-1]['seconds']} s)",
              flush=True)
source = text or f"{data_dir} ({split})"
print(f"{ckpt} ({checkpoint.get('stage')}, encoder={model.cfg.encoder}, trained on {model.cfg.block_size}-token "
      f"windows) on {source}: {len(tokens):,} tokens, {n_spans} spans of {span_len}")
if out:
    common.write_text(out, json.dumps({'ckpt': ckpt, 'text': source, 'settings': settings, 'rows': rows}, indent=2))
    print(f"wrote {out}")
