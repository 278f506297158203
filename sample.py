"""
Generate text with a trained diffusion checkpoint (and its tokenizer): ConceptDiffusion.generate() unmasks
[MASK]s after an optional prompt. Stdout holds the samples only; their speed and notes go to stderr.

    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --prompt="Return the number of" --show_steps=True
    python sample.py --ckpt=... --text="The ___ of the ___ is returned." --steps=32    # infill every ___
    python sample.py --ckpt=... --out=samples.json && python tools/sample_quality.py --samples=samples.json
"""
import json
import os
import sys
import time
from itertools import groupby

import torch

import common
from model import ConceptDiffusion

ckpt = 'out/tiny_diffusion/ckpt.pt'
prompt = ''              # text the samples continue (kept unchanged)
text = ''                # infilling: a text whose '___' marks are masked and filled (overrides prompt)
length = 64              # tokens per sample, prompt included (any length: positions are sinusoids)
num_samples = 3
steps = 32               # denoising steps: more steps, better text
temperature = 1.0        # 0: always the most likely token
top_k = 0                # 0: no top-k filtering
block_len = 0            # >0: semi-autoregressive, fill blocks of this many positions left to right
remasking = 'random'     # the masked positions a step fills: 'random' (MDLM; logits there only) | 'confidence' (LLaDA)
show_steps = False       # print the sequence after every step, masks shown as '_'
seed = 1337
device = 'cpu'
data_dir = ''            # where the tokenizer lives if the checkpoint's data directory has moved
out = ''                 # write the samples (ids, text, settings) here as JSON, for tools/sample_quality.py
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

LEAST = {'length': 1, 'num_samples': 1, 'steps': 1, 'temperature': 0, 'top_k': 0, 'block_len': 0}
settings = {k: globals()[k] for k in ('prompt', 'text', *LEAST, 'remasking', 'seed', 'device', 'data_dir')}
common.check_settings(settings)  # finite numbers, the seed's range
for key, least in LEAST.items():
    if not settings[key] >= least:
        raise common.InputError(f"{key}={settings[key]!r} must be >= {least}")
if remasking not in ('random', 'confidence'):
    raise common.InputError(f"remasking={remasking!r}: choose random (MDLM's ancestral order) or confidence (LLaDA)")
if out:
    common.check_output(out)
device = common.resolve_device(device)
common.keep_freed_memory()
model, checkpoint = common.load_model(ckpt, ckpt, device)
if not isinstance(model, ConceptDiffusion):
    raise common.InputError(f"{ckpt} is a {checkpoint.get('stage')} checkpoint; sample.py needs one from "
                            f"train_diffusion.py")
tok, mask_id = common.checkpoint_tokenizer(checkpoint, data_dir), model.cfg.mask_id
if length > model.cfg.block_size:
    print(f"note: length={length} is past the model's training window of {model.cfg.block_size} tokens",
          file=sys.stderr)
if text:  # infilling: each '___' becomes 4 masks
    pieces = text.split('___')
    ids = [i for k, piece in enumerate(pieces) for i in tok.encode(piece) + [mask_id] * 4 * (k < len(pieces) - 1)]
    if mask_id not in ids[:length]:
        raise common.InputError(
            "--text has no ___, so there is nothing to fill; mark each gap with ___ (or use --prompt to continue a "
            "text)" if len(pieces) == 1 else f"--text has no ___ within its first length={length} tokens, so there "
            f"is nothing to fill; raise --length or move a ___ earlier")
    if len(ids) > length:
        print(f"note: --text is {len(ids)} tokens with its masks; only the first {length} are used", file=sys.stderr)
    ids = ids[:length]
else:
    ids = tok.encode(prompt)
    if len(ids) >= length:
        raise common.InputError(f"the prompt is {len(ids)} tokens and fills the whole length={length}, leaving "
                                f"nothing to generate; raise --length or shorten the prompt")
    ids = ids + [mask_id] * (length - len(ids))


def render(ids):
    """ids as text, each [MASK] as '_'; the runs between masks decode whole (a multi-byte character survives)."""
    return ''.join('_' * len(list(run)) if masked else tok.decode(run)
                   for masked, run in groupby(ids, lambda i: i == mask_id))


x = torch.tensor([ids] * num_samples, device=device)  # (num_samples, length)
trajectory = [] if show_steps else None
t0 = time.perf_counter()
try:
    samples = model.generate(x, steps=steps, temperature=temperature, top_k=top_k, block_len=block_len,
                             remasking=remasking, generator=torch.Generator(device=device).manual_seed(seed),
                             trajectory=trajectory).tolist()
except KeyboardInterrupt:
    common.interrupted("no samples written")
seconds = time.perf_counter() - t0
if show_steps:
    for s, frame in enumerate([x] + trajectory):
        print(f"step {s:2d}: {render(frame[0].tolist())}")
    print('-' * 80)
for sample in samples:
    print(render(sample), '-' * 80, sep='\n', flush=True)  # flushed before the speed line on stderr
print(f"{num_samples} x {length} tokens in {seconds:.2f} s: {num_samples * length / seconds:,.0f} tokens/s "
      f"({device}, {steps} steps)", file=sys.stderr)
if out:
    common.write_text(out, json.dumps({
        'ckpt': os.path.abspath(ckpt) if os.path.exists(ckpt) else ckpt, 'settings': settings, 'seconds': seconds,
        'samples': [{'ids': sample, 'text': render(sample)} for sample in samples]}))
    print(f"wrote {out}", file=sys.stderr)
