"""
GLUE and IMDB for a checkpoint of any stage and either arm: a small head fine-tuned on each task, the
frozen encoder read by a linear probe, or sentence similarity zero-shot; every score beside its
controls: 'majority', 'bow' (tf-idf uni- and bigrams, the probe's linear model) and with
--control=random_init the same head on the untrained architecture.

    python eval_glue.py --ckpt=out/tiny_mlm/ckpt.pt --task_dir=glue_data --tasks=stsb,mrpc,rte,sst2,cola
    python eval_glue.py --ckpt=out/h512l6_mlm/ckpt.pt --tasks=glue --seeds=1,2,3 --device=cuda  # the hub
    python eval_glue.py --make_imdb_split=aclimdb/IMDB/train.tsv --task_dir=imdb_data  # then --tasks=imdb
    from eval_glue import encode; emb = encode(["a sentence"], 'out/tiny_mlm/ckpt.pt')  # (1, n_embd)

Protocol after crammedBERT (Geiping & Goldstein 2023): 5 epochs (3 for the large tasks), batch 16, 10%
warmup then cosine, AdamW (0.9, 0.98), lr 1e-4 for the encoder and 1e-3 for the new head, 128 tokens
(imdb: whole reviews). The headline is the LAST epoch (mean and std over seeds); the best epoch, chosen
on the reported set and so optimistic, stands beside it. Scores x100, in --out: {"run": what makes the
scores, "results": {task: entry}}.
"""
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter, namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import prepare_data
from model import Classifier, pair_features, pooled

# ----------------------------------------------------------------------------------------------
# defaults (python eval_glue.py --key=value; see configurator.py)
ckpt = 'out/tiny_mlm/ckpt.pt'  # a checkpoint of any stage: a ckpt.pt, an export folder or a hub id
task_dir = ''                  # '' = the Hugging Face hub; else a folder in the GLUE layout
data_dir = ''                  # where the checkpoint's tokenizer lives if its data directory moved
tasks = 'glue'                 # comma-separated names, 'glue' (the 8 GLUE tasks but WNLI) or 'all' (but imdb)
head = 'pair'                  # 'pair' | 'pool' | 'decoder' | 'probe' (frozen, linear) | 'cosine' (zero-shot)
control = ''                   # 'random_init': also run the same protocol on the untrained architecture
seeds = '42'                   # comma-separated, e.g. '1,2,3': one run each, mean and std reported
epochs = 0                     # 0 = the task's default (TASKS)
learning_rate = 1e-4           # the pretrained encoder's (crammedBERT's 4e-5 suits an already good BERT-base)
head_learning_rate = 1e-3      # the new head's, which starts from nothing; 0 = learning_rate
batch_size = 16                # crammedBERT: large fine-tuning batches hurt
eval_batch_size = 128
max_len = 128                  # tokens per sequence (a packed pair: both texts); imdb reads whole texts
warmup_steps = -1              # -1 = 10% of the run's steps; then cosine decay to 0
weight_decay = 0.0             # crammedBERT and HF run_glue
grad_clip = 1.0                # 0 disables clipping
dropout = 0.1                  # in the encoder and the head while fine-tuning (BERT's)
max_train_examples = 0         # 0 = all; else a fixed random subset (the same for every seed): quick runs
max_eval_examples = 0          # 0 = all; else a fixed random subset
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'mps'
dtype = 'bfloat16'             # 'float32' | 'bfloat16' | 'float16' (autocast)
out = ''                       # results JSON; '' = glue_<head>.json beside the checkpoint
progress = True                # tqdm bars on stderr and a line per epoch
make_imdb_split = ''           # IMDB's train.tsv: write <task_dir>/IMDB/train.tsv and dev.tsv from it, and stop
imdb_exclude = ''              # with it: a pretraining corpus whose documents never go to dev.tsv (they stay in train)
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
HPARAMS = {k: DEFAULTS[k] for k in ('epochs', 'learning_rate', 'head_learning_rate', 'batch_size', 'eval_batch_size',
                                    'max_len', 'warmup_steps', 'weight_decay', 'grad_clip', 'dropout')}
RUN_SETTINGS = (*HPARAMS, 'max_train_examples', 'max_eval_examples', 'dtype')  # results merge where these agree
CHOICES = {'head': ('pool', 'pair', 'decoder', 'probe', 'cosine'), 'control': ('', 'random_init')}  # beside common's

# ----------------------------------------------------------------------------------------------
# tasks: metrics (the first picks the best epoch); labels: how many (1 = a regression score) or the
# words the local files write, in the hub's order; default epochs; the local folder, whether its files
# open with a header line, the columns of text a, text b (None: one text) and the label; the hub's
# columns a, b (None: not on the hub); tokens per text (None: --max_len, inf: the whole text);
# evaluation sets besides {task: ('dev', 'validation')}: {name: (file, hub split)}
Task = namedtuple('Task', 'metrics labels epochs folder header a b y hub length evals', defaults=(None, None))
_NLI, _NLI2 = ('entailment', 'neutral', 'contradiction'), ('entailment', 'not_entailment')
TASKS = {
    'cola': Task(('mcc',), 2, 5, 'CoLA', False, 3, None, 1, ('sentence', None)),
    'sst2': Task(('accuracy',), 2, 5, 'SST-2', True, 0, None, 1, ('sentence', None)),
    'mrpc': Task(('f1', 'accuracy'), 2, 5, 'MRPC', True, 3, 4, 0, ('sentence1', 'sentence2')),
    'qqp': Task(('f1', 'accuracy'), 2, 3, 'QQP', True, 3, 4, 5, ('question1', 'question2')),
    'stsb': Task(('pearson', 'spearman'), 1, 5, 'STS-B', True, 7, 8, -1, ('sentence1', 'sentence2')),
    'mnli': Task(('accuracy',), _NLI, 3, 'MNLI', True, 8, 9, -1, ('premise', 'hypothesis'),
                 evals={'mnli_m': ('dev_matched', 'validation_matched'),
                        'mnli_mm': ('dev_mismatched', 'validation_mismatched')}),
    'qnli': Task(('accuracy',), _NLI2, 3, 'QNLI', True, 1, 2, -1, ('question', 'sentence')),
    'rte': Task(('accuracy',), _NLI2, 5, 'RTE', True, 1, 2, -1, ('sentence1', 'sentence2')),
    'wnli': Task(('accuracy',), 2, 5, 'WNLI', True, 1, 2, -1, ('sentence1', 'sentence2')),
    # 23k training reviews of 231 words on average, 5.3M words an epoch: as large as qnli, which gets 3
    'imdb': Task(('accuracy',), 2, 3, 'IMDB', True, 1, None, 2, None, math.inf),
}
PRESETS = {'glue': 'cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte', 'all': ','.join(t for t in TASKS if t != 'imdb')}


