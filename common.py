"""What the training stages, eval_glue.py, sample.py and bench.py share, as plain functions (each train_*.py is its
own loop, top to bottom)."""
import base64
import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

from model import CONDITIONS, ENCODERS, RETIRED_ARGS, ConceptConfig, ConceptDiffusion, ConceptMLM


class InputError(SystemExit):
    """Bad input (a setting, a file, a checkpoint): the program ends with one line that says how to fix it."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# --- settings: one table of ranges for every script (a key a script lacks is skipped)

POSITIVE = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval',
            'n_layer', 'n_head', 'n_embd', 'n_concepts', 'ffn_size', 'n_dec_layer', 'learning_rate',
            'max_nonfinite_steps', 'bound_levels', 'eval_batch_size', 'max_len')
NON_NEGATIVE = ('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'grad_clip', 'seed',
                'recursive_iters', 'local_window', 'concept_loss_weight', 'concept_loss_warmup', 'max_minutes',
                'epochs', 'head_learning_rate', 'max_train_examples', 'max_eval_examples', 'span_len')
FRACTIONS = ('dropout', 'beta1', 'beta2', 'deletion_rate', 't_min', 'label_smoothing')
CHOICES = {'encoder': ENCODERS, 'dtype': ('float32', 'bfloat16', 'float16'), 'deletion_mode': ('hide', 'drop'),
           'condition': CONDITIONS}
MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes a 64-bit integer


def check_settings(config):
    """Every setting in its range before anything runs (1e309 is infinity; a zero count would divide by zero)."""
    for k, v in config.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"{k}={v!r} is not a finite number")
    ranges = ((POSITIVE, lambda v: v > 0, "> 0"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
              (FRACTIONS, lambda v: 0 <= v < 1, "in [0, 1)"), (('mask_prob',), lambda v: 0 < v <= 1, "in (0, 1]"))
    for keys, ok, rule in ranges:
        for k in keys:
            if k in config and not ok(config[k]):
                raise InputError(f"{k}={config[k]!r} must be {rule}")
    if 'seed' in config and not (isinstance(config['seed'], int) and config['seed'] <= MAX_SEED):
        raise InputError(f"seed={config['seed']!r} must be an integer from 0 to 2**63 - 1")
    for k, allowed in CHOICES.items():
        if k in config and config[k] not in allowed:
            raise InputError(f"{k}={config[k]!r}: choose one of {', '.join(allowed)}")
    if config.get('local_window', 0) >= config.get('block_size', math.inf):
        raise InputError(f"local_window={config['local_window']} reaches past the {config['block_size']}-token window: "
                         f"at most block_size - 1 = {config['block_size'] - 1}")


def print0(*args, **kwargs):
    """print on rank 0 of a torchrun job only."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs, flush=True)


# --- process: device, precision, DDP

def resolve_device(device):
    """'auto' -> cuda, mps or cpu; a device this torch cannot see is one line."""
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise InputError(f"device='{device}', but this torch ({torch.__version__}) sees no CUDA device; "
                         f"use --device=cpu or --device=auto")
    if device == 'mps' and not mps:
        raise InputError("device='mps', but MPS is not available here; use --device=cpu or --device=auto")
    return device


def keep_freed_memory():
    """glibc keeps 1 GiB of freed heap: else each CPU step page-faults its large tensors in again (docs/design.md)."""
    if platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc':
        import ctypes
        ctypes.CDLL(None).mallopt(-2, 1 << 30)  # M_TOP_PAD


def init_process(device='auto', dtype='bfloat16', seed=1337):
    """torchrun's environment -> (ddp, rank, local_rank, world_size, device, dtype); dropout is seeded per rank."""
    ddp = 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', '1')) > 1
    device = resolve_device(device)
    keep_freed_memory()
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if dtype == 'bfloat16' and (device == 'mps' or device.startswith('cuda') and
                                not torch.cuda.is_bf16_supported(including_emulation=False)):
        print0("no native bfloat16 on this device: using float16 with a GradScaler")
        dtype = 'float16'
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world_size, device, dtype


def device_type(device):
    return 'cuda' if device.startswith('cuda') else device


def autocast(device, dtype):
    """The context every forward pass runs in."""
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type(device), dtype=getattr(torch, dtype))


def is_ddp():
    return dist.is_available() and dist.is_initialized()


def mean_over_ranks(value):
    """The mean across ranks of a number or 0-d tensor, as a float. It synchronises: call it at log time."""
    if not is_ddp():
        return float(value)
    device = f'cuda:{torch.cuda.current_device()}' if dist.get_backend() == 'nccl' else 'cpu'
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().to(device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def split_global_batch(batch_size, gradient_accumulation_steps, world_size):
    """-> (micro-batches per rank, micro-batch size) that keep batch_size x accumulation exact at any world size."""
    global_batch = batch_size * gradient_accumulation_steps
    accum = -(-gradient_accumulation_steps // world_size)
    if global_batch % (accum * world_size) == 0:
        return accum, global_batch // (accum * world_size)
    if global_batch % world_size == 0:
        share = global_batch // world_size
        accum = next(a for a in range(accum, share + 1) if share % a == 0)
        return accum, share // accum
    raise InputError(f"the global batch of {global_batch} sequences (batch_size={batch_size} x "
                     f"gradient_accumulation_steps={gradient_accumulation_steps}) cannot be split evenly over "
                     f"{world_size} processes; choose batch_size x gradient_accumulation_steps divisible by "
                     f"{world_size}")


def finish_process(ddp):
    """A torchrun worker leaves by os._exit: torch's exit can abort a multi-process CPU run (docs/design.md)."""
    if ddp:
        dist.barrier()  # rank 0 may still be writing a checkpoint; gloo aborts if a peer leaves first
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# --- the data directory (prepare_data.py writes it): train.bin / val.bin (uint16 or uint32 ids, documents back to
# back, each ended by <|endofdoc|>), train_docs.npy / val_docs.npy (int64 start of every document),
# tokenizer.tiktoken (a trained BPE's ranks), meta.json (written last)

FORMAT_VERSION = 1
SPECIALS = {'eod': '<|endofdoc|>', 'pad': '<|pad|>', 'mask': '<|mask|>', 'cls': '<|cls|>', 'sep': '<|sep|>'}
SPLITS = ('train', 'val')
CORPUS_SUFFIXES = ('.txt', '.jsonl', '.json', '.parquet', '.xz', '.gz', '.bz2')


def prepare_command(data_dir, dataset=None):
    return f"create it with: python prepare_data.py --dataset={dataset or '<corpus>'} --data_dir={data_dir}"


def read_json(path, fix):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}); {fix}")


