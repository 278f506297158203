"""
Generate text with a trained diffusion checkpoint: start from [MASK]s (after an optional prompt)
and let ConceptDiffusion.generate() unmask them over a number of steps.

    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --prompt="Return the number of" --steps=32 --num_samples=3
    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --show_steps=True     # watch the text form
    python sample.py --ckpt=... --text="The ___ of the ___ is returned."      # infill every ___

The tokenizer comes from the checkpoint (its recipe and the data directory it was trained on).
"""
import os
import sys

import torch

import prepare_data
import runtime
from model import ConceptDiffusion, ConfigError

# ----------------------------------------------------------------------------------------------
ckpt = 'out/tiny_diffusion/ckpt.pt'
prompt = ''              # text the samples continue (kept unchanged)
text = ''                # infilling: a text whose '___' marks are masked and filled (overrides prompt)
length = 64              # tokens per sample, prompt included (at most the model's block_size)
num_samples = 3
steps = 32               # denoising steps: more steps, better text
temperature = 1.0        # 0: always the most likely token
top_k = 0                # 0: no top-k filtering
block_len = 0            # >0: semi-autoregressive, fill blocks of this many positions left to right
show_steps = False       # print the sequence after every step, masks shown as '_'
seed = 1337
device = 'cpu'
data_dir = ''            # where the tokenizer lives if the checkpoint's data directory has moved
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# ----------------------------------------------------------------------------------------------

runtime.one_line_errors()
for key, value, least in (('length', length, 1), ('num_samples', num_samples, 1), ('steps', steps, 1),
                          ('temperature', temperature, 0), ('top_k', top_k, 0), ('block_len', block_len, 0)):
    if not value >= least:  # `not >=`: a nan temperature is refused too
        raise ConfigError(f"{key}={value} is out of range: {key} must be >= {least}")
device = runtime.resolve_device(device)  # a one-line error for cuda/mps that is not there; maps 'auto'
model, state = runtime.load_model(ckpt, device)
if not isinstance(model, ConceptDiffusion):
    raise SystemExit(f"{ckpt} is a {state.get('stage', '?')} checkpoint; sample.py needs one from train_diffusion.py")
tok = prepare_data.tokenizer_from_recipe(state['tokenizer'], data_dir or state['data_dir'])
mask_id = model.cfg.mask_id
block_size = model.cfg.block_size
if length > block_size:
    print(f"note: length={length} is capped at the model's block_size={block_size}", file=sys.stderr)
    length = block_size


def render(ids):
    """Decode ids with every [MASK] shown as '_' (runs of ordinary tokens are decoded together so
    that multi-byte characters survive)."""
    out, run = [], []
    for i in ids:
        if i == mask_id:
            out.append(tok.decode(run) + '_')
            run = []
        else:
            run.append(i)
    return ''.join(out) + tok.decode(run)


if text:  # infilling: each '___' becomes 4 masks
    pieces = text.split('___')
    ids = []
    for k, piece in enumerate(pieces):
        ids += tok.encode(piece) + ([mask_id] * 4 if k < len(pieces) - 1 else [])
    if mask_id not in ids[:length]:
        if len(pieces) == 1:
            raise ConfigError("--text has no ___, so there is nothing to fill; mark each gap with ___ "
                              "(or use --prompt to continue a text)")
        raise ConfigError(f"--text has no ___ within its first length={length} tokens, so there is nothing to fill; "
                          f"raise --length (at most block_size={block_size}) or move a ___ earlier")
    if len(ids) > length:
        print(f"note: --text is {len(ids)} tokens with its masks; only the first length={length} are used",
              file=sys.stderr)
    ids = ids[:length]
else:
    ids = tok.encode(prompt) if prompt else []
    if len(ids) >= length and length < block_size:
        raise ConfigError(f"the prompt is {len(ids)} tokens and fills the whole length={length}, leaving nothing "
                          f"to generate; raise --length (at most block_size={block_size}) or shorten the prompt")
    if len(ids) >= length:
        print(f"note: the prompt is {len(ids)} tokens; only its first {length - 1} are kept so that one token "
              f"is generated within block_size={block_size}", file=sys.stderr)
        ids = ids[:length - 1]
    ids = ids + [mask_id] * (length - len(ids))
x = torch.tensor([ids] * num_samples, device=device)
generator = torch.Generator(device=device).manual_seed(seed)
trajectory = [] if show_steps else None
out = model.generate(x, steps=steps, temperature=temperature, top_k=top_k, block_len=block_len,
                     generator=generator, trajectory=trajectory)
if show_steps:
    print(f"step  0: {render(x[0].tolist())}")
    for s, frame in enumerate(trajectory, 1):
        print(f"step {s:2d}: {render(frame[0].tolist())}")
    print('-' * 80)
for k in range(num_samples):
    print(render(out[k].tolist()))
    print('-' * 80)