def n_labels(task):
    labels = TASKS[task].labels
    return len(labels) if isinstance(labels, tuple) else labels


def parse_label(task, text):
    """A label field as an int class or a float score; None if it is not one."""
    labels = TASKS[task].labels
    try:
        if isinstance(labels, tuple):
            return labels.index(text.strip().lower())
        value = float(text) if labels == 1 else int(text)
    except ValueError:
        return None
    return value if (math.isfinite(value) if labels == 1 else 0 <= value < labels) else None


def make_split(a, b, labels, task):
    return {'a': a, 'b': b, 'label': np.asarray(labels, dtype=np.float32 if n_labels(task) == 1 else np.int64)}


def read_tsv(path):
    """The rows of a tab-separated file, quoting off as GLUE's files are meant: quotes are text and a
    row ends only at a line end (\\n or \\r\\n; \\r in a file without \\n, as old Macs wrote)."""
    if not os.path.isfile(path):
        raise common.InputError(f"{path} not found; --task_dir must hold the GLUE layout (<TASK>/train.tsv, dev.tsv, "
                                f"IMDB/train.tsv, dev.tsv), or '' for the hub")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        text = raw.decode('utf-8-sig', errors='replace')
        print(f"note: {path} is not UTF-8: {text.count(chr(0xFFFD))} undecodable bytes read as U+FFFD (re-encode it)")
    lines = text.split('\n') if '\n' in text else text.split('\r')
    return [line.rstrip('\r').split('\t') for line in lines if line.strip()]


def read_file(task, path):
    """[(text a, text b or None, label)] of a file in the GLUE layout, the label None for a row to skip:
    one of another width than the file's, or with an unreadable label (QQP has a few). A file whose
    first row's label reads as a label has lost its header line: that row is an example."""
    t, rows = TASKS[task], read_tsv(path)
    n_cols = need = max(c for c in (t.a, t.b, t.y) if c is not None) + 1  # the columns a row must have
    if t.header and rows:  # all but CoLA
        if len(rows[0]) < need:
            raise common.InputError(f"{path} has {len(rows[0])} tab-separated columns, but {task} reads column "
                                    f"{need - 1} (0-based); use the task's original files or --task_dir=''")
        n_cols = len(rows[0])
        if parse_label(task, rows[0][t.y]) is None:
            rows = rows[1:]
        else:
            print(f"note: {path} has no header line; its first row is read as data")
    return [(row[t.a], None if t.b is None else row[t.b], parse_label(task, row[t.y])) if len(row) == n_cols
            else (None, None, None) for row in rows]


def read_hub(task):
    """The task's splits from the Hugging Face hub; any failure (offline, a renamed dataset) is one line."""
    if TASKS[task].hub is None:
        raise common.InputError(f"{task} is not read from the hub: pass --task_dir=<a folder with "
                                f"{TASKS[task].folder}/train.tsv and dev.tsv>"
                                + (" (--make_imdb_split makes them)" if task == 'imdb' else ''))
    import datasets
    try:
        return datasets.load_dataset('nyu-mll/glue', task)
    except Exception as e:  # noqa: BLE001 - no network, a renamed dataset: the same advice
        raise common.InputError(f"could not load {task} from the Hugging Face hub (nyu-mll/glue: "
                                f"{common.first_line(e)}); offline? download the data once and pass --task_dir=DIR "
                                f"in the GLUE layout (DIR/<TASK>/train.tsv, dev.tsv)") from None


def subset(split, n, seed=0):
    """A fixed random subset of n examples (in file order); GLUE files are often sorted."""
    if n <= 0 or n >= len(split['label']):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split['label']))[:n])
    b = None if split['b'] is None else [split['b'][i] for i in keep]
    return {'a': [split['a'][i] for i in keep], 'b': b, 'label': split['label'][keep]}


def load_task(task, root='', max_train=0, max_eval=0):
    """Everything evaluate_task needs to know about a task, its splits read from the GLUE layout under
    root, or from the hub if root is ''; a row without a usable label is skipped and counted."""
    if task not in TASKS:
        raise common.InputError(f"unknown task '{task}'; choose from {', '.join(TASKS)}, or 'glue' / 'all'")
    t, n = TASKS[task], n_labels(task)
    hub, splits, skipped = None if root else read_hub(task), {}, {}
    for name, (stem, split) in {'train': ('train', 'train'), **(t.evals or {task: ('dev', 'validation')})}.items():
        if root:
            rows = read_file(task, os.path.join(root, t.folder, f'{stem}.tsv'))
        else:  # [:]: a plain list, fast; the hub's test splits write the label -1
            d = hub[split]
            rows = [(a, b, y if y is not None and (n == 1 or 0 <= y < n) else None) for a, b, y in
                    zip(d[t.hub[0]][:], d[t.hub[1]][:] if t.hub[1] else [None] * len(d), d['label'][:])]
        kept = [row for row in rows if row[2] is not None]
        splits[name] = make_split([a for a, _, _ in kept], None if t.b is None else [b for _, b, _ in kept],
                                  [y for _, _, y in kept], task)
        skipped[f'{stem}.tsv' if root else split] = len(rows) - len(kept)
    train = splits.pop('train')
    if len(train['label']) == 0 or any(len(e['label']) == 0 for e in splits.values()):
        expected = ('that is a number (a similarity score)' if n == 1 else f"word, one of {', '.join(t.labels)}"
                    if isinstance(t.labels, tuple) else f"from 0 to {n - 1}")
        raise common.InputError(f"{task}: no usable examples in {root or 'the hub data'} ({skipped} skipped); each "
                                f"row needs the task's columns and a label {expected}")
    return {'task': task, 'metrics': t.metrics, 'n_labels': n, 'epochs': t.epochs, 'length': t.length,
            'train': subset(train, max_train), 'evals': {k: subset(v, max_eval) for k, v in splits.items()},
            'skipped': skipped}


