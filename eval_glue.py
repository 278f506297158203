"""
GLUE, SICK and PAWS for a Concept Encoder checkpoint of any stage (mlm, tsdae, diffusion):
fine-tune a small head on each task's training split and score its validation split, or score
sentence similarity zero-shot (no training at all).

    python eval_glue.py --ckpt=out/tiny_mlm/ckpt.pt --data_dir=glue_data --tasks=stsb,mrpc,rte,sst2,cola
    python eval_glue.py --ckpt=out/tiny_mlm/ckpt.pt --data_dir=glue_data --head=cosine --tasks=stsb,sick_r
    python eval_glue.py --ckpt=out/h512l6_mlm/ckpt.pt --tasks=glue --seeds=1,2,3 --device=cuda

Sentence embeddings for anything else (the mean of the C concepts, float32, on the CPU):

    from eval_glue import encode
    emb = encode(["a sentence", "another one"], 'out/tiny_mlm/ckpt.pt')   # tensor (2, n_embd)

Data: the Hugging Face hub (data_dir='': nyu-mll/glue, RobZamp/sick, paws labeled_final), or a
local directory laid out as the standard GLUE distribution: DIR/<TASK>/train.tsv and dev.tsv
(MNLI: dev_matched.tsv, dev_mismatched.tsv) with each task's official columns, DIR/SICK/SICK.txt
(the original 12-column file; its SemEval_set column gives TRAIN / TRIAL / TEST, and TRIAL is the
validation split, as on the hub), DIR/PAWS/train.tsv and dev.tsv (PAWS-Wiki labeled_final).
Malformed rows (wrong column count, unreadable label) are skipped and counted.

Heads (--head):
    pool     '[cls] a [sep] b' as one sequence; weighted concept pooling -> LayerNorm -> linear
    pair     a and b encoded apart and pooled; features [a; b; |a-b|; a*b] -> linear (one-sentence
             tasks: the pool head)
    decoder  the pretrained decoder read out at every position, mean over real tokens -> linear
    probe    the encoder frozen (SentEval's protocol): mean-pooled features computed once per
             example (a pair encoded apart: [a; b; |a-b|; a*b]), standardised, then ridge regression
             (closed form) or multinomial logistic regression (L-BFGS); the L2 strength is chosen
             on a fixed 20% holdout of the training split, never on the reported dev set
    cosine   zero-shot: cosine of the mean-pooled concepts of a and b (stsb, sick_r)
Pooling goes through model.pooled(), the one place that knows the encoder arm: the concept arm pools
its C concepts, the standard arm (cfg.encoder == 'standard') its real tokens only.

Controls in every result: 'majority' (below) and 'bow', a tf-idf bag of word unigrams and
bigrams fitted on the same training examples with the probe's own linear model and holdout;
--control=random_init also runs the same head and protocol on the same architecture with
untrained weights (one draw per seed). The table marks each score against them ('>bow' clears
it; with several seeds, by more than the larger seed spread). Results are written atomically
after each task, so an interrupted run keeps the tasks it finished.

Protocol, after crammedBERT's (Geiping & Goldstein 2023): one set of hyperparameters for every
task, brief fine-tuning (5 epochs; 3 for the large qqp, mnli, qnli), batch 16, 10% warmup then
cosine decay, AdamW (0.9, 0.98), no weight decay, max_len 128; the encoder at lr 1e-4 and the new
head at 1e-3 (a fresh head needs the larger rate). The headline is the LAST epoch's score (mean
and sample std over seeds); the best epoch is reported beside it, since choosing it on the set
one reports is optimistic. Metrics are on a 0-100 scale (MCC, Pearson, Spearman x100 as on the
GLUE leaderboard) beside the majority-class baseline (regression: a constant, correlation 0).
"""
import glob
import json
import math
import os
import re
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
import runtime
from model import Classifier, ConfigError, pair_features, pooled

# ----------------------------------------------------------------------------------------------
# defaults (python eval_glue.py --key=value; see configurator.py)
ckpt = 'out/tiny_mlm/ckpt.pt'  # a checkpoint of any stage
data_dir = ''                  # '' = the Hugging Face hub; else a directory in the GLUE layout (see above)
data_dir_tok = ''              # '' = the data directory recorded in the checkpoint (it holds the tokenizer)
tasks = 'glue'                 # comma-separated task names, or 'glue' (the 8 GLUE tasks without WNLI) or 'all'
head = 'pair'                  # 'pair' | 'pool' | 'decoder' | 'probe' (frozen, linear) | 'cosine' (zero-shot; stsb, sick_r)
control = ''                   # 'random_init': also run the same protocol on the untrained architecture
seeds = '42'                   # comma-separated, e.g. '1,2,3': one fine-tuning run each, mean and std reported
epochs = 0                     # 0 = the task's default (5; 3 for qqp, mnli, qnli)
learning_rate = 1e-4           # the pretrained encoder's (crammedBERT's 4e-5 suits an already good BERT-base)
head_learning_rate = 1e-3      # the new head's, which starts from nothing; 0 = learning_rate
head_init = 'random'           # 'random' | 'probe': the output layer starts as the linear probe of the head's features (LP-FT)
batch_size = 16                # crammedBERT: large fine-tuning batches hurt
eval_batch_size = 128
max_len = 128                  # tokens per sequence (a pair packed in one: both sentences), capped at block_size
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
# the fine-tuning settings, as a dict for finetune() (tests pass their own)
HPARAMS = dict(epochs=epochs, learning_rate=learning_rate, head_learning_rate=head_learning_rate, head_init=head_init,
               batch_size=batch_size, eval_batch_size=eval_batch_size, max_len=max_len, warmup_steps=warmup_steps,
               weight_decay=weight_decay, grad_clip=grad_clip, dropout=dropout)

# ----------------------------------------------------------------------------------------------
# tasks

# name: (metrics, the first of which picks the best epoch; number of labels, 1 = regression; default epochs)
TASKS = {
    'cola':   (('mcc',), 2, 5),
    'sst2':   (('accuracy',), 2, 5),
    'mrpc':   (('f1', 'accuracy'), 2, 5),
    'qqp':    (('f1', 'accuracy'), 2, 3),
    'stsb':   (('pearson', 'spearman'), 1, 5),
    'mnli':   (('accuracy',), 3, 3),
    'qnli':   (('accuracy',), 2, 3),
    'rte':    (('accuracy',), 2, 5),
    'wnli':   (('accuracy',), 2, 5),
    'sick_r': (('pearson', 'spearman'), 1, 5),
    'sick_e': (('accuracy',), 3, 5),
    'paws':   (('f1', 'accuracy'), 2, 5),
}
PRESETS = {'glue': 'cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte', 'all': ','.join(TASKS)}
# evaluation sets other than the single default {task: ('dev', 'validation')}: result name -> (local file, hub split)
EVAL_SETS = {'mnli': {'mnli_m': ('dev_matched', 'validation_matched'),
                      'mnli_mm': ('dev_mismatched', 'validation_mismatched')}}