def load_meta(data_dir):
    """meta.json of a prepared data directory whose files are whole; otherwise one line with the fix."""
    name, path = os.path.basename(os.path.normpath(data_dir)), os.path.join(data_dir, 'meta.json')
    if os.path.isfile(data_dir) or os.path.isdir(data_dir) and not os.path.exists(path) \
            and any(f.endswith(CORPUS_SUFFIXES) for f in os.listdir(data_dir)):
        stem = name.split('.')[0]
        raise InputError(f"{data_dir} is a corpus, not a prepared data directory; prepare it first: python "
                         f"prepare_data.py --dataset={data_dir} (it writes data/{stem}), then use --data_dir=data/{stem}")
    remedy = prepare_command(data_dir, name if name == 'pydocs' else None)
    if not os.path.isdir(data_dir):
        raise InputError(f"data directory {data_dir} does not exist; {remedy}")
    if not os.path.isfile(path):
        raise InputError(f"{data_dir} has no meta.json (not a prepared data directory, or preparing it did not "
                         f"finish); {remedy}")
    meta = read_json(path, remedy)
    meta = meta if isinstance(meta, dict) else {}
    source = meta.get('source')
    remedy = prepare_command(data_dir, source.get('dataset') if isinstance(source, dict) else None)
    if meta.get('format_version') != FORMAT_VERSION:
        raise InputError(f"{data_dir} has format_version {meta.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}; prepare it again: {remedy}")
    problem = meta_problem(meta)
    if problem:
        raise InputError(f"{path} is damaged: {problem}; {remedy}")
    for split in SPLITS:
        check_split(data_dir, meta, split, remedy, thorough=True)
    if meta['tokenizer'].get('file') and not os.path.isfile(os.path.join(data_dir, meta['tokenizer']['file'])):
        raise InputError(f"{data_dir}: {meta['tokenizer']['file']} is missing; {remedy}")
    return meta


def meta_problem(meta):
    """What a meta.json lacks or has malformed, or None: every reader indexes these keys."""
    types = {'tokenizer': dict, 'vocab_size': int, 'special_tokens': dict, 'dtype': str, 'splits': dict, 'source': dict}
    for key, kind in types.items():
        if key not in meta:
            return f"it has no '{key}'"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"its '{key}' is a {type(meta[key]).__name__}, not a {kind.__name__}"
    if meta['dtype'] != token_dtype(meta['vocab_size']).name:
        return f"dtype {meta['dtype']!r} does not fit vocab_size {meta['vocab_size']}"
    specials = meta['special_tokens']
    if set(specials) != set(SPECIALS) or not all(type(v) is int and 0 <= v < meta['vocab_size']
                                                 for v in specials.values()):
        return f"its special_tokens must map {', '.join(SPECIALS)} to ids below vocab_size"
    missing = [k for k in ('kind', 'name', 'pattern', 'n_base') if k not in meta['tokenizer']]
    if missing:
        return f"its tokenizer recipe has no {', '.join(repr(k) for k in missing)}"
    for split in SPLITS:
        info = meta['splits'].get(split)
        if not isinstance(info, dict) or not all(type(info.get(k)) is int and info[k] >= 0 for k in ('tokens', 'docs')):
            return f"its splits has no '{split}' entry with 'tokens' and 'docs' counts"
        if info['docs'] == 0 or info['tokens'] < info['docs']:  # every document ends in <|endofdoc|>
            return f"its {split} split is empty ({info['docs']} documents, {info['tokens']} tokens)"
    return None


def token_dtype(vocab_size):
    """The smallest unsigned dtype that holds every id < vocab_size."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


_ids_checked = set()  # versions of .bin files whose ids were all found below vocab_size, in this process


def check_split(data_dir, meta, split, remedy, thorough=False):
    """A split's files against meta.json -> its memory-mapped document starts. thorough (load_meta's, not each step's):
    the offsets rise and every id is below vocab_size (a right-sized .bin can hold garbage), once per file version."""
    info = meta['splits'][split]
    bin_path, docs_path = os.path.join(data_dir, f'{split}.bin'), os.path.join(data_dir, f'{split}_docs.npy')
    for path in (bin_path, docs_path):
        if not os.path.isfile(path):
            raise InputError(f"{path} is missing; {remedy}")
    want, have = info['tokens'] * np.dtype(meta['dtype']).itemsize, os.path.getsize(bin_path)
    if have != want:
        raise InputError(f"{bin_path} has {have} bytes but meta.json says {info['tokens']} {meta['dtype']} tokens "
                         f"({want} bytes): truncated or corrupt; {remedy}")
    try:
        starts = np.load(docs_path, mmap_mode='r')
    except (OSError, ValueError, EOFError):
        raise InputError(f"{docs_path} is not a readable .npy array: truncated or corrupt; {remedy}")
    if starts.ndim != 1 or starts.dtype.kind not in 'iu' or len(starts) != info['docs']:
        raise InputError(f"{docs_path} holds {starts.dtype} of shape {starts.shape}, but meta.json says "
                         f"{info['docs']} int64 document offsets: corrupt; {remedy}")
    rising = not thorough or (starts[1:] >= starts[:-1]).all()
    if len(starts) and (starts[0] != 0 or starts[-1] >= info['tokens'] or not rising):
        raise InputError(f"{docs_path}: the document offsets do not rise from 0 to below the {info['tokens']} "
                         f"tokens of {split}.bin: corrupt; {remedy}")
    if thorough:
        st = os.stat(bin_path)
        version = (os.path.realpath(bin_path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if version not in _ids_checked:
            tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r', shape=(info['tokens'],))
            top = max(int(tokens[a:a + 2 ** 24].max()) for a in range(0, info['tokens'], 2 ** 24))
            if top >= meta['vocab_size']:
                raise InputError(f"{bin_path} holds token id {top}, but the vocabulary has {meta['vocab_size']} ids: "
                                 f"corrupt; {remedy}")
            _ids_checked.add(version)
    return starts


def read_meta_file(data_dir):
    try:
        return read_json(os.path.join(data_dir, 'meta.json'), '')
    except InputError:
        return None


_versions_seen = {}  # .bin path -> (inode, mtime) this process last read


def open_split(data_dir, split, meta):
    """(tokens, doc_starts) of a split as memmaps, cheap per batch; a replaced file must still fit the job's meta."""
    changed = InputError(f"{data_dir} changed while this job ran (prepared again or removed), so the job's data "
                         f"is gone; start the job again on the new data, or prepare the old corpus elsewhere")
    try:
        doc_starts = check_split(data_dir, meta, split, prepare_command(data_dir, meta['source'].get('dataset')))
    except InputError:
        if read_meta_file(data_dir) != meta:
            raise changed from None
        raise
    bin_path = os.path.join(data_dir, f'{split}.bin')
    st = os.stat(bin_path)
    version, seen = (st.st_ino, st.st_mtime_ns), _versions_seen.get(bin_path)
    if seen is not None and seen != version and read_meta_file(data_dir) != meta:
        raise changed
    _versions_seen[bin_path] = version
    tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r', shape=(meta['splits'][split]['tokens'],))
    return tokens, doc_starts


