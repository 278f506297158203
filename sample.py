"""
Generate text with a trained diffusion checkpoint: start from [MASK]s (after an optional prompt)
and let ConceptDiffusion.generate() unmask them over a number of steps.

    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --prompt="Return the number of" --steps=32 --num_samples=3
    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --show_steps=True     # watch the text form
    python sample.py --ckpt=... --text="The ___ of the ___ is returned."      # infill every ___

The tokenizer comes from the checkpoint (its recipe and the data directory it was trained on).
After the samples (quality=True) come signs of their quality that need no other model: the longest
run of one repeated token, the share of distinct tokens and the share of word bigrams that occur in
the training split, each beside the same numbers for real validation text and for samples of the
unigram distribution, and the validation split's unigram cross-entropy beside the run's NLL bound.
"""
import os
import re
import sys

import numpy as np
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
quality = True           # after the samples: repetition, distinct tokens, word bigrams seen in training, unigram CE
bigram_tokens = 4_000_000  # the training-bigram set is built from at most this many training tokens
control_windows = 64     # validation windows (one batch) of the concepts control; 0: none
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# ----------------------------------------------------------------------------------------------

runtime.one_line_errors()
for key, value, least in (('length', length, 1), ('num_samples', num_samples, 1), ('steps', steps, 1),
                          ('temperature', temperature, 0), ('top_k', top_k, 0), ('block_len', block_len, 0),
                          ('bigram_tokens', bigram_tokens, 1), ('control_windows', control_windows, 0)):
    if not value >= least:  # `not >=`: a nan temperature is refused too
        raise ConfigError(f"{key}={value} is out of range: {key} must be >= {least}")
device = runtime.resolve_device(device)  # a one-line error for cuda/mps that is not there; maps 'auto'
runtime.keep_freed_memory()
model, checkpoint = runtime.load_model(ckpt, device)
if not isinstance(model, ConceptDiffusion):
    raise SystemExit(f"{ckpt} is a {checkpoint.get('stage', '?')} checkpoint; "
                     f"sample.py needs one from train_diffusion.py")
tok = prepare_data.tokenizer_from_recipe(checkpoint['tokenizer'], data_dir or checkpoint['data_dir'])
corpus_dir = data_dir or checkpoint.get('trained_on') or checkpoint['data_dir']  # an export records its training data
if quality and not os.path.exists(os.path.join(corpus_dir, 'meta.json')):
    print(f"quality: skipped, the training data ({corpus_dir}) is not on this machine; pass --data_dir=<it> for it")
    quality = False
if quality:  # the splits are checked now, so that a damaged data directory fails before sampling
    train_tokens, _ = prepare_data.open_split(corpus_dir, 'train')
    val_tokens, val_starts = prepare_data.open_split(corpus_dir, 'val')
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


# --- quality signs that need no other model (quality=True)
def longest_repeat(ids):
    """Length of the longest run of one token repeated back to back ("the the the" is 3)."""
    best, run, prev = 0, 0, None
    for i in ids:
        run = run + 1 if i == prev else 1
        best, prev = max(best, run), i
    return best


def distinct_share(ids):
    """Share of a sample's tokens that are distinct: low for a sample that repeats itself."""
    return len(set(ids)) / max(1, len(ids))


def words(text):
    return re.findall(r"\w+", text)


def word_pairs(text):
    w = words(text)
    return list(zip(w, w[1:]))


def training_bigrams(tok, tokens, eod_id):
    """The word bigrams of a stretch of a training split, each document on its own, built once so
    that a sample's bigrams are looked up in O(1) each: (word -> number, set of bigram codes), a
    bigram being one int64 (first word's number << 31 | second's), which keeps the set small."""
    text = tok.decode(np.asarray(tokens))
    word_id, codes = {}, [np.zeros(0, dtype=np.int64)]
    for doc in text.split(tok.decode([eod_id])):
        ids = np.array([word_id.setdefault(w, len(word_id)) for w in words(doc)], dtype=np.int64)
        codes.append(ids[:-1] * (1 << 31) + ids[1:])
    return word_id, set(np.concatenate(codes).tolist())


def bigrams_seen(texts, word_id, codes):
    """(word bigrams of texts that occur in the training split, word bigrams of texts)."""
    seen = total = 0
    for a, b in (pair for text in texts for pair in word_pairs(text)):
        total += 1
        ia, ib = word_id.get(a), word_id.get(b)
        seen += ia is not None and ib is not None and ia * (1 << 31) + ib in codes
    return seen, total