# labels written as words in the local files, listed in the hub's label order
LABEL_NAMES = {'mnli': ('entailment', 'neutral', 'contradiction'), 'qnli': ('entailment', 'not_entailment'),
               'rte': ('entailment', 'not_entailment'), 'sick_e': ('entailment', 'neutral', 'contradiction')}
# the GLUE distribution: folder, header line?, column of sentence a, of sentence b (None: one sentence), of the label
GLUE_TSV = {
    'cola': ('CoLA', False, 3, None, 1),
    'sst2': ('SST-2', True, 0, None, 1),
    'mrpc': ('MRPC', True, 3, 4, 0),
    'qqp':  ('QQP', True, 3, 4, 5),
    'stsb': ('STS-B', True, 7, 8, -1),
    'mnli': ('MNLI', True, 8, 9, -1),
    'qnli': ('QNLI', True, 1, 2, -1),
    'rte':  ('RTE', True, 1, 2, -1),
    'wnli': ('WNLI', True, 1, 2, -1),
    'paws': ('PAWS', True, 1, 2, 3),
}
# SICK.txt: pair_ID, sentence_A, sentence_B, entailment_label, relatedness_score, ..., SemEval_set (12 columns)
SICK_LABEL_COLUMN = {'sick_r': 4, 'sick_e': 3}
# the hub: dataset, configuration, column of sentence a, of sentence b, of the label
HUB = {
    'cola':   ('nyu-mll/glue', 'cola', 'sentence', None, 'label'),
    'sst2':   ('nyu-mll/glue', 'sst2', 'sentence', None, 'label'),
    'mrpc':   ('nyu-mll/glue', 'mrpc', 'sentence1', 'sentence2', 'label'),
    'qqp':    ('nyu-mll/glue', 'qqp', 'question1', 'question2', 'label'),
    'stsb':   ('nyu-mll/glue', 'stsb', 'sentence1', 'sentence2', 'label'),
    'mnli':   ('nyu-mll/glue', 'mnli', 'premise', 'hypothesis', 'label'),
    'qnli':   ('nyu-mll/glue', 'qnli', 'question', 'sentence', 'label'),
    'rte':    ('nyu-mll/glue', 'rte', 'sentence1', 'sentence2', 'label'),
    'wnli':   ('nyu-mll/glue', 'wnli', 'sentence1', 'sentence2', 'label'),
    'sick_r': ('RobZamp/sick', None, 'sentence_A', 'sentence_B', 'relatedness_score'),
    'sick_e': ('RobZamp/sick', None, 'sentence_A', 'sentence_B', 'label'),
    'paws':   ('google-research-datasets/paws', 'labeled_final', 'sentence1', 'sentence2', 'label'),
}


def eval_sets(task):
    return EVAL_SETS.get(task, {task: ('dev', 'validation')})


def parse_label(task, text):
    """A label field as an int class or a float score; ValueError if it is not one."""
    n_labels = TASKS[task][1]
    if n_labels == 1:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if task in LABEL_NAMES:
        return LABEL_NAMES[task].index(text.strip().lower())
    value = int(text)
    if not 0 <= value < n_labels:
        raise ValueError(text)
    return value


def expected_labels(task):
    """The label values parse_label accepts, in words for an error message."""
    n_labels = TASKS[task][1]
    if n_labels == 1:
        return 'that is a number (a similarity score)'
    if task in LABEL_NAMES:
        return f"word, one of {', '.join(LABEL_NAMES[task])}"
    return f"from 0 to {n_labels - 1}"


def make_split(a, b, labels, task):
    dt = np.float32 if TASKS[task][1] == 1 else np.int64
    return {'a': a, 'b': b, 'label': np.asarray(labels, dtype=dt)}


def read_tsv(path):
    """The rows of a tab-separated file. GLUE's files are read with quoting off (csv.QUOTE_NONE),
    so quotes are literal text and a line ends only at a newline: a plain split on tabs."""
    if not os.path.isfile(path):
        raise prepare_data.DataError(f"{path} not found; --data_dir must hold the GLUE layout "
                                     f"(<TASK>/train.tsv, dev.tsv, SICK/SICK.txt, PAWS/train.tsv), or '' for the hub")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        text = raw.decode('utf-8-sig', errors='replace')
        print(f"note: {path} is not UTF-8: {text.count(chr(0xFFFD))} undecodable bytes read as U+FFFD "
              f"(re-encode it as UTF-8 for exact text)")
    return [line.rstrip('\r').split('\t') for line in text.split('\n') if line.strip()]


def rows_to_split(task, rows, col_a, col_b, col_y, n_cols):
    """(split, number of skipped rows): a row with another column count than the file's, or an
    unreadable label, is skipped (QQP has a few)."""
    a, b, labels, skipped = [], [], [], 0
    for row in rows:
        if len(row) != n_cols:
            skipped += 1
            continue
        try:
            labels.append(parse_label(task, row[col_y]))
        except ValueError:
            skipped += 1
            continue
        a.append(row[col_a])
        if col_b is not None:
            b.append(row[col_b])
    return make_split(a, b if col_b is not None else None, labels, task), skipped


def columns_read(*cols):
    """How many columns a row needs for the task to read its columns cols (None: not read)."""
    return max(c for c in cols if c is not None) + 1


def check_columns(path, n_cols, task, *cols):
    """A file narrower than the columns the task reads is a layout error, not rows to skip."""
    need = columns_read(*cols)
    if n_cols < need:
        raise prepare_data.DataError(f"{path} has {n_cols} tab-separated columns, but {task} reads column "
                                     f"{need - 1} (0-based); use the original GLUE/SICK/PAWS files or --data_dir=''")


def read_local(task, root):
    """(train, {result name: eval split}, {file: skipped rows}) from the GLUE layout under root."""
    if task in SICK_LABEL_COLUMN:
        path = os.path.join(root, 'SICK', 'SICK.txt')
        rows = read_tsv(path)
        n_cols = len(rows[0]) if rows else 12
        check_columns(path, n_cols, task, 1, 2, SICK_LABEL_COLUMN[task])
        good = [row for row in rows[1:] if len(row) == n_cols]
        skipped = len(rows[1:]) - len(good)
        parts = {s: [row for row in good if row[-1].strip().upper() == s] for s in ('TRAIN', 'TRIAL')}  # no TEST
        train, s1 = rows_to_split(task, parts['TRAIN'], 1, 2, SICK_LABEL_COLUMN[task], n_cols)
        dev, s2 = rows_to_split(task, parts['TRIAL'], 1, 2, SICK_LABEL_COLUMN[task], n_cols)
        return train, {task: dev}, {'SICK.txt': skipped + s1 + s2}
    folder, header, col_a, col_b, col_y = GLUE_TSV[task]

    def read(stem):
        path = os.path.join(root, folder, f'{stem}.tsv')
        rows = read_tsv(path)
        if header:
            n_cols = len(rows[0]) if rows else 0
            if rows:
                check_columns(path, n_cols, task, col_a, col_b, col_y)
            return rows_to_split(task, rows[1:], col_a, col_b, col_y, n_cols)
        n_cols = columns_read(col_a, col_b, col_y)  # CoLA: 4
        return rows_to_split(task, rows, col_a, col_b, col_y, n_cols)

    skipped = {}
    train, skipped['train.tsv'] = read('train')
    evals = {}
    for name, (stem, _) in eval_sets(task).items():
        evals[name], skipped[f'{stem}.tsv'] = read(stem)
    return train, evals, skipped