# --- the tokenizer

class Tokenizer:
    """A tiktoken Encoding with our 5 special tokens on top; a '<|mask|>' in a text is characters, not the mask id."""

    def __init__(self, enc, recipe):
        self.enc, self.recipe, self.vocab_size = enc, recipe, enc.n_vocab
        ids = map(enc.encode_single_token, SPECIALS.values())
        self.eod_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id = ids

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=2):
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids):
        """Text of ids; specials show as their names, an id outside the vocabulary as '<|unk:ID|>'."""
        ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
        try:
            return self.enc.decode(ids)
        except (KeyError, OverflowError):
            pass
        out, run = [], []
        for i in ids:
            try:
                self.enc.decode_single_token_bytes(i)
                run.append(i)
            except (KeyError, OverflowError):
                out += [self.enc.decode(run), f'<|unk:{i}|>']
                run = []
        return ''.join(out) + self.enc.decode(run)


def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def named_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - unknown name, or no network to download the vocabulary
        raise InputError(f"could not load the tiktoken encoding '{name}' ({type(e).__name__}: {first_line(e)}); its "
                         f"vocabulary is downloaded on first use, which fails offline: use --tokenizer=bpe to train "
                         f"one on the corpus")


def with_specials(name, pattern, ranks, base_specials, n_base):
    specials = {**base_specials, **{tok: n_base + i for i, tok in enumerate(SPECIALS.values())}}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def tokenizer_from_recipe(recipe, data_dir, fix):
    """The Tokenizer of meta.json's recipe (a checkpoint keeps it); bpe reads the ranks file in data_dir, by sha256."""
    if recipe['kind'] == 'bpe':
        path = os.path.join(data_dir or '.', recipe['file'])
        if not os.path.isfile(path):
            raise InputError(f"{path}, the tokenizer, is missing; {fix}")
        if recipe.get('file_sha256') and sha256_file(path) != recipe['file_sha256']:
            raise InputError(f"{path} is not the tokenizer this model was trained with (sha256 differs); {fix}")
        with open(path, 'rb') as f:  # per line, base64 of a token's bytes and its rank (tiktoken's own loader
            ranks = {base64.b64decode(token): int(rank)  # caches by path under /tmp: stale after a re-prepare)
                     for token, rank in (line.split() for line in f if line.strip())}
        base_specials = {}
    elif recipe['kind'] == 'tiktoken':
        base = named_encoding(recipe['name'])
        ranks, base_specials = base._mergeable_ranks, base._special_tokens  # tiktoken's documented extension path
        if base.n_vocab != recipe['n_base'] or base._pat_str != recipe['pattern']:
            raise InputError(f"tiktoken's '{recipe['name']}' differs from the one the data was prepared with "
                             f"({base.n_vocab} vs {recipe['n_base']} tokens); prepare the data again")
    else:
        raise InputError(f"unknown tokenizer kind {recipe['kind']!r} (written by a newer prepare_data.py?)")
    return Tokenizer(with_specials(recipe['name'], recipe['pattern'], ranks, base_specials, recipe['n_base']), recipe)


def load_tokenizer(data_dir):
    return tokenizer_from_recipe(load_meta(data_dir)['tokenizer'], data_dir, prepare_command(data_dir))


def checkpoint_tokenizer(checkpoint, data_dir=''):
    """The tokenizer a checkpoint was trained with, from the folder it records (or data_dir)."""
    if checkpoint.get('exported'):
        fix = "the export is incomplete or edited: export the checkpoint again"
    else:
        fix = (f"if the data directory of this checkpoint ({checkpoint.get('data_dir')}) moved, pass "
               f"--data_dir=<where it is now>; if it was prepared again, use the checkpoint's own")
    return tokenizer_from_recipe(checkpoint['tokenizer'], data_dir or checkpoint.get('data_dir'), fix)


# --- batches

def noise_generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


