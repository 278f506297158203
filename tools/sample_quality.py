"""
Signs of the quality of sample.py's samples that need no other model, beside real validation text and samples of
the training unigram distribution; the validation unigram cross-entropy beside the run's best NLL bound; and the
NLL bound of validation windows from their own concepts and from another window's.

    python sample.py --ckpt=out/tiny_diffusion/ckpt.pt --out=out/tiny_diffusion/samples.json
    python tools/sample_quality.py --samples=out/tiny_diffusion/samples.json [--control_windows=64]
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT)  # noqa
import json
import re
from itertools import groupby

import numpy as np
import torch

import common

samples = 'out/tiny_diffusion/samples.json'  # what sample.py --out=... wrote
data_dir = ''              # the training data, if not where the samples' checkpoint records it
bigram_tokens = 4_000_000  # the training-bigram set is built from at most this many training tokens
control_windows = 64       # validation windows (one batch) of the concepts control; 0: none
device = ''                # '': the device the samples were drawn on (the control's numbers depend on it)
exec(open(os.path.join(ROOT, 'configurator.py')).read())
WORDS = re.compile(r"\w+")


def training_bigrams(tok, tokens, eod_id):
    """-> (word -> number, set of the word bigrams of each training document): a bigram is one int64
    (first word's number << 31 | second's), which keeps the set small."""
    word_id, codes = {}, [np.zeros(0, dtype=np.int64)]
    for doc in tok.decode(np.asarray(tokens)).split(tok.decode([eod_id])):
        ids = np.array([word_id.setdefault(w, len(word_id)) for w in WORDS.findall(doc)], dtype=np.int64)
        codes.append(ids[:-1] * (1 << 31) + ids[1:])
    return word_id, set(np.concatenate(codes).tolist())


def unigram(train_tokens, val_tokens, vocab_size, special_ids):
    """-> (token counts of the training split, specials zeroed; nats per token of the validation split's
    non-special tokens under those counts, add-one smoothed): what a model of token frequencies alone reaches."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(train_tokens), 1 << 24):  # in chunks: bincount would copy a large split as int64
        counts += np.bincount(np.asarray(train_tokens[start:start + (1 << 24)]), minlength=vocab_size)
    counts[special_ids] = 0
    p = (counts + 1) / (counts.sum() + vocab_size - len(special_ids))
    val = np.asarray(val_tokens)
    return counts, float(-np.log(p[val[~np.isin(val, special_ids)]]).mean())


def quality_row(name, ids, texts, bigrams):
    """One line of the table: the longest run of one token back to back ("the the the" is 3), the mean share
    of distinct tokens (low for text that repeats itself), the share of the texts' word bigrams seen in training."""
    word_id, codes = bigrams
    pairs = [(word_id.get(a), word_id.get(b)) for words in map(WORDS.findall, texts) for a, b in zip(words, words[1:])]
    seen = sum(a is not None and b is not None and a * (1 << 31) + b in codes for a, b in pairs)
    longest = max((len(list(run)) for s in ids for _, run in groupby(s)), default=0)
    distinct = np.mean([len(set(s)) / max(1, len(s)) for s in ids])
    return f"{name:<34} {longest:>11d} {distinct:>14.2f} {seen / max(1, len(pairs)):>14.2f} ({len(pairs)} bigrams)"


for key, least in {'bigram_tokens': 1, 'control_windows': 0}.items():
    if not globals()[key] >= least:
        raise common.InputError(f"{key}={globals()[key]!r} must be >= {least}")
try:
    with open(samples, encoding='utf-8') as f:
        run = json.load(f)
    ckpt, settings, drawn = run['ckpt'], run['settings'], [s['ids'] for s in run['samples']]
    seed, length = settings['seed'], settings['length']
except (OSError, ValueError, KeyError, TypeError) as e:
    raise common.InputError(f"--samples={samples} is not a samples file ({common.cause(e)}); write one with python "
                            f"sample.py --ckpt=<a diffusion checkpoint> --out={samples}")
device = common.resolve_device(device or settings['device'])
model, checkpoint = common.load_model(ckpt, ckpt, device)
tok = common.checkpoint_tokenizer(checkpoint, data_dir or settings['data_dir'])
# an export's data_dir holds only its tokenizer; it records its training data as trained_on
data_dir = data_dir or settings['data_dir'] or checkpoint.get('trained_on') or checkpoint['data_dir']
if not os.path.exists(os.path.join(data_dir, 'meta.json')):
    raise common.InputError(f"the training data of {ckpt} ({data_dir}) is not on this machine; pass --data_dir=<it>")
meta = common.load_meta(data_dir)
common.check_vocab(checkpoint, meta, ckpt, data_dir)
train_tokens, _ = common.open_split(data_dir, 'train', meta)
val_tokens, val_starts = common.open_split(data_dir, 'val', meta)
cfg, block_size = model.cfg, model.cfg.block_size

# the references: the starts of validation documents, and tokens drawn from the training unigram distribution
counts, unigram_ce = unigram(train_tokens, val_tokens, cfg.vocab_size, cfg.special_ids)
n_ref = max(len(drawn), 32)
val_ends = list(val_starts[1:]) + [len(val_tokens)]
real = [val_tokens[a:a + length].tolist() for a, b in zip(val_starts, val_ends) if b - a > length]
real = [[i for i in ids if i not in cfg.special_ids] for ids in real[:n_ref]]
unigram_samples = np.random.default_rng(seed).choice(len(counts), (n_ref, length), p=counts / counts.sum()).tolist()
n_bigram_tokens = min(len(train_tokens), bigram_tokens)
bigrams = training_bigrams(tok, train_tokens[:n_bigram_tokens], cfg.eod_id)
print(f"quality ({length} tokens each; word bigrams looked up in the first {n_bigram_tokens:,} training tokens):")
print(f"{'':<34} {'longest run':>11} {'distinct share':>14} {'bigrams seen':>14}")
for name, ids in ((f"these {len(drawn)} samples", drawn), (f"{len(real)} validation documents' starts", real),
                  (f"{n_ref} unigram samples", unigram_samples)):
    if ids:
        print(quality_row(name, ids, [tok.decode(s) for s in ids], bigrams))
line = f"validation unigram cross-entropy: {unigram_ce:.3f} nats/token"
if cfg.condition != 'clean' and checkpoint.get('best_val_loss') is not None:
    bound = checkpoint['best_val_loss']
    line += (f"; this run's best val_nll_bound: {bound:.3f}, {abs(unigram_ce - bound):.3f} nats "
             f"{'under' if bound < unigram_ce else 'above'} it")
print(line)
n_windows = min(control_windows, len(val_tokens) // block_size)
if n_windows >= 2 and not model.standard and cfg.condition != 'clean':  # one batch, the same noise for both
    windows = torch.as_tensor(val_tokens[:n_windows * block_size].astype(np.int64)).view(n_windows, -1).to(device)
    own, swapped = (model.nll_bound(windows, generator=torch.Generator(device=device).manual_seed(seed),
                                    swap_concepts=swap) for swap in (False, True))
    own, swapped = own[0] / own[1], swapped[0] / swapped[1]
    print(f"NLL bound on {n_windows} validation windows: {own:.3f} from their own concepts, "
          f"{swapped:.3f} from another window's: the concepts carry {swapped - own:.3f} nats/token")