def read_hub(task):
    """The same from the Hugging Face hub; any failure (offline, a renamed dataset) is one error
    that points at --data_dir."""
    import datasets
    path, config_name, col_a, col_b, col_y = HUB[task]
    # SICK is a script dataset, which datasets>=4 cannot run: its parquet conversion first
    attempts = [{'revision': 'refs/convert/parquet'}, {}] if path.endswith('sick') else [{}]
    ds, error = None, None
    for extra in attempts:
        try:
            ds = datasets.load_dataset(path, config_name, **extra)
            break
        except ConnectionError as e:  # offline: another attempt would only wait for the same timeouts
            error = e
            break
        except Exception as e:  # noqa: BLE001 - missing repo or revision, scripts: the same advice
            error = e
    if ds is None:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise prepare_data.DataError(
            f"could not load {task} from the Hugging Face hub ({path}: {first}); offline? download the data once "
            f"and pass --data_dir=DIR in the GLUE layout (DIR/<TASK>/train.tsv, dev.tsv; DIR/SICK/SICK.txt; "
            f"DIR/PAWS/train.tsv, dev.tsv)")
    n_labels = TASKS[task][1]

    def take(split):
        """Rows without a usable label (the hub's test splits mark them -1) are dropped and counted."""
        d = ds[split]
        a, ys = d[col_a][:], d[col_y][:]  # [:] makes a plain list, fast (datasets>=4 returns a lazy Column)
        b = d[col_b][:] if col_b else None
        keep = [i for i, y in enumerate(ys) if y is not None and (n_labels == 1 or 0 <= y < n_labels)]
        if len(keep) < len(ys):
            a, ys = [a[i] for i in keep], [ys[i] for i in keep]
            b = None if b is None else [b[i] for i in keep]
        return make_split(a, b, ys, task), len(d) - len(keep)

    skipped = {}
    train, skipped['train'] = take('train')
    evals = {}
    for name, (_, split) in eval_sets(task).items():
        evals[name], skipped[split] = take(split)
    return train, evals, skipped


def subset(split, n, seed=0):
    """A fixed random subset of n examples (in file order); GLUE files are often sorted."""
    if n <= 0 or n >= len(split['label']):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split['label']))[:n])
    b = None if split['b'] is None else [split['b'][i] for i in keep]
    return {'a': [split['a'][i] for i in keep], 'b': b, 'label': split['label'][keep]}


def load_task(task, root='', max_train=0, max_eval=0):
    """Everything evaluate_task needs to know about a task, its splits included."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose from {', '.join(TASKS)}, or 'glue' / 'all'")
    train, evals, skipped = read_local(task, root) if root else read_hub(task)
    if len(train['label']) == 0 or any(len(e['label']) == 0 for e in evals.values()):
        raise prepare_data.DataError(f"{task}: no usable examples in {root or 'the hub data'} ({skipped} skipped); "
                                     f"each row needs the task's columns and a label {expected_labels(task)}")
    metrics, n_labels, n_epochs = TASKS[task]
    return {'task': task, 'metrics': metrics, 'n_labels': n_labels, 'epochs': n_epochs,
            'train': subset(train, max_train), 'evals': {k: subset(v, max_eval) for k, v in evals.items()},
            'skipped': skipped}


# ----------------------------------------------------------------------------------------------
# metrics: numpy only; each returns a fraction in [0, 1] or a correlation in [-1, 1]

def accuracy(pred, label):
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def confusion(pred, label):
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    return (int(np.sum(pred & label)), int(np.sum(pred & ~label)), int(np.sum(~pred & label)),
            int(np.sum(~pred & ~label)))  # tp, fp, fn, tn


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


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


METRICS = {'mcc': mcc, 'accuracy': accuracy, 'f1': f1, 'pearson': pearson, 'spearman': spearman}


def score(pred, label, metrics):
    """{metric: value x 100}, rounded: more digits than this are noise."""
    return {m: round(100.0 * METRICS[m](pred, label), 4) for m in metrics}


def majority(train_label, eval_label, n_labels, metrics):
    """The scores of always answering the train split's most frequent label (regression: its mean)."""
    if n_labels == 1:
        pred = np.full(len(eval_label), float(np.mean(train_label)))
    else:
        pred = np.full(len(eval_label), int(np.bincount(train_label, minlength=n_labels).argmax()))
    return score(pred, eval_label, metrics)


# ----------------------------------------------------------------------------------------------
# checkpoints and the tokenizer

def load_pretrained(path, tok_dir=''):
    """(checkpoint dict, Tokenizer). The tokenizer is rebuilt from the recipe the checkpoint holds;
    a bpe recipe needs the data directory with its ranks file, by default the one it records."""
    ckpt = runtime.load_checkpoint(path)
    where = tok_dir or ckpt.get('data_dir')
    try:
        tok = prepare_data.tokenizer_from_recipe(ckpt['tokenizer'], where)
    except prepare_data.DataError as e:
        raise prepare_data.DataError(f"{e} (the tokenizer of {path}; if its data directory moved, pass "
                                     f"--data_dir_tok=<that directory>)")
    return ckpt, tok


def fresh_model(ckpt, dropout=None, random_init=False):
    """A fresh copy of the checkpoint's model on the CPU, optionally with another dropout for
    fine-tuning. random_init: the same architecture with untrained weights, drawn from torch's
    current seed (the control that says what pretraining bought)."""
    model = runtime.model_from_checkpoint(ckpt, **({} if dropout is None else {'dropout': dropout}))
    return type(model)(model.cfg) if random_init else model


# ----------------------------------------------------------------------------------------------
# token ids, once per task, and length-bucketed batches

def check_max_len(max_len, joined_pair):
    """Room for [cls] and a token of each text: '[cls] a [sep] b' needs 4, '[cls] a' needs 2."""
    need, form = (4, "'[cls] a [sep] b'") if joined_pair else (2, "'[cls] text'")
    if not max_len >= need:
        raise ConfigError(f"max_len={max_len!r} is too short: {form} needs max_len >= {need} to keep a token of "
                          f"each text; the default is 128")