class TokenWindows:
    """Batches of token windows from one split. Every rank draws the offsets of the whole global step from one seeded
    generator and keeps its slice, and a micro-batch's noise seed is (seed, step, global micro-batch index): the data
    and masking are the same at any world size and on resume. The generator and the step are the whole state."""

    def __init__(self, data_dir, split, block_size, batch_size, doc_aligned=False, seed=1337,
                 rank=0, world_size=1, accum=1, device='cpu'):
        self.meta = load_meta(data_dir)
        self.data_dir, self.split, self.block_size, self.batch_size = data_dir, split, block_size, batch_size
        self.rank, self.world_size, self.accum, self.device, self.seed = rank, world_size, accum, device, seed
        tokens, doc_starts = open_split(data_dir, split, self.meta)
        self.n_tokens = len(tokens)
        if self.n_tokens < block_size + 1:
            raise InputError(f"{data_dir}: the {split} split has {self.n_tokens} tokens, fewer than block_size="
                             f"{block_size}; use a smaller --block_size or prepare more data")
        self.starts = None  # or, doc_aligned, the document starts that begin a full window
        if doc_aligned:
            starts = np.asarray(doc_starts, dtype=np.int64)
            self.starts = torch.from_numpy(starts[starts + block_size <= self.n_tokens])
            if len(self.starts) == 0:
                raise InputError(f"{data_dir}: no document of {split} starts a full window")
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.prefetched = None  # (the state before the draw, the drawn step)

    def next_step(self):
        """This rank's micro-batches of one optimizer step: accum pairs (ids (B, T) int64 on the device, noise seed)."""
        batches = self.prefetched[1] if self.prefetched else self.draw()
        self.prefetched = None
        return batches

    def prefetch(self):
        """Draw the next step and start its copy to the device while this one computes; state_dict is the one before."""
        if self.prefetched is None:
            self.prefetched = (self.state_dict(), self.draw())

    def draw(self):
        n_global = self.world_size * self.accum
        n = n_global * self.batch_size
        if self.starts is None:
            offsets = torch.randint(self.n_tokens - self.block_size + 1, (n,), generator=self.generator)
        else:
            offsets = self.starts[torch.randint(len(self.starts), (n,), generator=self.generator)]
        offsets = offsets.view(n_global, self.batch_size)
        tokens, _ = open_split(self.data_dir, self.split, self.meta)  # re-opened per draw: RSS stays flat
        out = []
        for micro in range(self.accum):
            g = self.rank * self.accum + micro  # the global micro-batch index
            idx = torch.stack([torch.from_numpy(tokens[o:o + self.block_size].astype(np.int64))
                               for o in offsets[g].tolist()])
            if self.device.startswith('cuda'):
                idx = idx.pin_memory().to(self.device, non_blocking=True)
            out.append((idx.to(self.device), (self.seed * 1_000_003 + self.step * 9_973 + g) % (2 ** 63)))
        self.step += 1
        return out

    def state_dict(self):
        return self.prefetched[0] if self.prefetched else {'generator': self.generator.get_state(), 'step': self.step}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'].cpu())
        self.step, self.prefetched = state['step'], None


def fixed_batches(data_dir, split, block_size, batch_size, n_batches, doc_aligned, seed, rank, device):
    """n_batches drawn once with a fixed seed: validation sees the same windows and noise at every evaluation."""
    windows = TokenWindows(data_dir, split, block_size, batch_size, doc_aligned, seed + 7919 * rank, device=device)
    return [windows.next_step()[0] for _ in range(n_batches)]


def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, budget_fraction=None):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters (or at the end of a time budget: budget_fraction)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if budget_fraction is not None:
        ratio = min(1.0, budget_fraction)
    elif it >= lr_decay_iters:
        return min_lr
    else:
        ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# --- files: one atomic write, one output-path check, one cleanup of what a killed run left