def split_imdb(train_tsv, out_folder, n_dev=2000, seed=0, exclude=''):
    """IMDB's labelled reviews come as one train.tsv: n_dev of them become dev.tsv, each with its exact
    repeats, so dev shares no id and no text with train; a document of the corpus `exclude` (a pretraining
    corpus) is never in dev. Writes <out_folder>/IMDB/ whole or not at all."""
    folder = os.path.join(out_folder, 'IMDB')
    if not out_folder or os.path.exists(folder):
        raise common.InputError(f"{folder} exists: a split is made once (its dev text kept out of pretraining); choose "
                                f"another --task_dir" if out_folder else "--make_imdb_split writes <task_dir>/IMDB/: "
                                "pass --task_dir")
    rows = read_tsv(train_tsv)
    if not rows or rows[0][:3] != ['id', 'sentence', 'label'] or len({r[0] for r in rows}) < len(rows):
        raise common.InputError(f"{train_tsv} is not IMDB's train.tsv: the header id<TAB>sentence<TAB>label, then one "
                                f"review per line, each with its own id")
    if not 0 < n_dev < len(rows) - 1:
        raise common.InputError(f"{train_tsv} has {len(rows) - 1} reviews, too few for a dev split of {n_dev}")
    groups = {}
    for i, row in enumerate(rows[1:], 1):
        groups.setdefault(row[1] if len(row) > 1 else row[0], []).append(i)
    seen = set(prepare_data.local_texts(exclude)) if exclude else set()
    kept = [g for text, g in groups.items() if text not in seen]
    dev = set()
    for g in np.random.default_rng(seed).permutation(len(kept)):
        if len(dev) >= n_dev:
            break
        dev.update(kept[g])
    parts = {'train.tsv': [i for i in range(1, len(rows)) if i not in dev], 'dev.tsv': sorted(dev)}

    def write(tmp):
        os.makedirs(tmp)
        for name, part in parts.items():
            with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                f.writelines('\t'.join(rows[i]) + '\n' for i in [0] + part)
    os.makedirs(out_folder, exist_ok=True)
    common.atomic_write(folder, write)
    print(f"wrote {folder}: train.tsv {len(parts['train.tsv'])} reviews, dev.tsv {len(dev)}, no id or text in both"
          + (f", {len(groups) - len(kept)} reviews of {exclude} kept out of dev" if exclude else '') + "; "
          f"keep dev.tsv's text out of pretraining, and evaluate with --task_dir={out_folder} --tasks=imdb")


# ----------------------------------------------------------------------------------------------
# metrics: numpy only; each a fraction in [0, 1] or a correlation in [-1, 1]

def accuracy(pred, label):
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def confusion(pred, label):
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    return [int(np.sum(p & q)) for p, q in ((pred, label), (pred, ~label), (~pred, label), (~pred, ~label))]


def f1(pred, label):
    """F1 of the positive class 1 (paraphrase, duplicate); 0 when nothing is predicted positive."""
    tp, fp, fn, _ = confusion(pred, label)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(pred, label):
    """Matthews correlation, binary; 0 for a constant prediction (the usual convention)."""
    tp, fp, fn, tn = confusion(pred, label)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y):
    """Pearson correlation; 0 when either side is constant (a majority-style prediction)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.sum(dx * dx) * np.sum(dy * dy)))
    return float(np.sum(dx * dy) / denom) if denom > 0 else 0.0


def rankdata(x):
    """Ranks 1..n, tied values sharing the average of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind='stable')] = np.arange(1, len(x) + 1)
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, weights=ranks) / np.bincount(group))[group]


METRICS = {'mcc': mcc, 'accuracy': accuracy, 'f1': f1, 'pearson': pearson,
           'spearman': lambda x, y: pearson(rankdata(x), rankdata(y))}


def score(pred, label, metrics):
    """{metric: value x 100}, rounded: more digits than this are noise."""
    return {m: round(100.0 * METRICS[m](pred, label), 4) for m in metrics}


def majority(train_label, eval_label, n_labels, metrics):
    """The scores of always answering the train split's most frequent label (regression: its mean)."""
    answer = (float(np.mean(train_label)) if n_labels == 1 else
              int(np.bincount(train_label, minlength=n_labels).argmax()))
    return score(np.full(len(eval_label), answer), eval_label, metrics)


# ----------------------------------------------------------------------------------------------
# token ids, once per task, and length-bucketed batches

def max_tokens(task_len, max_len):
    """Tokens per sequence: the task's own (imdb: inf, the whole text) or max_len. Positions are
    sinusoids, so a model reads past its training window; how well is in docs/LOG.md."""
    return max_len if task_len is None else min(task_len, sys.maxsize)  # sys.maxsize: a slice bound


def check_max_len(max_len, joined_pair):
    need, form = (4, "'[cls] a [sep] b'") if joined_pair else (2, "'[cls] text'")
    if not max_len >= need:
        raise common.InputError(f"max_len={max_len!r} is too short: {form} needs max_len >= {need} to keep a token "
                                f"of each text; the default is 128")