def truncate_pair(a, b, budget):
    """Cut the longer of the two first, as BERT does, until both fit in budget tokens."""
    if len(a) + len(b) <= budget:
        return a, b
    keep_b = min(len(b), max(budget - len(a), budget // 2))
    return a[:budget - keep_b], b[:keep_b]


def tokenize(tok, split, joined, max_len):
    """{'x': ids, 'x_b': ids or None, 'pad': pad id}. joined: '[cls] a [sep] b' in one sequence
    (pool and decoder heads); else '[cls] a' and '[cls] b' apart (pair and cosine heads)."""
    cls, sep = tok.cls_id, tok.sep_id
    ids_a = tok.encode_batch(split['a'])
    if split['b'] is None:
        return {'x': [[cls] + a[:max_len - 1] for a in ids_a], 'x_b': None, 'pad': tok.pad_id}
    ids_b = tok.encode_batch(split['b'])
    if not joined:
        return {'x': [[cls] + a[:max_len - 1] for a in ids_a], 'x_b': [[cls] + b[:max_len - 1] for b in ids_b],
                'pad': tok.pad_id}
    x = []
    for a, b in zip(ids_a, ids_b):
        a, b = truncate_pair(a, b, max_len - 2)
        x.append([cls] + a + [sep] + b)
    return {'x': x, 'x_b': None, 'pad': tok.pad_id}


def length_batches(lengths, batch_size, rng=None):
    """Index arrays of examples of about the same length, so that little compute goes to padding.
    With rng (training): shuffled, sorted by length only within windows of 50 batches, and the
    batches shuffled, so batches still differ from epoch to epoch. Without: sorted."""
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind='stable')
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = rng.permutation(len(lengths))
    window = 50 * batch_size
    out = []
    for s in range(0, len(perm), window):
        part = perm[s:s + window]
        part = part[np.argsort(lengths[part], kind='stable')]
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def lengths_of(enc):
    if enc['x_b'] is None:
        return [len(x) for x in enc['x']]
    return [len(a) + len(b) for a, b in zip(enc['x'], enc['x_b'])]


def collate(seqs, pad_id, device):
    """(idx (B, L) long, attn_mask (B, L) bool): padded with pad_id, which the mask hides."""
    lens = torch.tensor([len(s) for s in seqs])
    idx = torch.full((len(seqs), int(lens.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    mask = torch.arange(idx.shape[1])[None, :] < lens[:, None]
    return idx.to(device), mask.to(device)


def batch_inputs(enc, rows, device):
    inputs = collate([enc['x'][i] for i in rows], enc['pad'], device)
    if enc['x_b'] is not None:
        inputs += collate([enc['x_b'][i] for i in rows], enc['pad'], device)
    return inputs


# ----------------------------------------------------------------------------------------------
# running a model (model.Classifier, model.pooled) over tokenised examples

@torch.no_grad()
def run_batched(module, fn, enc, width, batch_size, device='cpu', autocast=nullcontext):
    """fn(*batch inputs) for every example of a tokenised split, with module in eval mode (its mode
    restored after), batched by length so that little compute goes to padding: (n, width) float32 on
    the CPU, in input order."""
    was_training = module.training
    module.eval()
    out = torch.empty(len(enc['x']), width)
    for rows in length_batches(lengths_of(enc), batch_size):
        with autocast():
            z = fn(*batch_inputs(enc, rows, device))
        out[torch.as_tensor(rows)] = z.float().cpu()
    module.train(was_training)
    return out


def embed(model, seqs, pad_id, batch_size=64, device='cpu', autocast=nullcontext):
    """The mean-pooled states of each sequence (pooled()): (n, H)."""
    enc = {'x': seqs, 'x_b': None, 'pad': pad_id}
    return run_batched(model, lambda idx, mask: pooled(model, idx, mask), enc, model.cfg.n_embd, batch_size,
                       device, autocast)


def predict(clf, enc, batch_size, device, autocast=nullcontext):
    """The classifier's outputs for every example: (n, n_out) float32 numpy, in input order."""
    return run_batched(clf, clf, enc, clf.out.out_features, batch_size, device, autocast).numpy()


def head_features(clf, enc, batch_size, device='cpu', autocast=nullcontext):
    """What clf's output layer reads: (n, H) or (n, 4H)."""
    return run_batched(clf, clf.features, enc, clf.out.in_features, batch_size, device, autocast)


# ----------------------------------------------------------------------------------------------
# linear models on fixed features: the probe head and the bag-of-words baseline share them

REG_GRID = tuple(10.0 ** k for k in range(2, -6, -1))  # λ candidates, strongest first (warm starts go down the grid)
HOLDOUT_FRACTION = 0.2  # of the training split, carved once with a fixed seed, picks λ: the dev set never does


def matmul(X, W):
    """X @ W for a dense or a sparse (COO) X."""
    return torch.sparse.mm(X, W) if X.is_sparse else X @ W


def take_rows(X, rows):
    return X.index_select(0, torch.as_tensor(rows)).coalesce() if X.is_sparse else X[torch.as_tensor(rows)]


def gram(X):
    """X Xᵀ (n, n) dense, for a dense or a sparse X."""
    if not X.is_sparse:
        return X @ X.T
    with warnings.catch_warnings():  # torch flags its sparse @ sparse product as beta; the result is exact
        warnings.simplefilter('ignore', UserWarning)
        return torch.sparse.mm(X, X.t().coalesce()).to_dense()


def fit_ridge(X, y, lam):
    """Ridge regression in closed form: argmin (1/n)||Xw + b - y||² + λ||w||², the bias free.
    Solved in the primal (d x d) when d <= n, else in the dual (n x n), where a sparse X (the
    bag of words) never becomes dense: the centring is folded into the Gram matrix."""
    X, y = X.double(), torch.as_tensor(y, dtype=torch.float64)
    n, d = X.shape
    mu = (torch.sparse.sum(X, 0).to_dense() if X.is_sparse else X.sum(0)) / n      # (d,)
    y_mean = y.mean()
    if d <= n and not X.is_sparse:
        Xc = X - mu
        w = torch.linalg.solve(Xc.T @ Xc / n + lam * torch.eye(d, dtype=X.dtype), Xc.T @ (y - y_mean) / n)
    else:
        # Xc Xcᵀ = X Xᵀ - m 1ᵀ - 1 mᵀ + |μ|², with m = X μ
        m = matmul(X, mu[:, None])[:, 0]
        K = gram(X) - m[:, None] - m[None, :] + mu @ mu
        alpha = torch.linalg.solve(K / n + lam * torch.eye(n, dtype=X.dtype), (y - y_mean) / n)
        w = matmul(X.t().coalesce() if X.is_sparse else X.T, alpha[:, None])[:, 0] - mu * alpha.sum()
    return w, y_mean - mu @ w


def fit_logistic(X, y, n_classes, lam, init=None):
    """Multinomial logistic regression by L-BFGS: mean cross-entropy + (λ/2)||W||², the bias
    free. init (W, b) warm-starts it (the next λ of the grid starts from the last solution)."""
    X = X.float() if not X.is_sparse else X.coalesce().float()
    y = torch.as_tensor(y, dtype=torch.long)
    d = X.shape[1]
    W = (init[0].clone() if init else torch.zeros(d, n_classes)).requires_grad_(True)
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
    """Predictions of a fitted linear model: class ids, or scores for a regression."""
    out = linear_outputs(model, X)
    return (out if out.dim() == 1 else out.argmax(-1)).numpy()


def linear_loss(model, X, y):
    """Mean squared error or cross-entropy: breaks ties between λs that score alike."""
    out = linear_outputs(model, X)
    if out.dim() == 1:
        return float(((out - torch.as_tensor(y, dtype=out.dtype)) ** 2).mean())
    return float(F.cross_entropy(out.float(), torch.as_tensor(y, dtype=torch.long)))


def fit_linear(X, y, n_labels, lam, init=None):
    return fit_ridge(X, y, lam) if n_labels == 1 else fit_logistic(X, y, n_labels, lam, init)


def holdout_split(n, seed=0):
    """(fit rows, holdout rows): a fixed random HOLDOUT_FRACTION of the training split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, round(HOLDOUT_FRACTION * n)) if n > 1 else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def fit_probe(X, y, n_labels, metrics):
    """The linear model of the probe: λ chosen on a holdout carved from the training split by
    its first metric (ties: by its loss; a small holdout often ties), then refitted on the whole
    training split. Returns (model, λ)."""
    fit_rows, hold_rows = holdout_split(len(y))
    best, best_lam, best_model, init = None, REG_GRID[0], None, None
    if len(hold_rows):
        X_fit, X_hold = take_rows(X, fit_rows), take_rows(X, hold_rows)
        for lam in REG_GRID:
            model = fit_linear(X_fit, y[fit_rows], n_labels, lam, init)
            init = model if n_labels > 1 else None
            s = (score(linear_predict(model, X_hold), y[hold_rows], metrics[:1])[metrics[0]],
                 -linear_loss(model, X_hold, y[hold_rows]))
            if best is None or s > best:
                best, best_lam, best_model = s, lam, model
    return fit_linear(X, y, n_labels, best_lam, best_model if n_labels > 1 else None), best_lam


def feature_stats(train):
    """(mean, std) per feature of the training features; a constant feature's std is 1."""
    mean, std = train.mean(0), train.std(0)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def standardise(train, *others):
    """z-scores with the training features' statistics (constant features stay 0)."""
    mean, std = feature_stats(train)
    return [(x - mean) / std for x in (train, *others)]


# ----------------------------------------------------------------------------------------------
# the bag-of-words control: tf-idf of word unigrams and bigrams, the probe's own linear model

def ngrams(text):
    words = re.findall(r"\w+", text.lower())
    return words + [f"{u} {v}" for u, v in zip(words, words[1:])]


class TfIdf:
    """tf-idf of unigrams and bigrams, fitted on the training texts only: n-grams seen in at
    least min_df of them, idf = ln((1 + n) / (1 + df)) + 1, each row L2-normalised (as
    scikit-learn's TfidfVectorizer with min_df=2)."""

    def __init__(self, texts, min_df=2):
        df = {}
        for text in texts:
            for g in set(ngrams(text)):
                df[g] = df.get(g, 0) + 1
        kept = sorted(g for g, c in df.items() if c >= min_df)
        self.index = {g: i for i, g in enumerate(kept)}
        self.idf = {g: math.log((1 + len(texts)) / (1 + df[g])) + 1 for g in kept}

    def __len__(self):
        return len(self.index)

    def rows(self, texts):
        """One {column: weight} dict per text."""
        out = []
        for text in texts:
            counts = {}
            for g in ngrams(text):
                if g in self.index:
                    counts[g] = counts.get(g, 0) + 1
            row = {self.index[g]: c * self.idf[g] for g, c in counts.items()}
            norm = math.sqrt(sum(v * v for v in row.values())) or 1.0
            out.append({k: v / norm for k, v in row.items()})
        return out


def sparse_rows(rows, width):
    """A list of {column: value} dicts -> a sparse COO tensor (len(rows), width), float64."""
    r = [i for i, row in enumerate(rows) for _ in row]
    c = [k for row in rows for k in row]
    v = [x for row in rows for x in row.values()]
    idx = torch.tensor([r, c], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(idx, torch.tensor(v, dtype=torch.float64), (len(rows), width),
                                   check_invariants=False).coalesce()


def bow_features(vec, split):
    """tf-idf rows of a split; for a pair, [a; b; |a - b|; a ⊙ b] over the vocabulary, sparse."""
    V = len(vec)
    rows_a = vec.rows(split['a'])
    if split['b'] is None:
        return sparse_rows(rows_a, V)
    rows = []
    for a, b in zip(rows_a, vec.rows(split['b'])):
        row = {k: v for k, v in a.items()}
        row.update({V + k: v for k, v in b.items()})
        for k in a.keys() | b.keys():
            diff = abs(a.get(k, 0.0) - b.get(k, 0.0))
            if diff:
                row[2 * V + k] = diff
            if k in a and k in b:
                row[3 * V + k] = a[k] * b[k]
        rows.append(row)
    return sparse_rows(rows, 4 * V)


def bow_baseline(data):
    """{eval name: ({metric: value}, λ)} of the tf-idf linear model on the task's own training
    examples: the bar a representation has to clear to have learned more than its words."""
    train = data['train']
    vec = TfIdf(train['a'] + (train['b'] or []))
    if len(vec) == 0:  # no n-gram occurs twice: nothing to learn from, the majority answer
        return {name: (majority(train['label'], e['label'], data['n_labels'], data['metrics']), None)
                for name, e in data['evals'].items()}
    model, lam = fit_probe(bow_features(vec, train), train['label'], data['n_labels'], data['metrics'])
    return {name: (score(linear_predict(model, bow_features(vec, e)), e['label'], data['metrics']), lam)
            for name, e in data['evals'].items()}


# ----------------------------------------------------------------------------------------------
# fine-tuning

def finetune(ckpt, data, head, seed, hp, device='cpu', autocast=nullcontext, progress=False, dtype='float32',
             random_init=False):
    """One run: a fresh copy of the pretrained model (random_init: untrained) and a new head,
    trained for the task's epochs and scored on every evaluation set after every epoch. data
    holds the tokenised splits (evaluate_task adds them). Returns [{eval name: {metric: value}}
    per epoch] and the loss curve."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, n_labels = data['train_tok'], data['n_labels']
    regression = n_labels == 1
    labels = data['train']['label']
    # regression targets are standardised: a fresh head starts near 0, and a 0-5 score would first
    # cost epochs of learning its offset (the correlations do not change under this rescaling)
    y_mean, y_std = (float(labels.mean()), float(labels.std()) or 1.0) if regression else (0.0, 1.0)
    targets = torch.tensor((labels - y_mean) / y_std, dtype=torch.float32) if regression else torch.tensor(labels)

    model = fresh_model(ckpt, hp['dropout'], random_init)
    clf = Classifier(model, head, n_labels, head == 'pair' and train['x_b'] is not None, hp['dropout']).to(device)
    if hp['head_init'] == 'probe':
        init_head_from_probe(clf, train, targets.numpy(), data, hp, device, autocast)
    n_epochs = hp['epochs'] or data['epochs']
    per_epoch = math.ceil(len(train['x']) / hp['batch_size'])
    total = n_epochs * per_epoch
    warmup = hp['warmup_steps'] if hp['warmup_steps'] >= 0 else round(0.1 * total)
    # the new head starts from nothing and gets its own, larger learning rate; the pretrained
    # encoder moves at learning_rate (head_learning_rate=0: the same for both)
    head_params = {id(p) for p in clf.head_parameters()}
    groups = []
    for is_head in (False, True):
        lr = (hp['head_learning_rate'] or hp['learning_rate']) if is_head else hp['learning_rate']
        part = [p for p in clf.parameters() if p.requires_grad and (id(p) in head_params) == is_head]
        groups += [{'params': [p for p in part if p.dim() >= 2], 'weight_decay': hp['weight_decay'], 'base_lr': lr},
                   {'params': [p for p in part if p.dim() < 2], 'weight_decay': 0.0, 'base_lr': lr}]
    device_type = 'cuda' if str(device).startswith('cuda') else str(device)
    optimizer = torch.optim.AdamW(groups, lr=hp['learning_rate'], betas=(0.9, 0.98), eps=1e-6,
                                  fused=device_type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    history, losses, step = [], [], 0
    for epoch in range(n_epochs):
        clf.train()
        batches = length_batches(lengths_of(train), hp['batch_size'], rng)
        bar = tqdm(batches, desc=f"{data['task']} seed {seed} epoch {epoch + 1}/{n_epochs}", leave=False,
                   disable=not progress)
        loss_sum = 0.0
        for rows in bar:
            factor = runtime.get_lr(step, 1.0, 0.0, warmup, total)  # warmup then cosine, for every group
            for group in optimizer.param_groups:
                group['lr'] = factor * group['base_lr']
            with autocast():
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
            o = predict(clf, enc, hp['eval_batch_size'], device, autocast)
            pred = o[:, 0] * y_std + y_mean if regression else o.argmax(-1)
            scores[name] = score(pred, data['evals'][name]['label'], data['metrics'])
        history.append(scores)
        if progress:
            shown = ', '.join(f"{name} " + ' '.join(f"{m} {v:.1f}" for m, v in s.items()) for name, s in scores.items())
            print(f"{data['task']} seed {seed} epoch {epoch + 1}/{n_epochs}: train loss {losses[-1]:.4f}, {shown}",
                  flush=True)
    return history, losses


@torch.no_grad()
def init_head_from_probe(clf, enc, targets, data, hp, device='cpu', autocast=nullcontext):
    """LP-FT (Kumar et al. 2022): the output layer starts as the probe's linear model fitted on the
    head's own features of the training split (λ on the probe's holdout), so that fine-tuning
    begins from what the encoder already separates instead of sending a random layer's gradients
    into it. The probe's standardisation is folded into the layer's weight and bias."""
    Z = head_features(clf, enc, hp['eval_batch_size'], device, autocast)        # (n, F)
    mean, std = feature_stats(Z)
    (w, b), _ = fit_probe((Z - mean) / std, targets, data['n_labels'], data['metrics'])
    w = w.float() if w.dim() == 2 else w.float()[:, None]                      # (F, n_out)
    w = w / std[:, None]
    clf.out.weight.copy_(w.T)
    clf.out.bias.copy_(b.float().reshape(-1) - mean @ w)


def features(model, enc, batch_size, device, autocast):
    """The frozen encoder's features of a tokenised split: the mean-pooled states (n, H), for a
    pair encoded apart [a; b; |a - b|; a ⊙ b] (n, 4H)."""
    a = embed(model, enc['x'], enc['pad'], batch_size, device, autocast)
    if enc['x_b'] is None:
        return a
    return pair_features(a, embed(model, enc['x_b'], enc['pad'], batch_size, device, autocast))


def probe(ckpt, data, seed, hp, device='cpu', autocast=nullcontext, random_init=False):
    """The frozen encoder read by a linear model (SentEval's protocol): features computed once
    per example, ridge or logistic regression fitted on the training split, λ chosen on a
    holdout carved from it. Returns ([{eval name: scores}], λ)."""
    torch.manual_seed(seed)
    model = fresh_model(ckpt, random_init=random_init).to(device)
    X = features(model, data['train_tok'], hp['eval_batch_size'], device, autocast)
    evals = {name: features(model, enc, hp['eval_batch_size'], device, autocast)
             for name, enc in data['evals_tok'].items()}
    X, *X_evals = standardise(X, *evals.values())
    linear, lam = fit_probe(X, data['train']['label'], data['n_labels'], data['metrics'])
    return [{name: score(linear_predict(linear, Xe), data['evals'][name]['label'], data['metrics'])
             for name, Xe in zip(evals, X_evals)}], lam


def cosine(ckpt, data, seed, hp, device='cpu', autocast=nullcontext, random_init=False):
    """Zero-shot similarity: the cosine of the mean-pooled states of a and b. Returns [{eval name: scores}]."""
    torch.manual_seed(seed)
    model = fresh_model(ckpt, random_init=random_init).to(device)
    scores = {}
    for name, enc in data['evals_tok'].items():
        a = embed(model, enc['x'], enc['pad'], hp['eval_batch_size'], device, autocast)
        b = embed(model, enc['x_b'], enc['pad'], hp['eval_batch_size'], device, autocast)
        scores[name] = score(F.cosine_similarity(a, b, dim=-1).numpy(), data['evals'][name]['label'],
                             data['metrics'])
    return [scores]


def run_head(ckpt, data, head, seeds, hp, device, autocast, progress, dtype, random_init):
    """[(scores per epoch, train losses, probe λ or None)] for each seed. A pretrained probe or
    cosine is deterministic and runs once; every other run (fine-tuning, any random init) draws
    from its seed."""
    if head in ('probe', 'cosine') and not random_init:
        seeds = seeds[:1]
    runs = []
    for s in seeds:
        if head == 'probe':
            history, lam = probe(ckpt, data, s, hp, device, autocast, random_init)
            runs.append((history, [], lam))
        elif head == 'cosine':
            runs.append((cosine(ckpt, data, s, hp, device, autocast, random_init), [], None))
        else:
            runs.append((*finetune(ckpt, data, head, s, hp, device, autocast, progress, dtype, random_init), None))
    return runs, list(seeds)


def summarise(runs, seeds, name, first, metrics):
    """{metric: last-epoch mean over seeds, 'std': {...}, and with more than one epoch 'best_epoch'}."""
    last = {m: [h[-1][name][m] for h, _, _ in runs] for m in metrics}
    entry = {m: round(float(np.mean(v)), 4) for m, v in last.items()}
    entry['std'] = {m: round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else 0.0 for m, v in last.items()}
    if len(runs[0][0]) > 1:
        # the best epoch of each run, chosen on the first evaluation set's first metric
        best_epochs = [int(np.argmax([e[first][metrics[0]] for e in h])) for h, _, _ in runs]
        best = {m: [h[b][name][m] for (h, _, _), b in zip(runs, best_epochs)] for m in metrics}
        entry['best_epoch'] = {**{m: round(float(np.mean(v)), 4) for m, v in best.items()},
                               'epoch': [b + 1 for b in best_epochs]}
    entry['seeds'] = seeds
    return entry


def evaluate_task(ckpt, tok, data, head='pool', seeds=(42,), hp=None, device='cpu', autocast=nullcontext,
                  progress=False, dtype='float32', control=''):
    """Fine-tune once per seed (head='probe': fit a linear model on the frozen features;
    'cosine': score zero-shot) and summarise with the controls beside every score:
    {eval name: {metric: last-epoch mean, 'std', 'best_epoch', 'majority', 'bow', 'random_init'
    (control='random_init': the same protocol on the untrained architecture), 'n_train', ...}}."""
    hp = {**HPARAMS, **(hp or {})}
    t0 = time.time()
    metrics, n_labels = data['metrics'], data['n_labels']
    if head == 'cosine' and (n_labels != 1 or data['train']['b'] is None):
        raise ConfigError(f"head=cosine scores sentence similarity (stsb, sick_r), not {data['task']}")
    length = min(hp['max_len'], ckpt['model_args']['block_size'])
    joined = head in ('pool', 'decoder')  # one sequence per example; pair, probe and cosine read a and b apart
    check_max_len(length, joined and data['train']['b'] is not None)
    data['evals_tok'] = {name: tokenize(tok, e, joined, length) for name, e in data['evals'].items()}
    if head != 'cosine':
        data['train_tok'] = tokenize(tok, data['train'], joined, length)
    seeds = list(seeds)
    runs, used_seeds = run_head(ckpt, data, head, seeds, hp, device, autocast, progress, dtype, False)
    controls = None
    if control == 'random_init':
        controls = run_head(ckpt, data, head, seeds, hp, device, autocast, progress, dtype, True)
    bow = bow_baseline(data)
    first = next(iter(data['evals']))
    seconds = round(time.time() - t0, 2)
    results = {}
    for name, ev in data['evals'].items():
        entry = summarise(runs, used_seeds, name, first, metrics)
        entry['majority'] = majority(data['train']['label'], ev['label'], n_labels, metrics)
        entry['bow'] = bow[name][0]
        if controls is not None:
            entry['random_init'] = summarise(*controls, name, first, metrics)
        entry.update({'n_train': 0 if head == 'cosine' else len(data['train']['label']),
                      'n_eval': len(ev['label']), 'seconds': seconds, 'head': head,
                      'control': control or None, 'epochs': len(runs[0][0]) if head not in ('probe', 'cosine') else 0,
                      'skipped': data['skipped'], 'bow_lambda': bow[name][1]})
        if head == 'probe':
            entry['probe_lambda'] = [lam for _, _, lam in runs]
        if head not in ('probe', 'cosine'):
            entry['head_init'] = hp['head_init']
            entry['per_seed'] = {str(s): {'scores': [e[name] for e in h], 'train_loss': loss}
                                 for s, (h, loss, _) in zip(used_seeds, runs)}
        results[name] = entry
    return results


# ----------------------------------------------------------------------------------------------
# reporting

def beats(entry, control, m):
    """Whether a score clears a control: by more than the larger seed spread when seeds give one."""
    spread = max(entry['std'][m], control.get('std', {}).get(m, 0.0))
    return entry[m] > control[m] + spread


def versus(entry, m):
    """The controls a score clears and those it does not, at a glance: '>maj >bow <rand'."""
    marks = []
    for key, short in (('majority', 'maj'), ('bow', 'bow'), ('random_init', 'rand')):
        if key in entry:
            marks.append(('>' if beats(entry, entry[key], m) else '<') + short)
    return ' '.join(marks)


def markdown_table(results):
    """One row per (task, metric): the score (mean ± std over seeds), its best epoch when it was
    fine-tuned, the controls (majority, bag of words, random init when run) and which it clears."""
    lines = ['| task | metric | head | score | best epoch | majority | bow | random init | vs controls | n_train | '
             'n_eval | seconds |',
             '|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|']

    def shown(e, m):
        return f"{e[m]:.1f}" + (f" ± {e['std'][m]:.1f}" if len(e.get('seeds', ())) > 1 else '')
    for name, e in results.items():
        for m in (k for k in e if k in METRICS):  # in the task's order: mrpc f1 before accuracy
            best = (f"{e['best_epoch'][m]:.1f} (ep {','.join(map(str, e['best_epoch']['epoch']))})"
                    if 'best_epoch' in e else '-')
            rand = shown(e['random_init'], m) if 'random_init' in e else '-'
            bow = f"{e['bow'][m]:.1f}" if 'bow' in e else '-'  # results files older than the bow control
            lines.append(f"| {name} | {m} | {e['head']} | {shown(e, m)} | {best} | {e['majority'][m]:.1f} | "
                         f"{bow} | {rand} | {versus(e, m)} | {e['n_train']} | {e['n_eval']} | "
                         f"{e['seconds']:.1f} |")
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# sentence embeddings for users outside GLUE

_ENCODERS = {}  # (checkpoint path, its mtime, device, tokenizer dir) -> (model, tokenizer); the last two used


def load_encoder(path, device='cpu', tok_dir=''):
    """(model in eval mode on device, Tokenizer) for a checkpoint, cached: a script that calls
    encode() in a loop loads it once; a checkpoint rewritten on disk is loaded again."""
    device = runtime.resolve_device(device)
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else None, device, tok_dir)
    if key not in _ENCODERS:
        ckpt, tok = load_pretrained(path, tok_dir)
        _ENCODERS[key] = (fresh_model(ckpt).to(device).eval(), tok)
        while len(_ENCODERS) > 2:
            del _ENCODERS[next(iter(_ENCODERS))]
    return _ENCODERS[key]


def encode(texts, ckpt, batch_size=64, device='cpu', max_len=128, data_dir_tok=''):
    """Sentence embeddings: tensor (len(texts), n_embd), float32 on the CPU, not normalised.
    Each text is read as '[cls] text' (at most max_len tokens, capped at the model's block_size)
    and its embedding is the mean of the encoder's C concepts: with no trained pooling scorer
    for zero-shot use, the plain mean is the one choice that favours no concept. Cosine
    similarity between these vectors is what head=cosine scores on STS-B and SICK-R."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise ConfigError(f"encode() takes a string or a list of strings, got a {type(bad).__name__} among them")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    check_max_len(max_len, False)
    model, tok = load_encoder(ckpt, device, data_dir_tok)
    length = min(max_len, model.cfg.block_size)
    seqs = [[tok.cls_id] + ids[:length - 1] for ids in tok.encode_batch(list(texts))]
    if not seqs:
        return torch.empty(0, model.cfg.n_embd)
    return embed(model, seqs, tok.pad_id, batch_size, next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------

def check_settings(seeds, hp, head, task_list, max_train=0, max_eval=0):
    """The settings' ranges, before anything loads; returns the seeds as a list of ints."""
    for name, value in (('max_train_examples', max_train), ('max_eval_examples', max_eval)):
        if not value >= 0:
            raise ConfigError(f"{name}={value!r} must be >= 0 (0 = all examples)")
    parts = [s.strip() for s in str(seeds).split(',') if s.strip()]
    if not parts or not all(p.isascii() and p.isdigit() for p in parts) or len({int(p) for p in parts}) < len(parts):
        raise ConfigError(f"seeds={seeds!r} must be distinct non-negative integers, comma-separated "
                          f"(e.g. --seeds=1,2,3): each is one fine-tuning run")
    runtime.check_settings(hp)  # (eval_)batch_size, learning_rate > 0; weight_decay, grad_clip >= 0; dropout in [0, 1)
    if not hp['epochs'] >= 0:
        raise ConfigError(f"epochs={hp['epochs']!r} must be > 0, or 0 for the task's default")
    if not hp['head_learning_rate'] >= 0:
        raise ConfigError(f"head_learning_rate={hp['head_learning_rate']!r} must be > 0, or 0 for learning_rate")
    if hp['head_init'] not in ('random', 'probe'):
        raise ConfigError(f"head_init={hp['head_init']!r} must be 'random' (a fresh output layer) or 'probe' (the "
                          f"linear probe of the head's features at the start: LP-FT)")
    check_max_len(hp['max_len'], head in ('pool', 'decoder') and any(HUB[t][3] is not None for t in task_list))
    return [int(p) for p in parts]


def check_out(path):
    """The results file must be writable before hours of fine-tuning, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--out={path} is a directory; give a file name, "
                          f"e.g. --out={os.path.join(path, 'glue.json')}")
    if not os.path.isdir(folder):
        raise ConfigError(f"--out={path}: the directory {folder} does not exist; create it first "
                          f"or choose another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"--out={path} is not writable; choose another path")


def write_results(path, results):
    """The results so far, replacing path atomically (a temporary file beside it, then
    os.replace): an interrupted run keeps every task it finished, and never a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=2)
            f.write('\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise prepare_data.DataError(f"could not write the results to {path} ({e.strerror or e}); free space or "
                                     f"choose another --out (the scores so far are printed above)")


def remove_stray_temporaries(path):
    """Temporary results files that an interrupted run (a process no longer alive) left beside path."""
    for tmp in glob.glob(glob.escape(path) + '.tmp.*'):
        pid = tmp.rsplit('.', 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                os.remove(tmp)
            except PermissionError:  # alive, another user's
                pass


def main():
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read(), globals())
    runtime.one_line_errors()
    task_list = []
    for name in tasks.split(','):
        for t in PRESETS.get(name.strip(), name.strip()).split(','):
            if t and t not in task_list:
                task_list.append(t)
    unknown = [t for t in task_list if t not in TASKS]
    if unknown or not task_list:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}, "
                          f"or 'glue' / 'all'")
    if head not in ('pool', 'pair', 'decoder', 'probe', 'cosine'):
        raise ConfigError(f"unknown head '{head}'; choose pool, pair, decoder, probe or cosine")
    if control not in ('', 'random_init'):
        raise ConfigError(f"unknown control '{control}'; choose random_init (the untrained architecture) or ''")
    if head == 'cosine' and any(TASKS[t][1] != 1 for t in task_list):
        raise ConfigError(f"head=cosine scores sentence similarity without training: tasks stsb and sick_r only, "
                          f"not {', '.join(t for t in task_list if TASKS[t][1] != 1)}")
    hp = {k: globals()[k] for k in HPARAMS}
    seed_list = check_settings(seeds, hp, head, task_list, max_train_examples, max_eval_examples)

    path = out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f'glue_{head}.json')
    check_out(path)
    remove_stray_temporaries(path)

    rt = runtime.setup_runtime(device, dtype, seed_list[0])
    checkpoint, tok = load_pretrained(ckpt, data_dir_tok)
    args = checkpoint['model_args']  # (`ckpt` is the --ckpt path here)
    block = args['block_size']
    if max_len > block:
        print(f"max_len {max_len} exceeds the model's block_size; sequences are cut at {block} tokens")
    print(f"checkpoint {ckpt}: stage {checkpoint.get('stage', '?')}, decoder {args.get('decoder')}, "
          f"n_embd {args['n_embd']}, {len(checkpoint['model'])} tensors; head {head}, seeds {seed_list}, "
          f"device {rt.device}, dtype {rt.dtype}" + (f", control {control}" if control else ''))
    datas = [load_task(task, data_dir, max_train_examples, max_eval_examples) for task in task_list]  # all, first
    results = {}
    for task, data in zip(task_list, datas):
        sizes = ', '.join(f"{k} {len(v['label'])}" for k, v in data['evals'].items())
        skipped = sum(data['skipped'].values())
        print(f"{task}: train {len(data['train']['label'])}, {sizes}"
              + (f"; skipped {skipped} malformed rows {data['skipped']}" if skipped else ''), flush=True)
        res = evaluate_task(checkpoint, tok, data, head, seed_list, hp, rt.device, rt.autocast, progress, rt.dtype,
                            control)
        for name, e in res.items():
            shown = ', '.join(f"{m} {e[m]:.1f} ({versus(e, m)}: majority {e['majority'][m]:.1f}, bow {e['bow'][m]:.1f}"
                              + (f", random init {e['random_init'][m]:.1f}" if 'random_init' in e else '') + ')'
                              for m in e if m in METRICS)
            print(f"{name}: {shown} in {e['seconds']:.1f}s", flush=True)
        results.update(res)
        write_results(path, results)  # after every task: an interrupted run keeps what it finished
    print()
    print(markdown_table(results))
    print(f"\nwrote {path}")


if __name__ == '__main__':
    main()