def cause(e):
    """Why a write failed, in a few words."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{os.strerror(e.errno)} (errno {errno.errorcode.get(e.errno, e.errno)})"
    text = first_line(e)
    if 'unexpected pos' in text or 'PytorchStreamWriter' in text:  # torch's zip writer, cut short
        return "the write was cut short: the disk is full or the file-size limit (ulimit -f) was reached"
    return text


def first_line(e, limit=200):
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


TEMPORARY = re.compile(r'(.+)\.tmp\.(\d+)(\.old)?$')  # how every writer here names its temporaries


def remove_stale_temporaries(folder, stem=None):
    """Remove the temporaries (of name stem, or all) that a killed writer, a process no longer alive, left in folder."""
    removed = 0
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        m = TEMPORARY.match(name)
        if not m or stem is not None and m.group(1) != stem:
            continue
        if int(m.group(2)) != os.getpid():
            try:
                os.kill(int(m.group(2)), 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        remove(os.path.join(folder, name))
        removed += 1
    if removed:
        print0(f"removed {removed} temporary file(s) that an interrupted run left in {folder}")


def atomic_write(path, write, then='free space there or choose another place'):
    """write(tmp) builds a file or folder beside path, which one rename then replaces: a crash never leaves a torn
    result, and a failed write leaves path as it was, no temporary, and one line."""
    path = os.path.normpath(path)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        if os.path.isdir(path) and not os.path.islink(path):  # a folder: the old one aside, the new one in
            os.rename(path, tmp + '.old')
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(tmp + '.old', path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        remove(tmp + '.old')
        if isinstance(e, (OSError, RuntimeError)):
            state = 'is unchanged' if os.path.exists(path) else 'was not written'
            raise InputError(f"could not write {path}: {cause(e)}; {path} {state}: {then}") from None
        raise
    remove(tmp + '.old')


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def check_output(path, what='--out', folder=False, replaced=False):
    """Before any long work: path can be written, as a file or a folder (replaced: renamed over, so no mount point)."""
    full = os.path.abspath(path)
    if os.path.exists(full) and os.path.isdir(full) != folder:
        kind, want = ('a file', 'a directory') if folder else ('a directory', 'a file name')
        raise InputError(f"{what}={path} is {kind}; give {want}")
    if replaced and os.path.ismount(full):
        raise InputError(f"{what}={path} is a mount point, which cannot be replaced; use a folder inside it, "
                         f"e.g. {what}={os.path.join(path, 'data')}")
    parent = os.path.dirname(full)
    if not folder and not os.path.isdir(parent):
        raise InputError(f"{what}={path}: the directory {parent} does not exist; create it first or choose another "
                         f"path")
    existing = full if folder and not replaced else parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{what}={path} is under {existing}, a file, not a directory; choose another {what}")
    probe = os.path.join(existing, f'.write_test.tmp.{os.getpid()}')
    try:
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{what}={path} cannot be written ({existing}: {cause(e)}); choose another {what}")
    if folder and not replaced:
        remove_stale_temporaries(full)
    else:
        remove_stale_temporaries(parent, os.path.basename(full))


# --- checkpoints: tensors and plain Python values only (they load with weights_only=True)

EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_FORMAT = 'config.json', 'model.safetensors', ('concept-encoder', 1)
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')  # owner/name


def is_hub_id(path):
    return not os.path.exists(path) and bool(HUB_ID.match(path)) and not path.endswith(('.pt', '.pth'))


def save_checkpoint(ckpt, checkpoint):
    os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
    atomic_write(ckpt, lambda tmp: torch.save(checkpoint, tmp),
                 "free space (or raise the limit), then continue with --init_from=resume" if os.path.exists(ckpt)
                 else "free space (or raise the limit, or choose another --out_dir) and run again")


def describe(obj):
    if torch.is_tensor(obj):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return f"a bare state_dict ({len(obj)} tensors, e.g. {next(iter(obj))!r})"
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(repr, list(obj)[:6]))}{', ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def load_checkpoint(ckpt, map_location='cpu'):
    """A ckpt.pt, a folder of tools/export.py or a hub id of one -> the dict ('model', 'model_args', 'tokenizer'...)."""
    if os.path.isdir(ckpt) or is_hub_id(ckpt):
        return load_export(ckpt, map_location)
    if not os.path.isfile(ckpt):
        raise InputError(f"checkpoint {ckpt} not found (train one first, e.g. python train_mlm.py config/tiny.py)")
    try:
        checkpoint = torch.load(ckpt, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        if 'GLOBAL' in str(e) or 'Unsupported global' in str(e):  # a pickled object (text: 'Unsupported operand')
            raise InputError(f"checkpoint {ckpt} holds Python objects besides tensors, which loading would run as "
                             f"code (arbitrary code execution); it was not written by this project, so it was not "
                             f"loaded")
        why = type(e).__name__ if 'Weights only load failed' in str(e) else f"{type(e).__name__}: {first_line(e)}"
        raise InputError(f"checkpoint {ckpt} could not be read ({why}); it is corrupt or not a checkpoint of this "
                         f"project")  # torch's own text would advise weights_only=False
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in ('model', 'model_args')):
        raise InputError(f"{ckpt} holds {describe(checkpoint)}, not a checkpoint of this project: expected the dict "
                         f"train_*.py writes, with 'model', 'model_args' and more")
    if not isinstance(checkpoint['model'], dict) or not isinstance(checkpoint['model_args'], dict):
        raise InputError(f"{ckpt}: 'model' must be a state_dict and 'model_args' a dict, found "
                         f"{describe(checkpoint['model'])} and {describe(checkpoint['model_args'])}")
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def load_export(path, map_location='cpu'):
    """An exported folder (model.safetensors, config.json, the tokenizer) or a hub id of one -> load_checkpoint's."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(repo_id=path)
        except Exception as e:  # noqa: BLE001 - no network, no such repo, no access: one answer
            raise InputError(f"{path} is not a local path, and downloading it from the hub failed "
                             f"({type(e).__name__}: {first_line(e)}); check the name, your network or HF_TOKEN")
    config_path, weights = os.path.join(path, EXPORT_CONFIG), os.path.join(path, EXPORT_WEIGHTS)
    if not os.path.isfile(config_path):
        raise InputError(f"{path} is a directory without {EXPORT_CONFIG}: give a ckpt.pt or a folder written by "
                         f"tools/export.py")
    card = read_json(config_path, "export the checkpoint again")
    if (card.get('format'), card.get('format_version')) != EXPORT_FORMAT:
        raise InputError(f"{config_path} is not a concept-encoder export of format {EXPORT_FORMAT[1]} (format "
                         f"{card.get('format')!r}, version {card.get('format_version')!r}); export the checkpoint "
                         f"again")
    if not os.path.isfile(weights):
        raise InputError(f"{weights} is missing; export the checkpoint again")
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        state = load_file(weights, device=str(map_location))
        with safe_open(weights, 'pt') as f:
            tied = json.loads((f.metadata() or {}).get('tied', '{}'))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{weights} could not be read ({type(e).__name__}: {e}); it may be corrupt")
    state.update({alias: state[name] for alias, name in tied.items()})
    return {'stage': card['stage'], 'model': state, 'model_args': card['model_args'],
            'config': card.get('training_config', {}), 'iter_num': card.get('iter_num'),
            'best_val_loss': card.get('best_val_loss'), 'tokenizer': card['tokenizer'],
            'special_tokens': card['special_tokens'], 'data_dir': os.path.abspath(path),
            'trained_on': card.get('trained_on'), 'exported': True}


def nonfinite_tensors(state):
    """Names of the floating-point tensors of a state_dict that hold a nan or an inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


def load_weights(model, state, ckpt):
    """model.load_state_dict(state), a mismatch said in one line rather than torch's list of keys."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and (not torch.is_tensor(state[k]) or state[k].shape != own[k].shape)]
    if any(k.endswith(('wpe.weight', 'decoder.mix')) for k in unexpected):
        raise InputError(f"{ckpt} has learned position tables (written before positions became fixed sinusoids): "
                         f"train it again, or use it with the code of its own commit (its run.json names it)")
    if missing or unexpected or reshaped:
        parts = [f"{label} {len(names)} (e.g. {names[0]})" for label, names in
                 (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped)) if names]
        raise InputError(f"{ckpt}: the weights do not fit the model its model_args describe: {', '.join(parts)}; it "
                         f"was written by another version of model.py or edited")
    model.load_state_dict(state)


def build_model(model_args, ckpt='the settings'):
    """ConceptDiffusion for decoder='diffusion', else ConceptMLM; a setting the model refuses is one line.
    Older checkpoints' retired options load where they hold the only value model.py still has."""
    retired = [f"{k}={v!r}" for k, v in model_args.items() if k in RETIRED_ARGS and v != RETIRED_ARGS[k]]
    if retired:
        raise InputError(f"{ckpt}: {', '.join(retired)} was retired from model.py (docs/design.md, 'Retired "
                         f"ablations'); read it with a checkout of c335a25, which has the code")
    model_args = {k: v for k, v in model_args.items() if k not in RETIRED_ARGS}
    try:
        cfg = ConceptConfig(**model_args)
        return (ConceptDiffusion if cfg.decoder == 'diffusion' else ConceptMLM)(cfg)
    except TypeError as e:
        raise InputError(f"{ckpt}: its model_args do not fit this model.py ({e}); it was written by another version")
    except ValueError as e:
        raise InputError(str(e))