def unigram_counts(tokens, vocab_size, special_ids):
    """Token counts of a split, specials (which the NLL bound never scores) zeroed."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(tokens), 1 << 24):  # in chunks: bincount would copy a large split as int64
        counts += np.bincount(np.asarray(tokens[start:start + (1 << 24)]), minlength=vocab_size)
    counts[special_ids] = 0
    return counts


def unigram_cross_entropy(train_counts, val_tokens, special_ids):
    """Nats per token of the validation split's non-special tokens under the training split's
    unigram distribution (add-one smoothed over the non-special ids): the level a diffusion model
    that learned only token frequencies reaches, so its NLL bound must go below it."""
    n_ordinary = len(train_counts) - len(special_ids)
    p = (train_counts + 1) / (train_counts.sum() + n_ordinary)
    val = np.asarray(val_tokens)
    val = val[~np.isin(val, special_ids)]
    return float(-np.log(p[val]).mean())


def quality_row(name, samples, texts, bigrams):
    """One line of the quality table: samples are lists of ids, texts their decoded text, bigrams
    what training_bigrams returned."""
    seen, total = bigrams_seen(texts, *bigrams)
    return (f"{name:<34} {max(longest_repeat(s) for s in samples):>11d} "
            f"{np.mean([distinct_share(s) for s in samples]):>14.2f} {seen / max(1, total):>14.2f} ({total} bigrams)")


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

if quality:
    # the same measures for the first `length` tokens of validation documents (real text) and for
    # tokens drawn from the training unigram distribution (what a frequency-only model writes)
    special_ids = model.cfg.special_ids
    counts = unigram_counts(train_tokens, model.cfg.vocab_size, special_ids)
    rng = np.random.default_rng(seed)
    n_ref = max(num_samples, 32)
    val_ends = list(val_starts[1:]) + [len(val_tokens)]
    real = [val_tokens[a:a + length].tolist() for a, b in zip(val_starts, val_ends) if b - a > length]
    real = [[i for i in ids if i not in special_ids] for ids in real[:n_ref]]
    unigram = rng.choice(len(counts), size=(n_ref, length), p=counts / counts.sum()).tolist()
    n_bigram_tokens = min(len(train_tokens), bigram_tokens)
    bigrams = training_bigrams(tok, train_tokens[:n_bigram_tokens], model.cfg.eod_id)
    samples = [out[k].tolist() for k in range(num_samples)]
    print(f"quality ({length} tokens each; word bigrams looked up in the first {n_bigram_tokens:,} training tokens):")
    print(f"{'':<34} {'longest run':>11} {'distinct share':>14} {'bigrams seen':>14}")
    print(quality_row(f"these {num_samples} samples", samples, [tok.decode(s) for s in samples], bigrams))
    if real:
        print(quality_row(f"{len(real)} validation documents' starts", real, [tok.decode(s) for s in real], bigrams))
    print(quality_row(f"{n_ref} unigram samples", unigram, [tok.decode(s) for s in unigram], bigrams))
    unigram_ce = unigram_cross_entropy(counts, val_tokens, special_ids)
    line = f"validation unigram cross-entropy: {unigram_ce:.3f} nats/token"
    if model.cfg.condition != 'clean' and 'best_val_loss' in checkpoint:
        bound = checkpoint['best_val_loss']
        line += (f"; this run's best val_nll_bound: {bound:.3f}, {abs(unigram_ce - bound):.3f} nats "
                 f"{'under' if bound < unigram_ce else 'above'} it")
    print(line)
    if control_windows and not model.standard and model.cfg.condition != 'clean':
        n_windows = min(control_windows, len(val_tokens) // block_size)
        if n_windows >= 2:  # one batch, the same noise for both (one seed)
            windows = torch.from_numpy(np.asarray(val_tokens[:n_windows * block_size], dtype=np.int64))
            windows = windows.view(n_windows, block_size).to(device)
            own, swapped = (model.nll_bound(windows, generator=torch.Generator(device=device).manual_seed(seed),
                                            swap_concepts=swap) for swap in (False, True))
            own, swapped = own[0] / own[1], swapped[0] / swapped[1]
            print(f"NLL bound on {n_windows} validation windows: {own:.3f} from their own concepts, "
                  f"{swapped:.3f} from another window's: the concepts carry {swapped - own:.3f} nats/token")