def tokenize(tok, split, joined, max_len):
    """{'x': ids, 'x_b': ids or None, 'pad': pad id}. joined: '[cls] a [sep] b' in one sequence (pool
    and decoder heads), the longer text cut first as BERT does; else '[cls] a' and '[cls] b' apart."""
    cls, sep = tok.cls_id, tok.sep_id
    ids_a = tok.encode_batch(split['a'])
    ids_b = None if split['b'] is None else tok.encode_batch(split['b'])
    if ids_b is None or not joined:
        return {'x': [[cls] + a[:max_len - 1] for a in ids_a], 'pad': tok.pad_id,
                'x_b': None if ids_b is None else [[cls] + b[:max_len - 1] for b in ids_b]}
    x, budget = [], max_len - 2
    for a, b in zip(ids_a, ids_b):
        if len(a) + len(b) > budget:
            keep_b = min(len(b), max(budget - len(a), budget // 2))
            a, b = a[:budget - keep_b], b[:keep_b]
        x.append([cls] + a + [sep] + b)
    return {'x': x, 'x_b': None, 'pad': tok.pad_id}


def length_batches(enc, batch_size, rng=None):
    """Index arrays of examples of about the same length, so that little compute goes to padding. With
    rng (training): shuffled, sorted only within windows of 50 batches, the batches shuffled."""
    lengths = np.asarray([len(x) for x in enc['x']] if enc['x_b'] is None else
                         [len(a) + len(b) for a, b in zip(enc['x'], enc['x_b'])])
    if rng is None:
        order = np.argsort(lengths, kind='stable')
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm, window, out = rng.permutation(len(lengths)), 50 * batch_size, []
    for s in range(0, len(perm), window):
        part = perm[s:s + window]
        part = part[np.argsort(lengths[part], kind='stable')]
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def batch_inputs(enc, rows, device):
    """(idx (B, L) long, mask (B, L) bool) for each text of the examples rows, padded with the pad id."""
    inputs = ()
    for seqs in (enc['x'], enc['x_b']):
        if seqs is not None:
            lens = torch.tensor([len(seqs[i]) for i in rows])
            idx = torch.full((len(rows), int(lens.max())), enc['pad'], dtype=torch.long)
            for j, i in enumerate(rows):
                idx[j, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            inputs += (idx.to(device), (torch.arange(idx.shape[1])[None, :] < lens[:, None]).to(device))
    return inputs


@torch.no_grad()
def run_batched(module, fn, enc, width, batch_size, device='cpu', autocast=nullcontext()):
    """fn(*batch inputs) for every example, module in eval mode: (n, width) float32 on the CPU, in input order."""
    module.eval()
    out = torch.empty(len(enc['x']), width)
    for rows in length_batches(enc, batch_size):
        with autocast:
            z = fn(*batch_inputs(enc, rows, device))
        out[torch.as_tensor(rows)] = z.float().cpu()
    return out


def embed(model, seqs, pad_id, batch_size=64, device='cpu', autocast=nullcontext()):
    """The mean-pooled states of each sequence (pooled()): (n, H)."""
    return run_batched(model, lambda idx, mask: pooled(model, idx, mask), {'x': seqs, 'x_b': None, 'pad': pad_id},
                       model.cfg.n_embd, batch_size, device, autocast)


# ----------------------------------------------------------------------------------------------
# linear models on fixed features: the probe head and the bag-of-words control share them

REG_GRID = tuple(10.0 ** k for k in range(2, -6, -1))  # λ candidates, strongest first (warm starts go down the grid)
HOLDOUT_FRACTION = 0.2  # of the training split, carved once with a fixed seed, picks λ: the dev set never does


def matmul(X, W):
    return torch.sparse.mm(X, W) if X.is_sparse else X @ W


def fit_ridge(X, y, lam):
    """Ridge regression in closed form: argmin (1/n)||Xw + b - y||² + λ||w||², the bias free. Solved
    in the primal (d x d) when d <= n, else in the dual (n x n), where a sparse X (the bag of words)
    never becomes dense: the centring is folded into the Gram matrix."""
    X, y = X.double(), torch.as_tensor(y, dtype=torch.float64)
    n, d = X.shape
    mu = (torch.sparse.sum(X, 0).to_dense() if X.is_sparse else X.sum(0)) / n      # (d,)
    y_mean = y.mean()
    if d <= n and not X.is_sparse:
        Xc = X - mu
        w = torch.linalg.solve(Xc.T @ Xc / n + lam * torch.eye(d, dtype=X.dtype), Xc.T @ (y - y_mean) / n)
        return w, y_mean - mu @ w
    with warnings.catch_warnings():  # torch flags its sparse @ sparse product as beta; the result is exact
        warnings.simplefilter('ignore', UserWarning)
        gram = torch.sparse.mm(X, X.t().coalesce()).to_dense() if X.is_sparse else X @ X.T  # (n, n)
    m = matmul(X, mu[:, None])[:, 0]  # Xc Xcᵀ = X Xᵀ - m 1ᵀ - 1 mᵀ + |μ|², with m = X μ
    K = gram - m[:, None] - m[None, :] + mu @ mu
    alpha = torch.linalg.solve(K / n + lam * torch.eye(n, dtype=X.dtype), (y - y_mean) / n)
    w = matmul(X.t().coalesce() if X.is_sparse else X.T, alpha[:, None])[:, 0] - mu * alpha.sum()
    return w, y_mean - mu @ w


def fit_logistic(X, y, n_classes, lam, init=None):
    """Multinomial logistic regression by L-BFGS: mean cross-entropy + (λ/2)||W||², the bias free;
    init (W, b) warm-starts it."""
    X = X.float() if not X.is_sparse else X.coalesce().float()
    y = torch.as_tensor(y, dtype=torch.long)
    W = (init[0].clone() if init else torch.zeros(X.shape[1], n_classes)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(n_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=100, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-7, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(matmul(X, W) + b, y) + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


def linear_outputs(model, X):
    """(n, classes) logits, or (n,) scores for a regression."""
    w, b = model
    out = matmul(X.to(w.dtype), w if w.dim() == 2 else w[:, None]) + b
    return out[:, 0] if w.dim() == 1 else out


def linear_predict(model, X):
    out = linear_outputs(model, X)
    return (out if out.dim() == 1 else out.argmax(-1)).numpy()  # class ids, or scores for a regression


def holdout_split(n, seed=0):
    """(fit rows, holdout rows): a fixed random HOLDOUT_FRACTION of the training split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, round(HOLDOUT_FRACTION * n)) if n > 1 else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def fit_probe(X, y, n_labels, metrics):
    """The probe's linear model: λ chosen on a holdout of the training split by its first metric (ties,
    common on a small holdout: by its loss), then refitted on the whole split. -> (model, λ)."""
    def fit(X, y, lam, init):
        return fit_ridge(X, y, lam) if n_labels == 1 else fit_logistic(X, y, n_labels, lam, init)

    def rows(r):
        return X.index_select(0, torch.as_tensor(r)).coalesce() if X.is_sparse else X[torch.as_tensor(r)]
    fit_rows, hold_rows = holdout_split(len(y))
    best, best_lam, best_model, init = None, REG_GRID[0], None, None
    if len(hold_rows):
        X_fit, X_hold, y_hold = rows(fit_rows), rows(hold_rows), y[hold_rows]
        for lam in REG_GRID:
            model = fit(X_fit, y[fit_rows], lam, init)
            init = model if n_labels > 1 else None
            out = linear_outputs(model, X_hold)
            loss = (float(((out - torch.as_tensor(y_hold, dtype=out.dtype)) ** 2).mean()) if out.dim() == 1 else
                    float(F.cross_entropy(out.float(), torch.as_tensor(y_hold, dtype=torch.long))))
            s = (score(linear_predict(model, X_hold), y_hold, metrics[:1])[metrics[0]], -loss)
            if best is None or s > best:
                best, best_lam, best_model = s, lam, model
    return fit(X, y, best_lam, best_model if n_labels > 1 else None), best_lam


def feature_stats(train):
    """(mean, std) per feature of the training features; a constant feature's std is 1."""
    mean, std = train.mean(0), train.std(0)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


# ----------------------------------------------------------------------------------------------
# the bag-of-words control: tf-idf of word unigrams and bigrams, the probe's own linear model

def ngrams(text):
    words = re.findall(r"\w+", text.lower())
    return words + [f"{u} {v}" for u, v in zip(words, words[1:])]


class TfIdf:
    """tf-idf of unigrams and bigrams fitted on the training texts: n-grams in at least min_df of them,
    idf = ln((1 + n) / (1 + df)) + 1, rows L2-normalised (scikit-learn's TfidfVectorizer, min_df=2)."""

    def __init__(self, texts, min_df=2):
        df = Counter(g for text in texts for g in set(ngrams(text)))
        kept = sorted(g for g, c in df.items() if c >= min_df)
        self.index = {g: i for i, g in enumerate(kept)}
        self.idf = {g: math.log((1 + len(texts)) / (1 + df[g])) + 1 for g in kept}

    def rows(self, texts):
        """One {column: weight} dict per text."""
        out = []
        for text in texts:
            counts = Counter(g for g in ngrams(text) if g in self.index)
            row = {self.index[g]: c * self.idf[g] for g, c in counts.items()}
            norm = math.sqrt(sum(v * v for v in row.values())) or 1.0
            out.append({k: v / norm for k, v in row.items()})
        return out


def bow_features(vec, split):
    """tf-idf rows of a split, for a pair [a; b; |a - b|; a ⊙ b] over the vocabulary: sparse (n, V or 4V)."""
    V, rows = len(vec.index), vec.rows(split['a'])
    if split['b'] is not None:
        rows = [{**a, **{V + k: v for k, v in b.items()},
                 **{2 * V + k: abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys()
                    if a.get(k, 0.0) != b.get(k, 0.0)},
                 **{3 * V + k: a[k] * b[k] for k in a.keys() & b.keys()}} for a, b in zip(rows, vec.rows(split['b']))]
    idx = torch.tensor([[i for i, row in enumerate(rows) for _ in row], [k for row in rows for k in row]],
                       dtype=torch.long).reshape(2, -1)
    values = torch.tensor([x for row in rows for x in row.values()], dtype=torch.float64)
    return torch.sparse_coo_tensor(idx, values, (len(rows), V if split['b'] is None else 4 * V),
                                   check_invariants=False).coalesce()


def bow_baseline(data):
    """{eval name: ({metric: value}, λ)} of the tf-idf linear model on the task's own training
    examples: the bar a representation must clear to have learned more than its words."""
    train = data['train']
    vec = TfIdf(train['a'] + (train['b'] or []))
    if not vec.index:  # no n-gram occurs twice: nothing to learn from, the majority answer
        return {name: (majority(train['label'], e['label'], data['n_labels'], data['metrics']), None)
                for name, e in data['evals'].items()}
    model, lam = fit_probe(bow_features(vec, train), train['label'], data['n_labels'], data['metrics'])
    return {name: (score(linear_predict(model, bow_features(vec, e)), e['label'], data['metrics']), lam)
            for name, e in data['evals'].items()}


# ----------------------------------------------------------------------------------------------
# the heads: fine-tuned, or the encoder frozen (probe, cosine)

def finetune(checkpoint, data, head, seed, hp, device='cpu', autocast=nullcontext(), progress=False,
             dtype='float32', random_init=False):
    """One run: a fresh copy of the model (random_init: untrained) and a new head, trained for the task's
    epochs and scored on every evaluation set after every epoch. -> (scores per epoch, train losses)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, labels, regression = data['train_tok'], data['train']['label'], data['n_labels'] == 1
    # regression targets standardised: a fresh head starts near 0, and would first spend epochs learning
    # a 0-5 score's offset (the correlations do not change)
    y_mean, y_std = (float(labels.mean()), float(labels.std()) or 1.0) if regression else (0.0, 1.0)
    targets = torch.tensor((labels - y_mean) / y_std, dtype=torch.float32) if regression else torch.tensor(labels)
    model, _ = common.load_model(checkpoint, 'the checkpoint', device, dropout=hp['dropout'])
    model = type(model)(model.cfg).to(device) if random_init else model  # untrained: drawn from this seed
    pair = head == 'pair' and train['x_b'] is not None
    clf = Classifier(model, head, data['n_labels'], pair, hp['dropout']).to(device)
    n_epochs = hp['epochs'] or data['epochs']
    total = n_epochs * math.ceil(len(train['x']) / hp['batch_size'])
    warmup = hp['warmup_steps'] if hp['warmup_steps'] >= 0 else round(0.1 * total)
    head_params, groups = {id(p) for p in clf.head_parameters()}, []
    for is_head in (False, True):  # the new head starts from nothing: its own, larger learning rate
        lr = (hp['head_learning_rate'] or hp['learning_rate']) if is_head else hp['learning_rate']
        part = [p for p in clf.parameters() if p.requires_grad and (id(p) in head_params) == is_head]
        groups += [{'params': [p for p in part if p.dim() >= 2], 'weight_decay': hp['weight_decay'], 'base_lr': lr},
                   {'params': [p for p in part if p.dim() < 2], 'weight_decay': 0.0, 'base_lr': lr}]
    device_type = common.device_type(str(device))
    optimizer = torch.optim.AdamW(groups, lr=hp['learning_rate'], betas=(0.9, 0.98), eps=1e-6,
                                  fused=device_type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    history, losses, step = [], [], 0
    for epoch in range(n_epochs):
        clf.train()
        batches = length_batches(train, hp['batch_size'], rng)
        loss_sum = 0.0
        for rows in (bar := tqdm(batches, desc=f"{data['task']} seed {seed} epoch {epoch + 1}/{n_epochs}",
                                 leave=False, disable=not progress)):
            for group in optimizer.param_groups:  # warmup then cosine, for every group
                group['lr'] = common.get_lr(step, 1.0, 0.0, warmup, total) * group['base_lr']
            with autocast:
                o = clf(*batch_inputs(train, rows, device))
            y = targets[torch.as_tensor(rows)].to(device)
            loss = F.mse_loss(o.float().squeeze(-1), y) if regression else F.cross_entropy(o.float(), y)
            scaler.scale(loss).backward()
            if hp['grad_clip'] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(clf.parameters(), hp['grad_clip'])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item()  # a sync per step: negligible at fine-tuning sizes
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        losses.append(round(loss_sum / max(1, len(batches)), 5))
        scores = {}
        for name, enc in data['evals_tok'].items():
            o = run_batched(clf, clf, enc, clf.out.out_features, hp['eval_batch_size'], device, autocast).numpy()
            scores[name] = score(o[:, 0] * y_std + y_mean if regression else o.argmax(-1),
                                 data['evals'][name]['label'], data['metrics'])
        history.append(scores)
        if progress:
            shown = ', '.join(f"{name} " + ' '.join(f"{m} {v:.1f}" for m, v in s.items()) for name, s in scores.items())
            print(f"{data['task']} seed {seed} epoch {epoch + 1}/{n_epochs}: train loss {losses[-1]:.4f}, {shown}",
                  flush=True)
    return history, losses


def frozen(checkpoint, data, head, seed, hp, device='cpu', autocast=nullcontext(), random_init=False):
    """The encoder read without training -> ([{eval name: scores}], λ or None). probe (SentEval): a linear
    model on standardised mean-pooled features, a pair [a; b; |a - b|; a ⊙ b]; cosine: that of a and b."""
    torch.manual_seed(seed)
    model, _ = common.load_model(checkpoint, 'the checkpoint', device)
    model = type(model)(model.cfg).to(device) if random_init else model

    def embedded(enc):  # (a (n, H), b (n, H) or None)
        return [None if x is None else embed(model, x, enc['pad'], hp['eval_batch_size'], device, autocast)
                for x in (enc['x'], enc['x_b'])]
    if head == 'cosine':
        return [{name: score(F.cosine_similarity(*embedded(enc), dim=-1).numpy(), data['evals'][name]['label'],
                             data['metrics']) for name, enc in data['evals_tok'].items()}], None

    def features(enc):  # (n, H), or (n, 4H) for a pair
        a, b = embedded(enc)
        return a if b is None else pair_features(a, b)
    X = features(data['train_tok'])
    mean, std = feature_stats(X)
    linear, lam = fit_probe((X - mean) / std, data['train']['label'], data['n_labels'], data['metrics'])
    return [{name: score(linear_predict(linear, (features(enc) - mean) / std), data['evals'][name]['label'],
                         data['metrics']) for name, enc in data['evals_tok'].items()}], lam


def summarise(runs, seeds, name, first, metrics):
    """{metric: last-epoch mean over seeds, 'std': {...}, and with more than one epoch 'best_epoch'}."""
    last = {m: [h[-1][name][m] for h, _, _ in runs] for m in metrics}
    entry = {m: round(float(np.mean(v)), 4) for m, v in last.items()}
    entry['std'] = {m: round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else 0.0 for m, v in last.items()}
    if len(runs[0][0]) > 1:  # each run's best epoch, chosen on the first evaluation set's first metric
        best_epochs = [int(np.argmax([e[first][metrics[0]] for e in h])) for h, _, _ in runs]
        best = {m: [h[b][name][m] for (h, _, _), b in zip(runs, best_epochs)] for m in metrics}
        entry['best_epoch'] = {**{m: round(float(np.mean(v)), 4) for m, v in best.items()},
                               'epoch': [b + 1 for b in best_epochs]}
    return {**entry, 'seeds': seeds}


def per_seed(runs, seeds, name):
    """Each seed's scores per epoch and training losses, kept as produced, so runs split across seeds combine."""
    return {str(s): {'scores': [e[name] for e in h], 'train_loss': loss} for s, (h, loss, _) in zip(seeds, runs)}


def evaluate_task(checkpoint, tok, data, head='pool', seeds=(42,), hp=None, device='cpu', autocast=nullcontext(),
                  progress=False, dtype='float32', control=''):
    """The head run once per seed, summarised with the controls beside every score: {eval name: {metric:
    last-epoch mean, 'std', 'best_epoch', 'majority', 'bow', 'random_init', 'n_train', ...}}."""
    hp, t0, is_frozen = {**HPARAMS, **(hp or {})}, time.time(), head in ('probe', 'cosine')
    metrics, n_labels, train = data['metrics'], data['n_labels'], data['train']
    if head == 'cosine' and (n_labels != 1 or train['b'] is None):
        raise common.InputError(f"head=cosine scores sentence similarity (stsb), not {data['task']}")
    length = max_tokens(data.get('length'), hp['max_len'])
    joined = head in ('pool', 'decoder')  # one sequence per example; pair, probe and cosine read a and b apart
    check_max_len(length, joined and train['b'] is not None)
    data['evals_tok'] = {name: tokenize(tok, e, joined, length) for name, e in data['evals'].items()}
    if head != 'cosine':
        data['train_tok'] = tokenize(tok, train, joined, length)

    def run_head(random_init):
        """[(scores per epoch, train losses, probe λ)] and the seeds run: a pretrained probe or cosine is
        deterministic and runs once; every other run (fine-tuning, any random init) draws from its seed."""
        used = list(seeds)[:1] if is_frozen and not random_init else list(seeds)
        if is_frozen:
            return [(history, [], lam) for history, lam in
                    (frozen(checkpoint, data, head, s, hp, device, autocast, random_init) for s in used)], used
        return [(*finetune(checkpoint, data, head, s, hp, device, autocast, progress, dtype, random_init), None)
                for s in used], used
    runs, used_seeds = run_head(False)
    controls = run_head(True) if control == 'random_init' else None
    bow, first, seconds = bow_baseline(data), next(iter(data['evals'])), round(time.time() - t0, 2)
    results = {}
    for name, ev in data['evals'].items():
        entry = {**summarise(runs, used_seeds, name, first, metrics),
                 'majority': majority(train['label'], ev['label'], n_labels, metrics), 'bow': bow[name][0]}
        if controls:
            entry['random_init'] = {**summarise(*controls, name, first, metrics), 'per_seed': per_seed(*controls, name)}
        entry.update({'n_train': 0 if head == 'cosine' else len(train['label']), 'n_eval': len(ev['label']),
                      'seconds': seconds, 'head': head, 'control': control or None,
                      'epochs': 0 if is_frozen else len(runs[0][0]), 'skipped': data['skipped'],
                      'bow_lambda': bow[name][1]})
        if head == 'probe':
            entry['probe_lambda'] = [lam for _, _, lam in runs]
        if not is_frozen:
            entry['per_seed'] = per_seed(runs, used_seeds, name)
        results[name] = entry
    return results


# ----------------------------------------------------------------------------------------------
# reporting, and sentence embeddings for users outside GLUE

def versus(entry, m):
    """The controls a score clears by more than the larger seed spread, and those it does not: '>maj >bow <rand'."""
    marks = []
    for key, short in (('majority', 'maj'), ('bow', 'bow'), ('random_init', 'rand')):
        if key in entry:
            spread = max(entry['std'][m], entry[key].get('std', {}).get(m, 0.0))
            marks.append(('>' if entry[m] > entry[key][m] + spread else '<') + short)
    return ' '.join(marks)


def markdown_table(results):
    """A results file's content ({'run', 'results'}, or an older file's bare {task: entry}) as one row
    per (task, metric): the score (mean ± std over seeds), its best epoch, the controls, which it clears."""
    lines = ['| task | metric | head | score | best epoch | majority | bow | random init | vs controls | n_train | '
             'n_eval | seconds |', '|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|']

    def shown(e, m):
        return f"{e[m]:.1f}" + (f" ± {e['std'][m]:.1f}" if len(e.get('seeds', ())) > 1 else '')
    for name, e in (results['results'] if 'run' in results else results).items():
        for m in (k for k in e if k in METRICS):  # in the task's order: mrpc f1 before accuracy
            best = (f"{e['best_epoch'][m]:.1f} (ep {','.join(map(str, e['best_epoch']['epoch']))})"
                    if 'best_epoch' in e else '-')
            rand = shown(e['random_init'], m) if 'random_init' in e else '-'
            bow = f"{e['bow'][m]:.1f}" if 'bow' in e else '-'  # results files older than the bow control
            lines.append(f"| {name} | {m} | {e['head']} | {shown(e, m)} | {best} | {e['majority'][m]:.1f} | {bow} | "
                         f"{rand} | {versus(e, m)} | {e['n_train']} | {e['n_eval']} | {e['seconds']:.1f} |")
    return '\n'.join(lines)


_encoders = {}  # (checkpoint path, its mtime, device, data_dir) -> (model, tokenizer); the last two used


def encode(texts, ckpt, batch_size=64, device='cpu', max_len=128, data_dir=''):
    """Sentence embeddings (len(texts), n_embd), float32 on the CPU, not normalised: each '[cls] text'
    (max_len tokens) read as the plain mean of the encoder's states, which favours none where no pooling
    was trained; head=cosine scores their cosine. A checkpoint is loaded once (again when it changes)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise common.InputError(f"encode() takes a string or a list of strings, got a {type(bad[0]).__name__} among "
                                f"them")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise common.InputError(f"batch_size={batch_size!r} must be a positive integer")
    check_max_len(max_len, False)
    device = common.resolve_device(device)
    key = (os.path.abspath(ckpt), os.path.getmtime(ckpt) if os.path.exists(ckpt) else None, device, data_dir)
    if key not in _encoders:
        model, checkpoint = common.load_model(ckpt, ckpt, device)
        _encoders[key] = (model, common.checkpoint_tokenizer(checkpoint, data_dir))
        while len(_encoders) > 2:
            del _encoders[next(iter(_encoders))]
    model, tok = _encoders[key]
    seqs = [[tok.cls_id] + ids[:max_len - 1] for ids in tok.encode_batch(texts)]
    return embed(model, seqs, tok.pad_id, batch_size, device) if seqs else torch.empty(0, model.cfg.n_embd)


# ----------------------------------------------------------------------------------------------
# the command line

def existing_results(path, run):
    """The entries of the results file at path that this run merges into ({} if none); a file of
    another run (checkpoint, head or settings), or not of eval_glue.py at all, is refused."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
        old, results = dict(content['run']), dict(content['results'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise common.InputError(f"--out={path} is not a results file that records its run ({type(e).__name__}: "
                                f"{common.first_line(e)}; another program's, or an older eval_glue.py's): choose "
                                f"another --out, or move it away")
    differ = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in run.items() if old.get(k) != v]
    if differ:
        raise common.InputError(f"--out={path} holds the results of another run ({'; '.join(differ)}); merging would "
                                f"mix them in one table: choose another --out")
    return results


def main(config):
    """The command line: every setting checked, then each task evaluated and merged into --out."""
    c, head = config, config['head']
    if c['make_imdb_split']:
        return split_imdb(c['make_imdb_split'], c['task_dir'], exclude=c['imdb_exclude'])
    common.check_settings(c)
    for k, allowed in CHOICES.items():
        if c[k] not in allowed:
            raise common.InputError(f"{k}={c[k]!r}: choose one of {', '.join(map(repr, allowed))}")
    task_list = list(dict.fromkeys(t for name in c['tasks'].split(',')
                                   for t in PRESETS.get(name.strip(), name.strip()).split(',') if t))
    unknown = [t for t in task_list if t not in TASKS]
    if unknown or not task_list:
        raise common.InputError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                                f"{', '.join(TASKS)}, or 'glue' / 'all'")
    parts = [s.strip() for s in str(c['seeds']).split(',') if s.strip()]
    if not parts or not all(p.isascii() and p.isdigit() and int(p) <= common.MAX_SEED for p in parts) \
            or len({int(p) for p in parts}) < len(parts):
        raise common.InputError(f"seeds={c['seeds']!r} must be distinct integers from 0 to 2**63 - 1, comma-separated "
                                f"(e.g. --seeds=1,2,3): each is one run")
    seed_list = [int(p) for p in parts]
    if head == 'cosine' and any(TASKS[t].labels != 1 for t in task_list):
        raise common.InputError(f"head=cosine scores sentence similarity without training: task stsb only, not "
                                f"{', '.join(t for t in task_list if TASKS[t].labels != 1)}")
    for t in task_list if not c['task_dir'] else []:
        if TASKS[t].hub is None:
            read_hub(t)  # the one line that says what to pass
        if c['data_dir'] and os.path.isdir(os.path.join(c['data_dir'], TASKS[t].folder)):  # the name it had before
            raise common.InputError(f"--data_dir={c['data_dir']} holds task folders: pass it as --task_dir (--data_dir "
                                    f"is where the checkpoint's tokenizer lives, if its data directory moved)")
    check_max_len(c['max_len'], head in ('pool', 'decoder') and any(TASKS[t].b is not None for t in task_list))
    ckpt = c['ckpt']
    path = c['out'] or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f'glue_{head}.json')
    common.check_output(path)
    results = {}
    try:
        checkpoint = common.load_checkpoint(ckpt)
        args = checkpoint['model_args']
        if head == 'decoder' and args.get('encoder', 'concept') == 'standard':
            raise common.InputError(f"head=decoder reads a concept decoder, and {ckpt} is a standard-arm checkpoint "
                                    f"(encoder='standard'): it would be an unweighted mean of its token states; "
                                    f"use head=pool, pair or probe")
        run = {'ckpt': ckpt if common.is_hub_id(ckpt) else os.path.abspath(ckpt), 'head': head,
               'iter_num': checkpoint.get('iter_num'), 'seeds': seed_list, **{k: c[k] for k in RUN_SETTINGS}}
        results = existing_results(path, run)
        _, _, _, _, dev, dt = common.init_process(c['device'], c['dtype'], seed_list[0])
        tok = common.checkpoint_tokenizer(checkpoint, c['data_dir'])
        if c['max_len'] > args['block_size'] or 'imdb' in task_list:
            print(f"note: sequences longer than the model's training window ({args['block_size']} tokens) read "
                  f"positions it never saw in training")
        print(f"checkpoint {ckpt}: stage {checkpoint.get('stage', '?')}, decoder {args.get('decoder')}, n_embd "
              f"{args['n_embd']}, {len(checkpoint['model'])} tensors; head {head}, seeds {seed_list}, device {dev}, "
              f"dtype {dt}" + (f", control {c['control']}" if c['control'] else '')
              + (f"; {path} holds {', '.join(results)} already" if results else ''))
        datas = [load_task(t, c['task_dir'], c['max_train_examples'], c['max_eval_examples']) for t in task_list]
        for task, data in zip(task_list, datas):
            skipped = sum(data['skipped'].values())
            print(f"{task}: train {len(data['train']['label'])}, "
                  + ', '.join(f"{k} {len(v['label'])}" for k, v in data['evals'].items())
                  + ("; texts read whole" if data['length'] is not None else '')
                  + (f"; skipped {skipped} malformed rows {data['skipped']}" if skipped else ''), flush=True)
            res = evaluate_task(checkpoint, tok, data, head, seed_list, {k: c[k] for k in HPARAMS}, dev,
                                common.autocast(dev, dt), c['progress'], dt, c['control'])
            print('\n'.join(markdown_table(res).splitlines()[2:]), flush=True)  # its rows of the table
            merged = {**results, **res}  # a task evaluated again replaces its own entry
            common.write_text(path, json.dumps({'run': run, 'results': merged}, indent=2) + '\n')
            results = merged  # what the file holds now
    except KeyboardInterrupt:
        common.interrupted(f"{', '.join(results)} kept in {path}" if results else "nothing was written")
    print(f"\n{markdown_table(results)}\n\nwrote {path}")


if __name__ == '__main__':
    settings = {**DEFAULTS, '__file__': __file__}  # the configurator sees the settings and nothing else
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read(), settings)
    main({k: settings[k] for k in DEFAULTS})