def load_model(checkpoint, ckpt='the checkpoint', device='cpu', **overrides):
    """A path or load_checkpoint's dict -> (model in eval mode, the dict); overrides: ConceptConfig fields."""
    if isinstance(checkpoint, str):
        ckpt, checkpoint = checkpoint, load_checkpoint(checkpoint)
    bad = nonfinite_tensors(checkpoint['model'])
    if bad:
        raise InputError(f"{ckpt} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run that wrote it "
                         f"diverged; use an earlier checkpoint or train again with a lower learning_rate")
    model = build_model({**checkpoint['model_args'], **overrides}, ckpt)
    load_weights(model, checkpoint['model'], ckpt)
    return model.to(device).eval(), checkpoint


def check_vocab(checkpoint, meta, ckpt, data_dir):
    """A checkpoint means something only with its own tokenizer: the same size and the same recipe."""
    if checkpoint['model_args'].get('vocab_size') != meta['vocab_size']:
        raise InputError(f"checkpoint {ckpt} has vocab_size {checkpoint['model_args'].get('vocab_size')} but "
                         f"{data_dir} has {meta['vocab_size']}: use the data directory the checkpoint was trained on")
    if checkpoint.get('tokenizer') not in (None, meta['tokenizer']):
        name = checkpoint['tokenizer']
        name = name.get('name') if isinstance(name, dict) else name
        raise InputError(f"checkpoint {ckpt} was trained with another tokenizer than {data_dir}'s ({name} vs "
                         f"{meta['tokenizer'].get('name')}, or the same name trained on other text): use the data "
                         f"directory the checkpoint was trained on")


# --- a training stage's model: from scratch, resumed, or warm-started from another stage

# the settings besides the architecture that shape a run's course: a resume that changes one is no longer exact
TRAJECTORY_KEYS = ('learning_rate', 'min_lr', 'warmup_iters', 'weight_decay', 'beta1', 'beta2', 'grad_clip',
                   'batch_size', 'gradient_accumulation_steps', 'doc_aligned', 'seed', 'dtype', 'mask_prob',
                   'deletion_rate', 'deletion_mode', 't_min', 'label_smoothing', 'elbo_weight', 'stratified_t')


def init_model(stage, config, meta, data_dir, ckpt, **fixed):
    """init_from: 'scratch', 'resume' (ckpt's run, as it was) or a checkpoint of any stage to warm-start from ->
    (model, model_args: the settings' ConceptConfig fields, the vocabulary and fixed; the checkpoint to resume)."""
    special, checkpoint, init_from = meta['special_tokens'], None, config['init_from']
    model_args = {k: config[k] for k in ConceptConfig.__dataclass_fields__ if k in config}
    model_args.update(vocab_size=meta['vocab_size'], pad_id=special['pad'], mask_id=special['mask'],
                      eod_id=special['eod'], cls_id=special['cls'], sep_id=special['sep'], **fixed)
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt)
        missing = [k for k in ('optimizer', 'iter_num', 'best_val_loss', 'rng', 'sampler') if k not in checkpoint]
        if missing:
            raise InputError(f"{ckpt} has weights but no training state ({', '.join(missing)} missing), so it cannot "
                             f"be resumed; warm-start from it instead: --init_from={ckpt} with another --out_dir")
        if checkpoint.get('stage') != stage:
            raise InputError(f"{ckpt} is a {checkpoint.get('stage')} checkpoint and --init_from=resume continues the "
                             f"same stage; to start {stage} from it: --init_from={ckpt} with another --out_dir")
        check_vocab(checkpoint, meta, ckpt, data_dir)
        changed = [f"{k}={checkpoint['model_args'][k]!r} there, {v!r} here" for k, v in model_args.items()
                   if k in checkpoint['model_args'] and checkpoint['model_args'][k] != v]
        if changed:  # the run goes on as it was: its architecture, its windows
            raise InputError(f"--init_from=resume continues {ckpt} with its settings, but {'; '.join(changed)}: "
                             f"pass the config the run was started with")
        model_args = checkpoint['model_args']
    model = build_model(model_args)
    if checkpoint is not None:
        load_weights(model, checkpoint['model'], ckpt)
        print0(f"resumed from {ckpt} at iter {checkpoint['iter_num']}")
    elif init_from != 'scratch':
        warm_start(model, init_from, meta, data_dir)
    return model, model_args, checkpoint


def warm_start(model, ckpt, meta, data_dir):
    """Copy each tensor of another stage's checkpoint whose name and shape match; say what was loaded and what not."""
    checkpoint = load_checkpoint(ckpt)
    bad = nonfinite_tensors(checkpoint['model'])
    if bad:
        raise InputError(f"{ckpt} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run that wrote it "
                         f"diverged; warm-start from an earlier checkpoint")
    own = model.state_dict()
    loaded = [k for k, v in checkpoint['model'].items() if k in own and own[k].shape == v.shape]
    own.update({k: checkpoint['model'][k] for k in loaded})
    model.load_state_dict(own)
    new, unused = sorted(set(own) - set(loaded)), sorted(set(checkpoint['model']) - set(loaded))
    print0(f"warm start from {ckpt} ({checkpoint.get('stage', '?')} stage, iter {checkpoint.get('iter_num', '?')}): "
           f"loaded {len(loaded)} tensors, {len(new)} new, {len(unused)} not used")
    for label, names in (('loaded', sorted(loaded)), ('new', new), ('unused', unused)):
        if names:
            print0(f"  {label + ':':7s} " + ', '.join(names))
    check_vocab(checkpoint, meta, ckpt, data_dir)


def restore_training_state(checkpoint, optimizer, scaler, train_windows, rank, config):
    """Exact resume besides the weights -> (iter_num, best_val_loss, train_seconds). At another world size rank r
    takes RNG state r mod the old count (no longer bit for bit)."""
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint.get('scaler'):
            scaler.load_state_dict(checkpoint['scaler'])
        train_windows.load_state_dict(checkpoint['sampler'])
        states = checkpoint['rng']
        state = states[rank % len(states)] if isinstance(states, list) else states
        torch.set_rng_state(state['torch'].cpu())
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise InputError(f"the training state in the checkpoint does not fit this run ({type(e).__name__}: "
                         f"{first_line(e)}); it was written by another version or edited: warm-start from it with "
                         f"--init_from=<its path> and another --out_dir")
    it, old = checkpoint['iter_num'], checkpoint.get('config')
    for note in resume_differences(old, config) if isinstance(old, dict) else []:
        print0(f"note: resuming at iter {it}, {note}")
    return it, checkpoint['best_val_loss'], checkpoint.get('train_seconds', 0.0)


def resume_differences(old, new):
    """One line for each way the resumed run (settings new) leaves the run it continues (old)."""
    notes = []
    decay_old = old.get('lr_decay_iters') or old.get('max_iters')
    decay_new = new.get('lr_decay_iters') or new.get('max_iters')
    if decay_old != decay_new and not new.get('max_minutes'):
        default = " (lr_decay_iters=0 means max_iters)" if not new.get('lr_decay_iters') else ""
        notes.append(f"the LR schedule changes: it now decays over {decay_new} iterations, the run's own over "
                     f"{decay_old}{default}; --lr_decay_iters={decay_old} keeps the run's own schedule")
    changed = [f"{k}={old[k]!r} there, {new[k]!r} here" for k in TRAJECTORY_KEYS
               if k in old and k in new and old[k] != new[k]]
    if changed:
        notes.append(f"settings differ from the run's ({'; '.join(changed)}): pass the run's values to continue it "
                     f"exactly")
    return notes


def training_checkpoint(stage, raw_model, optimizer, scaler, model_args, config, iter_num, best_val_loss,
                        train_windows, meta, data_dir, train_seconds):
    """The dict ckpt.pt holds (call on every rank, for its RNG state), with the tokenizer and the data directory."""
    bad = nonfinite_tensors(raw_model.state_dict())
    if bad:
        raise InputError(f"iter {iter_num}: the weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): not "
                         f"saved, the checkpoint is left as it was; try a lower learning_rate, more warmup_iters or "
                         f"grad_clip > 0")
    rng = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        rng['cuda'] = torch.cuda.get_rng_state_all()
    states = [rng]  # every rank's, in rank order: each draws its own dropout masks
    if is_ddp():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng)
    return {'stage': stage, 'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler.is_enabled() else None, 'model_args': model_args,
            'config': config, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'rng': states,
            'sampler': train_windows.state_dict(), 'train_seconds': train_seconds, 'tokenizer': meta['tokenizer'],
            'special_tokens': meta['special_tokens'], 'data_dir': os.path.abspath(data_dir)}


def default_out_dir(stage, encoder='concept'):
    """out/<last config file's name>_<stage>[_standard]: stages, arms and sizes never overwrite each other."""
    configs = [a for a in sys.argv[1:] if not a.startswith('--')]
    name = os.path.splitext(os.path.basename(configs[-1]))[0] if configs else 'run'
    return os.path.join('out', f"{name}_{stage}" + ('' if encoder == 'concept' else f"_{encoder}"))


# --- the guarded optimizer step

def optimizer_step(optimizer, scaler, params, loss, grad_clip, nonfinite_streak, max_nonfinite_steps, iter_num,
                   ckpt, saved_iter, dtype):
    """unscale -> clip -> step, skipped on every rank if the loss or a gradient is not finite -> (grad norm, skips in a
    row). Stops at max_nonfinite_steps skips in a row or non-finite weights, naming the last good checkpoint
    (saved_iter; None: none this run). float16's own skips while it finds its loss scale are not counted."""
    params = list(params)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    loss_finite = torch.isfinite(torch.as_tensor(loss, device=grad_norm.device))
    finite = (loss_finite & torch.isfinite(grad_norm)).float()
    if is_ddp():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if bool(finite):  # the step's one read of the loss
        scaler.step(optimizer)
        nonfinite_streak = 0
    else:
        bad = sum(not bool(torch.isfinite(p).all()) for p in params)
        if bad:
            diverged(f"the weights are not finite ({bad} of {len(params)} tensors): an earlier update diverged",
                     iter_num, ckpt, saved_iter, dtype)
        if mean_over_ranks(float(loss_finite)) == 1.0 and scaler.is_enabled() and scaler.get_scale() >= 1:
            print0(f"iter {iter_num}: float16 gradient overflow at loss scale {scaler.get_scale():g}, step skipped")
        else:
            nonfinite_streak += 1
            print0(f"iter {iter_num}: non-finite loss or gradient, step skipped ({nonfinite_streak} in a row)")
            if nonfinite_streak >= max_nonfinite_steps:
                diverged(f"{nonfinite_streak} non-finite steps in a row", iter_num, ckpt, saved_iter, dtype)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, nonfinite_streak


def diverged(what, iter_num, ckpt, saved_iter, dtype):
    """Stop a run that diverged, naming the last good checkpoint."""
    if saved_iter is not None:
        note = f"the last good checkpoint is {ckpt} (iter {saved_iter})"
    elif os.path.exists(ckpt):
        note = f"this run wrote no checkpoint ({ckpt} is an earlier run's, left as it was)"
    else:
        note = f"no checkpoint was written ({ckpt} does not exist)"
    raise InputError(f"iter {iter_num}: {what}; stopping, {note}. Try a lower learning_rate, more warmup_iters, "
                     f"grad_clip > 0{' or dtype=float32' if dtype != 'float32' else ''}")


def check_validation(value, iter_num, model, ckpt, saved_iter, dtype):
    """A validation loss that is not finite means the model diverged: stop before it is logged or saved."""
    if not math.isfinite(value):
        bad = nonfinite_tensors(model.state_dict())
        why = (f"the weights are not finite ({len(bad)} tensors, e.g. {bad[0]})" if bad else
               "the weights are finite but the model's outputs are not")
        diverged(f"validation loss is {value}: {why}", iter_num, ckpt, saved_iter, dtype)


# --- throughput: one peak-FLOPs function for the training log and bench.py

GPU_PEAK_FLOPS = {  # dense bf16/fp16 and tf32 FLOP/s, by the exact name torch reports (vendor prefix removed)
    'H200': (989e12, 494e12), 'H100 80GB HBM3': (989e12, 494e12), 'H100 SXM': (989e12, 494e12),
    'H100 NVL': (835e12, 418e12), 'H100 PCIe': (756e12, 378e12), 'H200 NVL': (835e12, 418e12),
    'A100-SXM4-40GB': (312e12, 156e12), 'A100-SXM4-80GB': (312e12, 156e12), 'A100-PCIE-40GB': (312e12, 156e12),
    'A100 80GB PCIe': (312e12, 156e12), 'A10G': (125e12, 62.5e12), 'A10': (125e12, 62.5e12),
    'L40S': (362e12, 183e12), 'L40': (181e12, 90.5e12), 'L4': (121e12, 60e12), 'GeForce RTX 4090': (165e12, 82.6e12),
    'GeForce RTX 3090': (71e12, 35.6e12), 'Tesla V100-SXM2-16GB': (125e12, 15.7e12),
    'Tesla V100-SXM2-32GB': (125e12, 15.7e12), 'Tesla T4': (65e12, 8.1e12)}
_cpu_peak = {}


def peak_flops(device, dtype):
    """FLOP/s: a known GPU's listed dense peak, the CPU's matmul peak measured once per process, or None."""
    if device.startswith('cuda'):
        peaks = GPU_PEAK_FLOPS.get(torch.cuda.get_device_name(device).removeprefix('NVIDIA ').strip())
        return None if peaks is None else peaks[1] if dtype == 'float32' else peaks[0]
    if device != 'cpu':
        return None
    if dtype not in _cpu_peak:
        g = torch.Generator().manual_seed(0)  # its own: the global RNG (dropout, exact resume) is untouched
        a, b = (torch.randn(1024, 1024, generator=g).to(getattr(torch, dtype)) for _ in range(2))
        a @ b  # the first call picks kernels and starts threads
        best, t_end = 0.0, time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * 1024 ** 3 / max(time.perf_counter() - t0, 1e-9))
        _cpu_peak[dtype] = best
    return _cpu_peak[dtype]


def throughput(window, tokens_per_iter, peak):
    """'N tok/s, mfu X%' of the steps in window (steps, seconds, FLOPs) on this rank's device."""
    steps, seconds, flops = window
    if not steps:
        return "tok/s n/a (warm-up step), mfu n/a"
    mfu = f"{100 * flops / seconds / int(os.environ.get('WORLD_SIZE', 1)) / peak:.1f}%" if peak else 'n/a'
    return f"{steps * tokens_per_iter / seconds:,.0f} tok/s, mfu {mfu}"


# --- the run log: out_dir/log.jsonl (one JSON object per evaluation), out_dir/run.json, optional wandb

def read_log(path):
    """The records of a log.jsonl; a line that does not parse (a crash tears the last one) is dropped with a note."""
    records, torn = [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get('iter'), int):
                records.append(record)
            elif line.strip():
                torn.append(number)
    if torn:
        print0(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; a write was "
               f"interrupted); the other {len(records)} records are kept")
    return records


def start_log(out_dir, config, script, device, dtype, world_size, resumed_at=None):
    """log.jsonl, fresh or kept up to resumed_at, and run.json -> (log path, iterations logged, seconds elapsed)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'log.jsonl')
    records = []
    if resumed_at is not None and os.path.exists(path):
        records = [r for r in read_log(path) if r['iter'] <= resumed_at]
    write_text(path, ''.join(json.dumps(r) + '\n' for r in records))
    here, commit = os.path.dirname(os.path.abspath(__file__)), None
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=here, capture_output=True, text=True, timeout=5)
        commit = sha.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '') if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    run = {'script': script, 'config': config, 'git_commit': commit, 'argv': sys.argv,
           'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'python': platform.python_version(),
           'torch': torch.__version__, 'numpy': np.__version__, 'platform': platform.platform(), 'device': device,
           'device_name': torch.cuda.get_device_name(device) if device.startswith('cuda') else platform.processor(),
           'world_size': world_size, 'dtype': dtype}
    write_text(os.path.join(out_dir, 'run.json'), json.dumps(run, indent=2, default=str))
    return path, {r['iter'] for r in records}, records[-1].get('elapsed_s', 0.0) if records else 0.0


def append_log(path, record):
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        raise InputError(f"could not append to {path}: {cause(e)}; free space there, then continue with "
                         f"--init_from=resume (a torn last line is dropped)")


def start_wandb(project, run_name, config):
    """wandb never needs an account: without an API key it logs offline to ./wandb."""
    try:
        import wandb
    except ImportError:
        raise InputError("wandb_log=True needs wandb: pip install wandb")
    if not os.environ.get('WANDB_API_KEY') and os.environ.get('WANDB_MODE') is None:
        os.environ['WANDB_MODE'] = 'offline'
        print0("wandb: no WANDB_API_KEY, logging offline to ./wandb (wandb sync to upload)")
    return wandb.init(project=project, name=run_name or None, config=config)


def mean_diagnostics(diagnostics):
    """The key-wise mean of concept_diagnostics dicts over the validation batches and the ranks."""
    if not diagnostics:
        return {}
    return {k: mean_over_ranks(sum(d[k] for d in diagnostics) / len(diagnostics)) for k in diagnostics[0]}


def token_mean(total, n, what):
    """A validation metric's mean over every scored token of all batches and ranks; none at all is one line."""
    n = mean_over_ranks(n)
    if n == 0:
        raise InputError(f"validation has no token to score: raise {what}")
    return mean_over_ranks(total) / n


def interrupted(kept):
    """Ctrl-C: one line saying what is kept instead of a traceback; exit status 130, as for SIGINT."""
    print(f"\ninterrupted; {kept}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def on_interrupt(ckpt):
    """A training script's Ctrl-C (at top level, no main() catches it): one line about the checkpoint, on rank 0."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        if int(os.environ.get('RANK', 0)) == 0:
            print(f"\ninterrupted; {ckpt} is whole, the last checkpoint written: continue with --init_from=resume"
                  if os.path.exists(ckpt) else "\ninterrupted; no checkpoint was written", file=sys.stderr, flush=True)
    sys.excepthook = hook
