"""
The mechanics that the three training stages share, so that each train_*.py reads as its own
stage: device and DDP setup, the memmap batch loader over a prepared data directory, the LR
schedule, checkpoint I/O, and logging (console, log.jsonl, run.json, optional wandb).
Nothing here knows about a particular objective.
"""
import errno
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data
from model import ConceptConfig, ConfigError, average_diagnostics, concept_diagnostics

# ----------------------------------------------------------------------------------------------
# device, precision, DDP


def one_line_errors():
    """Bad input (a missing data directory, an unknown decoder name) ends a run with its one-line
    message instead of a traceback; every other exception keeps its traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (prepare_data.DataError, ConfigError)):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)
    sys.excepthook = hook


# the ranges of the numeric settings the stages and eval_glue.py share (a key a script lacks is skipped)
POSITIVE = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval',
            'n_layer', 'n_head', 'n_embd', 'n_concepts', 'ffn_size', 'n_dec_layer', 'learning_rate',
            'max_nonfinite_steps', 'bound_levels', 'eval_batch_size')
NON_NEGATIVE = ('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'grad_clip',
                'recursive_iters', 'local_window', 'concept_loss_weight', 'concept_loss_warmup', 'max_minutes')
FRACTIONS = {'dropout': (0, 1), 'beta1': (0, 1), 'beta2': (0, 1), 'deletion_rate': (0, 1), 't_min': (0, 1),
             'label_smoothing': (0, 1)}  # lo <= value < hi


def check_settings(config):
    """A setting out of its range is a one-line error before anything runs (eval_iters=0 would
    divide by zero at the first evaluation, gradient_accumulation_steps=0 'train' on nothing)."""
    for k in POSITIVE:
        if k in config and not config[k] > 0:
            raise ConfigError(f"{k}={config[k]!r} must be > 0")
    for k in NON_NEGATIVE:
        if k in config and not config[k] >= 0:
            raise ConfigError(f"{k}={config[k]!r} must be >= 0")
    for k, (lo, hi) in FRACTIONS.items():
        if k in config and not lo <= config[k] < hi:
            raise ConfigError(f"{k}={config[k]!r} must be in [{lo}, {hi})")
    if 'mask_prob' in config and not 0 < config['mask_prob'] <= 1:
        raise ConfigError(f"mask_prob={config['mask_prob']!r} must be in (0, 1]")


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    master: bool
    device: str
    device_type: str
    dtype: str
    autocast: object  # a context manager factory: `with rt.autocast():`

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


M_TOP_PAD = -2  # glibc's mallopt parameter (malloc.h)


def keep_freed_memory():
    """Ask glibc to pad every growth of the heap by 1 GiB and keep it. Without it, the large
    tensors a CPU step frees (logits, their gradients) go back to the OS and the next step's, of
    about the same size, page-fault fresh memory in: system time a large share of the step. The
    pad is address space, touched only when used. A no-op without glibc (macOS, Windows, musl)."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return
    import ctypes
    try:
        ctypes.CDLL(None).mallopt(M_TOP_PAD, 1 << 30)
    except (OSError, AttributeError):
        pass


def resolve_device(device):
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device='{device}', but this torch ({torch.__version__}) sees no CUDA device; "
                          f"use --device=cpu or --device=auto")
    if device == 'mps' and not mps:
        raise ConfigError("device='mps', but MPS is not available here; use --device=cpu or --device=auto")
    return device


def setup_runtime(device='auto', dtype='bfloat16', seed=1337):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); nccl on CUDA, gloo elsewhere.
    Seeds torch with seed + rank (dropout differs per rank; data sampling is seeded separately)."""
    ddp = 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', '1')) > 1
    device = resolve_device(device)
    keep_freed_memory()
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world_size = int(os.environ['WORLD_SIZE'])
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    else:
        rank, local_rank, world_size = 0, 0, 1
    device_type = 'cuda' if device.startswith('cuda') else device
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if device_type == 'cuda' and dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        # emulated bf16 (V100, T4) is slower than float16 with a GradScaler
        print("this GPU has no native bfloat16; using float16 with a GradScaler", file=sys.stderr)
        dtype = 'float16'
    if device_type == 'mps' and dtype == 'bfloat16':
        dtype = 'float16'
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    if dtype == 'float32':
        autocast = nullcontext
    else:
        def autocast():
            return torch.autocast(device_type=device_type, dtype=ptdtype)
    return Runtime(ddp, rank, local_rank, world_size, rank == 0, device, device_type, dtype, autocast)


def teardown(rt):
    """The last call of a stage. Under torchrun a worker then leaves with os._exit: torch's C++
    static destructors at a normal interpreter exit can abort a multi-process CPU run after its
    last step (SIGABRT, 'terminate called without an active exception'); README "Design notes"."""
    if rt.ddp:
        dist.barrier()  # rank 0 may still be writing a checkpoint; gloo aborts if a peer leaves first
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce_mean(value, rt):
    """Mean of a Python float across ranks (identity without DDP)."""
    if not rt.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


def mean_over_ranks(value, rt):
    """A 0-d tensor kept on the device (a step's loss) -> the Python float of its mean across
    ranks: one all-reduce and one host synchronisation, so call it at log time, not every step."""
    if rt.ddp:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        value = value / rt.world_size
    return value.item()


def micro_batches_per_rank(gradient_accumulation_steps, batch_size, world_size):
    """The global batch (batch_size x gradient_accumulation_steps sequences) is the contract: each
    rank runs ceil(accum / world_size) micro-batches, shrunk to the largest micro-batch that still
    gives exactly that global batch, so a 16-GPU run of an accum-8 config needs no arithmetic.
    Returns (micro-batches per rank, micro-batch size)."""
    global_batch = batch_size * gradient_accumulation_steps
    accum = -(-gradient_accumulation_steps // world_size)
    if global_batch % (accum * world_size) == 0:
        return accum, global_batch // (accum * world_size)
    if global_batch % world_size == 0:
        # the fewest micro-batches per rank whose size divides this rank's share of the batch
        share = global_batch // world_size
        accum = next(a for a in range(accum, share + 1) if share % a == 0)
        return accum, share // accum
    raise ConfigError(f"the global batch of {global_batch} sequences (batch_size={batch_size} x "
                      f"gradient_accumulation_steps={gradient_accumulation_steps}) cannot be split evenly over "
                      f"{world_size} processes; choose batch_size x gradient_accumulation_steps divisible by {world_size}")


# ----------------------------------------------------------------------------------------------
# data: fixed-length windows from a prepared data directory

class TokenWindows:
    """Draws batches of fixed-length token windows from one split of a prepared data directory.

    Sampling is reproducible and rank-aware: every rank draws the offsets of the whole global
    step (world_size x accum micro-batches) from the same seeded generator and keeps its own
    disjoint slice, so a 2-process run sees exactly the data of a 1-process run with twice the
    gradient accumulation. The generator's state is the sampler's whole state (checkpointed).
    Each micro-batch also comes with a noise seed that depends only on (seed, step, global
    micro-batch index), so the stage's masking is identical across world sizes and on resume."""

    def __init__(self, data_dir, split, block_size, batch_size, doc_aligned=False, seed=1337,
                 rank=0, world_size=1, accum=1, device='cpu'):
        self.meta = prepare_data.load_meta(data_dir)
        self.data_dir, self.split = data_dir, split
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.device = device
        self.seed = seed
        tokens, doc_starts = prepare_data.open_split(data_dir, split, self.meta)
        self.n_tokens = len(tokens)
        if self.n_tokens < block_size + 1:
            raise prepare_data.DataError(
                f"{data_dir}: the {split} split has {self.n_tokens} tokens, fewer than block_size="
                f"{block_size}; use a smaller --block_size or prepare more data")
        if doc_aligned:
            starts = np.asarray(doc_starts, dtype=np.int64)
            self.starts = torch.from_numpy(starts[starts + block_size <= self.n_tokens])
            if len(self.starts) == 0:
                raise prepare_data.DataError(f"{data_dir}: no document of {split} starts a full window")
        else:
            self.starts = None
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self._prefetched = None  # (sampler state before the draw, the drawn step) or None

    def _tokens(self):
        # re-open the memmap per draw: keeps the process's RSS from growing as pages are touched
        tokens, _ = prepare_data.open_split(self.data_dir, self.split, self.meta)
        return tokens

    def next_step(self):
        """The micro-batches of this rank for one optimizer step: a list of accum pairs
        (idx (B, T) int64 on device, noise_seed int); the prefetched step if there is one."""
        if self._prefetched is not None:
            batches, self._prefetched = self._prefetched[1], None
            return batches
        return self._draw()

    def prefetch(self):
        """Draw the next step now and start its host-to-device copy (pinned, non-blocking), so that
        it travels while the device computes the current step (call it once the step is queued).
        The checkpointed state stays that before this draw: a resume draws the same step again."""
        if self._prefetched is None:
            before = self.state_dict()
            self._prefetched = (before, self._draw())

    def _draw(self):
        n_global = self.world_size * self.accum
        n = n_global * self.batch_size
        if self.starts is None:
            offsets = torch.randint(self.n_tokens - self.block_size + 1, (n,), generator=self.generator)
        else:
            offsets = self.starts[torch.randint(len(self.starts), (n,), generator=self.generator)]
        offsets = offsets.view(n_global, self.batch_size)
        tokens = self._tokens()
        out = []
        for micro in range(self.accum):
            g = self.rank * self.accum + micro  # global micro-batch index
            rows = [torch.from_numpy(tokens[o:o + self.block_size].astype(np.int64)) for o in offsets[g].tolist()]
            idx = torch.stack(rows)
            if self.device.startswith('cuda'):
                idx = idx.pin_memory().to(self.device, non_blocking=True)
            else:
                idx = idx.to(self.device)
            out.append((idx, noise_seed(self.seed, self.step, g)))
        self.step += 1
        return out

    def state_dict(self):
        if self._prefetched is not None:
            return self._prefetched[0]
        return {'generator': self.generator.get_state(), 'step': self.step}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'].cpu())
        self.step = state['step']
        self._prefetched = None


def noise_seed(seed, step, micro):
    return (seed * 1_000_003 + step * 9_973 + micro) % (2 ** 63)


def noise_generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


def fixed_batches(data_dir, split, block_size, batch_size, n_batches, doc_aligned, seed, rank, device):
    """n_batches batches drawn once with a fixed seed: validation sees the same windows (and the
    same noise seeds) at every evaluation, so val curves are not noisy by construction."""
    sampler = TokenWindows(data_dir, split, block_size, batch_size, doc_aligned, seed=seed + 7919 * rank,
                           device=device)
    return [sampler.next_step()[0] for _ in range(n_batches)]


# ----------------------------------------------------------------------------------------------
# schedule

def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, budget_fraction=None):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then flat (nanoGPT). A
    time-budgeted run passes budget_fraction (training time spent / budget) instead of counting
    to lr_decay_iters: the decay follows it and reaches min_lr at the end of the budget."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if budget_fraction is not None:
        ratio = min(1.0, budget_fraction)
    elif it >= lr_decay_iters:
        return min_lr
    else:
        ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


class Budget:
    """When a run ends, and its learning rate: after max_iters iterations, or with max_minutes > 0
    after that much training time, whatever max_iters says (crammedBERT's budgeted training).
    Evaluation and checkpoints do not count against the budget; the cosine decay follows the spent
    fraction of it. A single process reads its clock after every step; under DDP the ranks agree on
    the time spent once every log_interval iterations (the log synchronises then anyway), so all of
    them take the same learning rate and stop at the same iteration, and a run can overrun its
    budget by up to log_interval steps. `spent` goes into the checkpoint, so --init_from=resume
    continues the budget where it stopped."""

    def __init__(self, rt, max_iters, max_minutes, log_interval, learning_rate, min_lr, warmup_iters,
                 lr_decay_iters, spent=0.0):
        self.rt, self.max_iters, self.log_interval = rt, max_iters, log_interval
        self.schedule = (learning_rate, min_lr, warmup_iters, lr_decay_iters)
        self.seconds = 60.0 * max_minutes
        self.spent = self.clock = spent  # agreed by the ranks / this rank's own

    def lr(self, it):
        return get_lr(it, *self.schedule, budget_fraction=self.spent / self.seconds if self.seconds else None)

    def done(self, it):
        return self.spent >= self.seconds if self.seconds else it >= self.max_iters

    def step_begins(self):
        self.t0 = time.time()

    def step_ends(self, it):
        self.clock += time.time() - self.t0
        if not self.rt.ddp:
            self.spent = self.clock
        elif self.seconds and it % self.log_interval == 0:
            self.spent = all_reduce_mean(self.clock, self.rt)


# ----------------------------------------------------------------------------------------------
# checkpoints: tensors and plain Python values only, written atomically

def _cause(e):
    """The reason a write failed, in a few words: the OS's for an OSError, and for torch's own
    'unexpected pos' (its zip writer's short write) what that means."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{os.strerror(e.errno)} (errno {errno.errorcode.get(e.errno, e.errno)})"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if 'unexpected pos' in text or 'PytorchStreamWriter' in text:
        return "the write was cut short: the disk is full or the file-size limit (ulimit -f) was reached"
    return text[:200]


def save_checkpoint(path, state):
    """torch.save to a temporary file beside path, then os.replace: a crash mid-write never
    leaves a truncated ckpt.pt, and a failed write (full disk, file-size limit) removes its
    temporary file, leaves the previous ckpt.pt as it was and ends in one line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            then = ("the previous one is unchanged: free space there (or raise the limit), then continue with "
                    "--init_from=resume" if os.path.exists(path) else
                    "no checkpoint exists yet: free space there (or raise the limit, or choose another --out_dir) "
                    "and run again")
            raise SystemExit(f"could not write checkpoint {path}: {_cause(e)}; {then}")
        raise


def remove_stale_temporaries(out_dir, print0=print):
    """Remove the ckpt.pt.tmp.<pid> files that an interrupted save_checkpoint left in out_dir
    (kill -9 mid-write), except those of a process that is still alive (it may be writing)."""
    removed = 0
    for name in os.listdir(out_dir):
        stem, _, pid = name.rpartition('.tmp.')
        if not stem or not pid.isdigit() or not os.path.isfile(os.path.join(out_dir, name)):
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        os.remove(os.path.join(out_dir, name))
        removed += 1
    if removed:
        print0(f"removed {removed} temporary file(s) that an interrupted run left in {out_dir}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_out_dir(out_dir, rt):
    """The first step of a stage: out_dir must be a directory this process can write to, or one it
    can create (not under a file, not on a read-only file system), found before any data is read
    or model built, and without creating it (a run that then fails on its data leaves nothing).
    Also cleans what an interrupted run left there."""
    if not rt.master:
        return
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(out_dir) else f"is under {existing}, a file"
        raise SystemExit(f"out_dir {out_dir} {where}, not a directory: choose another --out_dir")
    try:
        tempfile.NamedTemporaryFile(dir=existing, prefix='.write_test.').close()
    except OSError as e:
        raise SystemExit(f"out_dir {out_dir} cannot be written ({existing}: {_cause(e)}); choose another --out_dir")
    if existing == os.path.abspath(out_dir):
        remove_stale_temporaries(out_dir, rt.print0)


CHECKPOINT_KEYS = ('model', 'model_args')
TRAINING_KEYS = ('optimizer', 'iter_num', 'best_val_loss', 'rng', 'sampler')


def _describe(obj):
    if torch.is_tensor(obj):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return f"a bare state_dict ({len(obj)} tensors, e.g. {next(iter(obj))!r})"
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(repr, list(obj)[:6]))}{', ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path, map_location='cpu'):
    """A ckpt.pt that train_*.py wrote, a directory written by export.py, or a hub repo id of one
    -> the checkpoint dict, with at least 'model' (a state_dict) and 'model_args'. Anything else (a
    missing path, a corrupt file, a bare state_dict, a saved tensor) is one line saying what was
    found and what is expected."""
    import common  # TEMPORARY until runtime.py is deleted: export reading moved to common.py
    if os.path.isdir(path) or common.is_hub_id(path):
        return common.load_export(path, map_location)
    if not os.path.isfile(path):
        what = "is a directory (pass the ckpt.pt inside it)" if os.path.isdir(path) else "not found"
        raise SystemExit(f"checkpoint {path} {what} (train one first, e.g. python train_mlm.py config/tiny.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise SystemExit(f"checkpoint {path} could not be read ({type(e).__name__}: {first}); it is corrupt or not "
                         f"a checkpoint of this project (train_*.py writes them)")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise SystemExit(f"{path} holds {_describe(ckpt)}, not a checkpoint of this project: expected the dict "
                         f"train_*.py writes, with {', '.join(map(repr, CHECKPOINT_KEYS))} and more")
    if not isinstance(ckpt['model'], dict) or not isinstance(ckpt['model_args'], dict):
        raise SystemExit(f"{path}: 'model' must be a state_dict and 'model_args' a dict, found "
                         f"{_describe(ckpt['model'])} and {_describe(ckpt['model_args'])}")
    ckpt['model'] = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    return ckpt


def require_training_state(ckpt, path):
    """--init_from=resume needs what exact resume restores besides the weights."""
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise SystemExit(f"{path} has weights but no training state ({', '.join(missing)} missing), so it cannot be "
                         f"resumed; warm-start from it instead: --init_from={path} with another --out_dir")


def load_weights(model, state, path):
    """model.load_state_dict(state), with a mismatch (another version of model.py, a hand-edited
    file) said in one line rather than torch's list of every missing key."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and (not torch.is_tensor(state[k]) or state[k].shape != own[k].shape)]
    if missing or unexpected or reshaped:
        parts = [f"{label} {len(names)} (e.g. {names[0]})" for label, names in
                 (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped)) if names]
        raise SystemExit(f"{path}: the weights do not fit the model its model_args describe: {', '.join(parts)}; "
                         f"it was written by another version of model.py or edited")
    model.load_state_dict(state)


def nonfinite_tensors(state):
    """Names of the floating-point tensors of a state_dict that hold a nan or an inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]


def check_vocab(ckpt, meta, ckpt_path, data_dir):
    """A checkpoint is only meaningful with the tokenizer it was trained with: the same size, and
    the same recipe (two BPEs of one size trained on different text share no ids)."""
    if ckpt['model_args'].get('vocab_size') != meta['vocab_size']:
        raise SystemExit(f"checkpoint {ckpt_path} has vocab_size {ckpt['model_args'].get('vocab_size')} but "
                         f"{data_dir} has {meta['vocab_size']}: use the data directory the checkpoint was trained on")
    if ckpt.get('tokenizer') not in (None, meta['tokenizer']):
        name = ckpt['tokenizer'].get('name') if isinstance(ckpt['tokenizer'], dict) else ckpt['tokenizer']
        raise SystemExit(f"checkpoint {ckpt_path} was trained with another tokenizer than {data_dir}'s "
                         f"({name} vs {meta['tokenizer'].get('name')}, or the same name "
                         f"trained on other text): use the data directory the checkpoint was trained on")


def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(rt):
    """Every rank's RNG state, in rank order (call on all ranks): each rank draws its own dropout
    masks (seed + rank), so exact resume needs each rank's own state back."""
    if not rt.ddp:
        return [rng_state()]
    states = [None] * rt.world_size
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(states, rank=0):
    """states: gather_rng_states' list. With another number of processes than the run had, rank r
    takes state r mod the old count (the run goes on, no longer bit for bit)."""
    state = states[rank % len(states)] if isinstance(states, list) else states  # a dict: older checkpoints
    # the setters take CPU ByteTensors only, wherever the checkpoint was mapped to
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


# ----------------------------------------------------------------------------------------------
# throughput accounting

# dense peak FLOP/s per GPU (bf16/fp16 tensor core, tf32), by the exact name that
# torch.cuda.get_device_name reports (the vendor prefix removed). A name not listed -> None and the
# log says "n/a" rather than a wrong MFU: "NVIDIA L40" is not an L4, an "H200 NVL" not an SXM H200.
GPU_PEAK_FLOPS = {
    'H200': (989e12, 494e12), 'H100 80GB HBM3': (989e12, 494e12), 'H100 SXM': (989e12, 494e12),
    'H100 NVL': (835e12, 418e12), 'H100 PCIe': (756e12, 378e12), 'H200 NVL': (835e12, 418e12),
    'A100-SXM4-40GB': (312e12, 156e12), 'A100-SXM4-80GB': (312e12, 156e12),
    'A100-PCIE-40GB': (312e12, 156e12), 'A100 80GB PCIe': (312e12, 156e12),
    'A10G': (125e12, 62.5e12), 'A10': (125e12, 62.5e12), 'L40S': (362e12, 183e12), 'L40': (181e12, 90.5e12),
    'L4': (121e12, 60e12), 'GeForce RTX 4090': (165e12, 82.6e12), 'GeForce RTX 3090': (71e12, 35.6e12),
    'Tesla V100-SXM2-16GB': (125e12, 15.7e12), 'Tesla V100-SXM2-32GB': (125e12, 15.7e12),
    'Tesla V100-PCIE-16GB': (112e12, 14e12), 'Tesla V100-PCIE-32GB': (112e12, 14e12),
    'Tesla T4': (65e12, 8.1e12),
}


def gpu_peak_flops(name, dtype):
    """The listed peak of a GPU by its reported name, or None when the name is not listed exactly."""
    peaks = GPU_PEAK_FLOPS.get(name.removeprefix('NVIDIA ').strip())
    if peaks is None:
        return None
    return peaks[1] if dtype == 'float32' else peaks[0]


_measured_cpu_peak = {}


def cpu_matmul_peak(dtype, n=1024, seconds=0.3):
    """The CPU's dense matmul FLOP/s in dtype, measured once per process and cached: the best of
    repeated (n x n) @ (n x n) products over about `seconds`. A measured figure, not a datasheet
    one: the MFU against it says how close the step is to what matmuls reach on this machine now."""
    if dtype not in _measured_cpu_peak:
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
        g = torch.Generator().manual_seed(0)  # its own: the global RNG (dropout, exact resume) is untouched
        a, b = torch.randn(n, n, generator=g).to(ptdtype), torch.randn(n, n, generator=g).to(ptdtype)
        a @ b  # first call: thread pool and kernel selection
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9))
        _measured_cpu_peak[dtype] = best
    return _measured_cpu_peak[dtype]


def peak_flops(rt):
    """Peak dense FLOP/s of one device in the run's dtype: the listed peak of a known GPU, the
    measured matmul peak of the CPU, None otherwise (an unlisted GPU, MPS)."""
    if rt.device_type == 'cuda':
        return gpu_peak_flops(torch.cuda.get_device_name(rt.device), rt.dtype)
    if rt.device_type == 'cpu':
        return cpu_matmul_peak(rt.dtype)
    return None


def format_mfu(flops_per_s, peak):
    return 'n/a' if not peak else f"{100 * flops_per_s / peak:.1f}%"


class Throughput:
    """tokens/s and MFU over the training steps since the last log line (the stages' log
    mechanics). The first `skip` steps after the start (compilation, allocator warm-up) and the
    time between pause() and the next add() (evaluation, checkpoints) are not counted."""

    def __init__(self, rt, skip=1):
        self.rt, self.peak = rt, peak_flops(rt)
        self.skip, self.paused_at = skip, None
        self.reset()

    def reset(self):
        self.t0, self.flops, self.tokens = time.time(), 0.0, 0

    def pause(self):
        """Stop the clock until the next step: time spent outside training steps from here on
        (evaluation, a checkpoint) is left out of the window."""
        self.paused_at = time.time()

    def resume(self):
        """Called at the start of a step: a paused clock goes on as if no time had passed."""
        if self.paused_at is not None:
            self.t0 += time.time() - self.paused_at
            self.paused_at = None

    def add(self, tokens, flops):
        """One training step done: its tokens and FLOPs."""
        if self.skip > 0:  # a warm-up step: the window starts after it
            self.skip -= 1
            self.reset()
            return
        self.tokens += tokens
        self.flops += flops

    def report(self):
        """'N tok/s, mfu X%' since the last report, and start counting anew."""
        dt = max(time.time() - self.t0, 1e-9)
        if self.tokens == 0:
            text = "tok/s n/a (warm-up step), mfu n/a"
        else:
            text = f"{self.tokens / dt:,.0f} tok/s, mfu {format_mfu(self.flops / dt / self.rt.world_size, self.peak)}"
        self.reset()
        return text


# ----------------------------------------------------------------------------------------------
# logging

def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=here, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '') if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def token_means(rt, n_scored, sums, n_batches, batch_size, hint=''):
    """Validation metrics as means over every scored token of every batch and rank, so that a batch
    with nothing to score weighs nothing: {name: sum / n_scored} for each of sums. No token to score
    at all is a one-line error (hint: the stage's own setting to raise)."""
    n = all_reduce_mean(n_scored, rt)  # means over ranks: their ratios are the ratios of the sums
    if n == 0:
        raise SystemExit(f"validation has no token to score in its {n_batches} batches of {batch_size} windows: "
                         f"raise eval_iters or batch_size{hint}")
    return {k: all_reduce_mean(v, rt) / n for k, v in sums.items()}


def erank_text(metrics):
    """', concept erank X' for the evaluation line; nothing for the standard arm, which has no concepts."""
    return f", concept erank {metrics['erank']:.2f}" if 'erank' in metrics else ''


def write_text_atomically(path, text):
    """Write text to path through a temporary file and os.replace: an interrupted write leaves the
    old file whole; a failed one (full disk) removes its temporary file and ends in one line."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise SystemExit(f"could not write {path}: {_cause(e)}; free space there or choose another --out_dir")
        raise


def read_log_records(path, print0=print):
    """The records of a log.jsonl. A line that does not parse (a crash mid-write tears the last
    one) is dropped with a one-line note instead of failing the resume."""
    records, torn = [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get('iter'), int):
                records.append(record)
            else:
                torn.append(number)
    if torn:
        print0(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
               f"a write was interrupted); the other {len(records)} records are kept")
    return records


class RunLog:
    """Console + out_dir/log.jsonl (one JSON object per evaluation) + out_dir/run.json + wandb.
    Only the master process writes. wandb is optional and never needs an account: without an
    API key it runs in offline mode."""

    def __init__(self, rt, out_dir, config, script, wandb_log=False, wandb_project='concept-encoder',
                 wandb_run_name='', resumed_at=None):
        """resumed_at: the iteration a resumed run continues from. The log then keeps its records up
        to it (later ones belong to the abandoned continuation), does not repeat the evaluation at
        it, and elapsed_s goes on from its last value."""
        self.rt, self.out_dir, self.wandb = rt, out_dir, None
        self.t0, self.logged = time.time(), set()
        if not rt.master:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.log_path = os.path.join(out_dir, 'log.jsonl')
        records = []
        if resumed_at is not None and os.path.exists(self.log_path):
            records = [r for r in read_log_records(self.log_path, rt.print0) if r['iter'] <= resumed_at]
        # a fresh run starts a fresh log; replaced atomically, so a crash here loses no record
        write_text_atomically(self.log_path, ''.join(json.dumps(r) + '\n' for r in records))
        if records:
            self.t0 -= records[-1].get('elapsed_s', 0.0)
            self.logged = {r['iter'] for r in records}
        run = {'script': script, 'config': config, 'git_commit': git_commit(), 'argv': sys.argv,
               'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'python': platform.python_version(),
               'torch': torch.__version__, 'numpy': np.__version__, 'platform': platform.platform(),
               'device': rt.device, 'device_name': (torch.cuda.get_device_name(rt.device)
                                                    if rt.device_type == 'cuda' else platform.processor()),
               'world_size': rt.world_size, 'dtype': rt.dtype}
        write_text_atomically(os.path.join(out_dir, 'run.json'), json.dumps(run, indent=2, default=str))
        if wandb_log:
            try:
                import wandb
            except ImportError:
                raise SystemExit("wandb_log=True needs wandb: pip install wandb")
            if not os.environ.get('WANDB_API_KEY') and os.environ.get('WANDB_MODE') is None:
                os.environ['WANDB_MODE'] = 'offline'
                rt.print0("wandb: no WANDB_API_KEY, logging offline to ./wandb (wandb sync to upload)")
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)

    def log_eval(self, record):
        if not self.rt.master or record['iter'] in self.logged:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        record['elapsed_s'] = round(time.time() - self.t0, 3)
        try:
            with open(self.log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            raise SystemExit(f"could not append to {self.log_path}: {_cause(e)}; free space there, then continue "
                             f"with --init_from=resume (a torn last line is dropped)")
        if self.wandb is not None:
            self.wandb.log(record, step=record.get('iter'))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------
# small shared steps of the stage scripts

def resolve_data_dir(dataset):
    """`dataset` is a prepared data directory; a bare name such as 'pydocs' means data/pydocs. A
    corpus given instead (a text file, or a directory of them without meta.json) is refused with
    the command that prepares it."""
    is_corpus_dir = (os.path.isdir(dataset) and not os.path.exists(os.path.join(dataset, 'meta.json'))
                     and any(f.endswith(prepare_data._LOCAL_SUFFIXES) for f in os.listdir(dataset)))
    if os.path.isfile(dataset) or is_corpus_dir:
        stem = os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]
        raise prepare_data.DataError(f"--dataset={dataset} is a corpus, not a prepared data directory; prepare it "
                                     f"first: python prepare_data.py --dataset={dataset} (it writes data/{stem}), "
                                     f"then train with --dataset=data/{stem}")
    if os.path.isdir(dataset) or os.path.sep in dataset:
        return dataset
    return os.path.join('data', dataset)


def warm_start(model, ckpt_path, print0=print):
    """Load every tensor of another stage's checkpoint whose name and shape match (the encoder,
    and the decoder where the architectures agree); report what was loaded and what is new."""
    ckpt = load_checkpoint(ckpt_path)
    bad = nonfinite_tensors(ckpt['model'])
    if bad:
        raise SystemExit(f"{ckpt_path} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run that wrote "
                         f"it diverged; warm-start from an earlier checkpoint")
    own = model.state_dict()
    loaded, skipped = [], []
    for name, tensor in ckpt['model'].items():
        if name in own and own[name].shape == tensor.shape:
            own[name] = tensor
            loaded.append(name)
        else:
            skipped.append(name)
    model.load_state_dict(own)
    new = sorted(set(own) - set(loaded))
    print0(f"warm start from {ckpt_path} ({ckpt.get('stage', '?')} stage, iter {ckpt.get('iter_num', '?')}): "
           f"loaded {len(loaded)} tensors, {len(new)} new, {len(skipped)} not used")
    print0("  loaded: " + ', '.join(sorted(loaded)))
    if new:
        print0("  new:    " + ', '.join(new))
    if skipped:
        print0("  unused: " + ', '.join(sorted(skipped)))
    return ckpt, loaded, new


def default_out_dir(stage, encoder='concept'):
    """out/<config file stem>_<stage> (out/tiny_mlm for `train_mlm.py config/tiny.py`), and
    out/tiny_mlm_standard for encoder='standard', so that stages, arms and model sizes sharing one
    config file never overwrite each other's checkpoints."""
    configs = [a for a in sys.argv[1:] if not a.startswith('--')]
    name = os.path.splitext(os.path.basename(configs[-1]))[0] if configs else 'run'
    return os.path.join('out', f"{name}_{stage}" + ('' if encoder == 'concept' else f"_{encoder}"))


# ----------------------------------------------------------------------------------------------
# model construction, the optimizer step and checkpoint contents, as every stage does them

def build_model(stage, model_class, config_class, model_args, init_from, ckpt_path, meta, data_dir, rt):
    """init_from: 'scratch' | 'resume' (the same stage's run in ckpt_path, continued) | the path of
    any stage's checkpoint to warm-start from (matching tensors are copied, see warm_start).
    Returns (model on rt.device, model_args actually used, the resume checkpoint or None)."""
    ckpt = None
    if init_from == 'resume':
        # on the CPU: the RNG and sampler states must stay CPU ByteTensors; the weights and the
        # optimizer state move to rt.device with the model (load_state_dict casts and places them)
        ckpt = load_checkpoint(ckpt_path, map_location='cpu')
        require_training_state(ckpt, ckpt_path)
        if ckpt.get('stage') != stage:
            raise SystemExit(f"{ckpt_path} is a {ckpt.get('stage')} checkpoint and --init_from=resume continues the "
                             f"same stage; to start {stage} from it: --init_from={ckpt_path} with another --out_dir")
        check_vocab(ckpt, meta, ckpt_path, data_dir)
        changed = [f"{k}={ckpt['model_args'][k]!r} there, {v!r} here" for k, v in model_args.items()
                   if k in ckpt['model_args'] and ckpt['model_args'][k] != v]
        if changed:  # the run is continued as it was: its architecture, its windows
            raise SystemExit(f"--init_from=resume continues {ckpt_path} with its settings, but "
                             f"{'; '.join(changed)}: pass the config the run was started with")
        model_args = ckpt['model_args']
    model = model_class(config_class(**model_args))
    if ckpt is not None:
        load_weights(model, ckpt['model'], ckpt_path)
        rt.print0(f"resumed from {ckpt_path} at iter {ckpt['iter_num']}")
    elif init_from != 'scratch':
        warm, _, _ = warm_start(model, init_from, rt.print0)
        check_vocab(warm, meta, init_from, data_dir)
    return model.to(rt.device), model_args, ckpt


# the settings besides the architecture that shape a run's trajectory: a resume that changes one
# goes on, but not as the uninterrupted run would have
TRAJECTORY_KEYS = ('learning_rate', 'min_lr', 'warmup_iters', 'weight_decay', 'beta1', 'beta2', 'grad_clip',
                   'batch_size', 'gradient_accumulation_steps', 'doc_aligned', 'seed', 'dtype', 'mask_prob',
                   'deletion_rate', 'deletion_mode', 't_min', 'label_smoothing', 'elbo_weight', 'stratified_t')


def resume_differences(old, new):
    """One line for each way the resumed run (config new) leaves the run it continues (config old,
    from its checkpoint), with the flag that keeps the run's own course; [] when it goes on as one
    uninterrupted run of new's max_iters would."""
    notes = []
    decay_old = old.get('lr_decay_iters') or old.get('max_iters')
    decay_new = new.get('lr_decay_iters') or new.get('max_iters')
    if decay_old != decay_new:
        default = " (lr_decay_iters=0 means max_iters)" if not new.get('lr_decay_iters') else ""
        notes.append(f"the LR schedule changes: it now decays over {decay_new} iterations, the run's own over "
                     f"{decay_old}{default}; --lr_decay_iters={decay_old} keeps the run's own schedule")
    changed = [f"{k}={old[k]!r} there, {new[k]!r} here" for k in TRAJECTORY_KEYS
               if k in old and k in new and old[k] != new[k]]
    if changed:
        notes.append(f"settings differ from the run's ({'; '.join(changed)}): pass the run's values to continue it "
                     f"exactly")
    return notes


def restore_training_state(ckpt, optimizer, scaler, sampler, rt, config=None):
    """Everything besides the weights that exact resume needs. With config (this run's settings):
    a note for each way the continuation differs from the run's own course."""
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        sampler.load_state_dict(ckpt['sampler'])
        set_rng_state(ckpt['rng'], rt.rank)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SystemExit(f"the training state in the checkpoint does not fit this run ({type(e).__name__}: {first}); "
                         f"it was written by another version or edited: warm-start from it with --init_from=<its path>"
                         f" and another --out_dir")
    if config is not None and isinstance(ckpt.get('config'), dict):
        for note in resume_differences(ckpt['config'], config):
            rt.print0(f"note: resuming at iter {ckpt['iter_num']}, {note}")
    return ckpt['iter_num'], ckpt['best_val_loss']


def save_training_checkpoint(rt, path, stage, raw_model, optimizer, scaler, model_args, config, iter_num,
                             best_val_loss, sampler, meta, data_dir, train_seconds=0.0):
    """Called on every rank (each contributes its RNG state); rank 0 writes ckpt.pt atomically.
    Its contents are tensors and plain Python values only (it loads with weights_only=True); the
    tokenizer recipe and data directory travel along, so eval_glue.py and sample.py need only --ckpt.
    Non-finite weights are never written (a diverged model would replace the last good one)."""
    bad = nonfinite_tensors(raw_model.state_dict())
    if bad:
        raise SystemExit(f"iter {iter_num}: the weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): not saved, "
                         f"{path} is left as it was; try a lower learning_rate, more warmup_iters or grad_clip > 0")
    rng_states = gather_rng_states(rt)
    if not rt.master:
        return
    save_checkpoint(path, {
        'stage': stage, 'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict() if scaler.is_enabled() else None,
        'model_args': model_args, 'config': config, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
        'rng': rng_states, 'sampler': sampler.state_dict(), 'train_seconds': train_seconds, 'tokenizer': meta['tokenizer'],
        'special_tokens': meta['special_tokens'], 'data_dir': os.path.abspath(data_dir)})



class OptimizerStep:
    """unscale -> clip -> step, skipping any step whose loss or gradient is not finite; all ranks
    take the same decision. The run stops, naming the last good checkpoint only if this run wrote
    or resumed one (saved_iter): after max_nonfinite skips in a row; at the first skip that finds
    the weights themselves non-finite (an earlier update with a finite loss and gradient diverged:
    no later step can recover); and when validation is not finite (check_validation), before it
    is logged or saved. With float16 the GradScaler skips steps of its own while it finds its
    scale (finite loss, overflowing gradient, the scale halves): those are not counted while the
    scale is >= 1. The checks beyond the step's finite/non-finite decision run on skips only."""

    def __init__(self, optimizer, scaler, grad_clip, max_nonfinite, ckpt_path, rt, saved_iter=None):
        self.optimizer, self.scaler, self.grad_clip = optimizer, scaler, grad_clip
        self.max_nonfinite, self.ckpt_path, self.rt = max_nonfinite, ckpt_path, rt
        self.saved_iter = saved_iter  # the iteration of the good checkpoint in ckpt_path, None if none
        self.streak = 0

    def __call__(self, params, loss_value, iter_num):
        params = list(params)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float('inf'))
        # loss_value: a float or a 0-d tensor on the device; the decision is the step's one read of it
        finite = torch.isfinite(torch.as_tensor(loss_value, device=grad_norm.device)) & torch.isfinite(grad_norm)
        if self.rt.ddp:  # every rank takes the same decision
            finite = finite.float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = bool(finite)
        if finite:
            self.scaler.step(self.optimizer)
            self.streak = 0
        else:  # on skips only: was it the loss, or only the gradient (a float16 overflow)?
            self._skipped(params, bool(torch.isfinite(torch.as_tensor(loss_value))), iter_num)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm  # a 0-d tensor on the device: float() it when it is logged

    def _skipped(self, params, loss_finite, iter_num):
        bad = [i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())]
        if self.rt.ddp:
            loss_finite = all_reduce_mean(float(loss_finite), self.rt) == 1.0
        if bad:
            self.stop(f"the weights are not finite ({len(bad)} of {len(params)} tensors): an earlier update "
                      f"diverged", iter_num)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        if loss_finite and scale >= 1:  # the GradScaler's own skip: it halves the scale in update()
            self.rt.print0(f"iter {iter_num}: float16 gradient overflow at loss scale {scale:g}, step skipped "
                           f"(the GradScaler lowers the scale)")
            return
        self.streak += 1
        self.rt.print0(f"iter {iter_num}: non-finite loss or gradient, step skipped ({self.streak} in a row)")
        if self.streak >= self.max_nonfinite:
            self.stop(f"{self.streak} non-finite steps in a row", iter_num)

    def checkpoint_note(self):
        if self.saved_iter is not None:
            return f"the last good checkpoint is {self.ckpt_path} (iter {self.saved_iter})"
        if os.path.exists(self.ckpt_path):
            return f"this run wrote no checkpoint ({self.ckpt_path} is an earlier run's, left as it was)"
        return f"no checkpoint was written ({self.ckpt_path} does not exist)"

    def stop(self, what, iter_num):
        dtype = " or dtype='float32'" if self.rt.dtype != 'float32' else ""
        raise SystemExit(f"iter {iter_num}: {what}; stopping, {self.checkpoint_note()}. Try a lower learning_rate, "
                         f"more warmup_iters, grad_clip > 0{dtype}")

    def check_validation(self, value, iter_num, model):
        """A validation loss that is not finite means the model diverged: stop before it is logged
        or saved (a nan is never the best)."""
        if math.isfinite(value):
            return
        bad = nonfinite_tensors(model.state_dict())
        why = f"the weights are not finite ({len(bad)} tensors, e.g. {bad[0]})" if bad else \
            "the weights are finite but the model's outputs are not"
        self.stop(f"validation loss is {value}: {why}", iter_num)


# ----------------------------------------------------------------------------------------------
# one training run: everything a stage script does around its own noise, loss and evaluation

def model_args_from(config, meta, **fixed):
    """The ConceptConfig fields a stage's settings give (its config keys that are fields), the
    special ids of the data directory, and what the stage fixes (decoder='diffusion')."""
    args = {f.name: config[f.name] for f in dataclasses.fields(ConceptConfig) if f.name in config}
    special = meta['special_tokens']
    args.update(vocab_size=meta['vocab_size'], pad_id=special['pad'], mask_id=special['mask'], eod_id=special['eod'],
                cls_id=special['cls'], sep_id=special['sep'], **fixed)
    return args


class TrainingRun:
    """Setup, the step's mechanics and the evaluation's bookkeeping of a stage: one-line errors and
    checked settings; device, precision and DDP; the global batch at any world size; out_dir
    checked before any long work; the data; the model (scratch, resume or warm start), AdamW, the
    budget and the non-finite guard; compile and DDP; the run log. The script keeps its noise, its
    forward pass, its evaluation and the loop that calls these in order."""

    def __init__(self, config, stage, model_class, **fixed_model_args):
        one_line_errors()
        check_settings(config)
        self.config, self.stage, c = config, stage, config
        self.rt = rt = setup_runtime(c['device'], c['dtype'], c['seed'])
        # the global batch (batch_size x gradient_accumulation_steps sequences) is the contract at any world size
        self.accum, self.batch_size = micro_batches_per_rank(c['gradient_accumulation_steps'], c['batch_size'],
                                                             rt.world_size)
        self.out_dir = c['out_dir'] or default_out_dir(stage, c['encoder'])
        prepare_out_dir(self.out_dir, rt)  # a file or read-only out_dir fails here, before any long work
        self.tokens_per_iter = self.batch_size * c['block_size'] * self.accum * rt.world_size
        rt.print0(f"tokens per iteration: {self.tokens_per_iter:,} ({self.batch_size} x {c['block_size']} x "
                  f"{self.accum * rt.world_size})")

        self.data_dir = resolve_data_dir(c['dataset'])
        self.train_windows = TokenWindows(self.data_dir, 'train', c['block_size'], self.batch_size, c['doc_aligned'],
                                          c['seed'], rt.rank, rt.world_size, self.accum, rt.device)
        self.meta = self.train_windows.meta
        self.val_batches = fixed_batches(self.data_dir, 'val', c['block_size'], self.batch_size, c['eval_iters'],
                                         c['doc_aligned'], c['seed'], rt.rank, rt.device)

        self.ckpt_path = os.path.join(self.out_dir, 'ckpt.pt')
        model, self.model_args, ckpt = build_model(stage, model_class, ConceptConfig,
                                                   model_args_from(c, self.meta, **fixed_model_args), c['init_from'],
                                                   self.ckpt_path, self.meta, self.data_dir, rt)
        cfg = model.cfg
        rt.print0(f"{model_class.__name__} ({stage}): {model.get_num_params() / 1e6:.2f}M parameters, "
                  f"encoder={cfg.encoder}, decoder={cfg.decoder}, bixt={cfg.bixt}, recursive_iters={cfg.recursive_iters}")
        self.optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                                    rt.device_type)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == 'float16'))
        self.iter_num, self.best_val_loss = 0, float('inf')
        if ckpt is not None:
            self.iter_num, self.best_val_loss = restore_training_state(ckpt, self.optimizer, self.scaler,
                                                                       self.train_windows, rt, config)
        self.budget = Budget(rt, c['max_iters'], c['max_minutes'], c['log_interval'], c['learning_rate'], c['min_lr'],
                             c['warmup_iters'], c['lr_decay_iters'] or c['max_iters'],
                             spent=ckpt.get('train_seconds', 0.0) if ckpt else 0.0)
        resumed = c['init_from'] == 'resume'
        self.start_iter = self.iter_num  # a resumed run's checkpoint of start_iter exists: it is not written again
        self.optimizer_step = OptimizerStep(self.optimizer, self.scaler, c['grad_clip'], c['max_nonfinite_steps'],
                                            self.ckpt_path, rt, saved_iter=self.start_iter if resumed else None)
        self.raw_model = self.model = model
        if c['compile']:
            model.compile_for_training(rt.device_type)  # encoder: fixed shapes; decoder and loss: dynamic M
        if rt.ddp:
            self.model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None)

        self.log = RunLog(rt, self.out_dir, config, f'train_{stage}.py', c['wandb_log'], c['wandb_project'],
                          c['wandb_run_name'], resumed_at=self.iter_num if resumed else None)
        self.meter = Throughput(rt)
        self.encoder_flops = model.estimate_flops(c['block_size'], 0) * self.batch_size * self.accum * rt.world_size
        self.tokens_seen = self.iter_num * self.tokens_per_iter
        self.last_step = None  # (loss sum, its weight) of the last step, on the device; read when logged

    # --- the loop's steps, in the order a script calls them
    def evaluate_and_continue(self, evaluate):
        """Every eval_interval iterations and at the end: evaluate() (the stage's metrics, the model in
        eval mode, no gradients), stop on a non-finite value, print and log it, keep the best,
        checkpoint. False once the run is done."""
        it, rt = self.iter_num, self.rt
        if it % self.config['eval_interval'] == 0 or self.budget.done(it):
            self.meter.pause()  # evaluation and checkpoints are left out of the throughput window
            train_loss = self.train_loss()
            self.raw_model.eval()
            with torch.no_grad():
                metrics = evaluate()
            self.raw_model.train()
            best_key = 'val_nll_bound' if 'val_nll_bound' in metrics else 'val_loss'  # the bound compares settings
            value = metrics[best_key]
            self.optimizer_step.check_validation(value, it, self.raw_model)  # a nan stops the run, unsaved
            bound = (f", val nll bound {value:.4f} (ppl <= {metrics['val_ppl_bound']:.1f})"
                     if best_key == 'val_nll_bound' else '')
            rt.print0(f"step {it}: train loss {'-' if train_loss is None else f'{train_loss:.4f}'}, "
                      f"val loss {metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f}{bound}"
                      f"{erank_text(metrics)}")
            self.log.log_eval({'iter': it, 'train_loss': train_loss, **metrics, 'lr': self.budget.lr(it),
                               'tokens_seen': self.tokens_seen})
            improved = value < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, value)
            if it > self.start_iter and (improved or self.config['always_save_checkpoint']):  # every rank: its RNG
                save_training_checkpoint(rt, self.ckpt_path, self.stage, self.raw_model, self.optimizer, self.scaler,
                                         self.model_args, self.config, it, self.best_val_loss, self.train_windows,
                                         self.meta, self.data_dir, self.budget.spent)
                self.optimizer_step.saved_iter = it
        return not self.budget.done(it)

    def train_loss(self):
        """The last step's loss (the sum over its micro-batches / their weight, over every rank), or
        None before the first step and after a step with nothing to score."""
        if self.last_step is None:
            return None
        loss_sum, weight = self.last_step
        weight = all_reduce_mean(weight, self.rt)
        return None if weight == 0 else mean_over_ranks(loss_sum, self.rt) / weight

    def micro_batches(self):
        """The step's `accum` micro-batches (ids (B, N) and their noise seed); under DDP the
        gradients are all-reduced after the last one only."""
        self.meter.resume()
        self.lr = self.budget.lr(self.iter_num)
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr
        self.budget.step_begins()
        for micro, batch in enumerate(self.train_windows.next_step()):
            if self.rt.ddp:
                self.model.require_backward_grad_sync = (micro == self.accum - 1)
            yield batch

    def backward(self, loss):
        self.scaler.scale(loss / self.accum).backward()

    def step(self, loss_sum, loss_weight, n_decoded):
        """The optimizer step after the micro-batches; loss_sum / loss_weight is the step's train
        loss (a 0-d tensor on the device and a number); n_decoded: positions the decoder ran at."""
        self.train_windows.prefetch()  # the next step's batch is copied while the device computes this one
        grad_norm = self.optimizer_step(self.raw_model.parameters(), loss_sum, self.iter_num)
        self.last_step = (loss_sum, loss_weight)
        self.tokens_seen += self.tokens_per_iter
        self.meter.add(self.tokens_per_iter,
                       self.encoder_flops + 3 * self.raw_model.decoder_flops(n_decoded) * self.rt.world_size)
        self.iter_num += 1
        self.budget.step_ends(self.iter_num)
        if self.iter_num % self.config['log_interval'] == 0:  # the one all-reduce and read of the loss per log_interval
            train_loss = self.train_loss()
            self.rt.print0(f"iter {self.iter_num}: loss {'-' if train_loss is None else f'{train_loss:.4f}'}, "
                           f"lr {self.lr:.2e}, grad norm {float(grad_norm):.3f}, {self.meter.report()}")

    def finish(self):
        self.log.finish()
        teardown(self.rt)


class ValidationTally:
    """Sums over the fixed validation batches, turned into means over every scored token of every
    batch and rank (a batch with nothing to score weighs nothing), with the concept diagnostics."""

    def __init__(self):
        self.sums, self.counts, self.geometry = {}, {}, []

    def add(self, stats, loss=None, **sums):
        """One batch's model stats: loss (its mean over stats['n_pred'] tokens) and accuracy count
        toward val_loss / val_accuracy; other sums name (total, tokens) pairs of their own."""
        if stats['n_pred']:  # the mean of nothing is nan
            self._add('val_loss', loss.item() * stats['n_pred'], stats['n_pred'])
            self.sums['val_accuracy'] = self.sums.get('val_accuracy', 0) + int(stats['n_correct'])
        for name, (total, n) in sums.items():
            self._add(name, total, n)
        if 'concepts' in stats:  # the concept arm's (model.StageModel.concept_stats)
            self.geometry.append(concept_diagnostics(stats['concepts']))

    def _add(self, name, total, n):
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + n

    def means(self, run, hint='', **derived):
        """{name: mean} of every sum, then each derived name: its function of those means, then the
        concept diagnostics."""
        shape = (run.config['eval_iters'], run.batch_size, hint)
        pred = ('val_loss', 'val_accuracy')  # both over the scored tokens, stats['n_pred']
        metrics = token_means(run.rt, self.counts.get('val_loss', 0), {k: self.sums.get(k, 0.0) for k in pred}, *shape)
        for name in (k for k in self.sums if k not in pred):
            metrics.update(token_means(run.rt, self.counts[name], {name: self.sums[name]}, *shape))
        metrics.update({name: fn(metrics) for name, fn in derived.items()})
        diagnostics = {k: all_reduce_mean(v, run.rt) for k, v in average_diagnostics(self.geometry).items()}
        return {**metrics, **diagnostics}


# ----------------------------------------------------------------------------------------------
# using a trained checkpoint

def model_from_checkpoint(ckpt, path='the checkpoint', **overrides):
    """A checkpoint dict's model (ConceptDiffusion for the diffusion stage, ConceptMLM otherwise)
    with its weights, on the CPU; overrides replace ConceptConfig fields (e.g. dropout=0.1).
    model_args or weights that do not fit this model.py, and non-finite weights (a diverged run),
    are one line."""
    from model import ConceptDiffusion, ConceptMLM
    args = {**ckpt['model_args'], **overrides}
    try:
        cfg = ConceptConfig(**args)
    except TypeError as e:
        raise SystemExit(f"{path}: its model_args do not fit this model.py ({e}); it was written by another version")
    model = (ConceptDiffusion if args.get('decoder') == 'diffusion' else ConceptMLM)(cfg)
    load_weights(model, ckpt['model'], path)
    bad = nonfinite_tensors(ckpt['model'])
    if bad:
        raise SystemExit(f"{path} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run that wrote it "
                         f"diverged; use an earlier checkpoint or train again with a lower learning_rate")
    return model


def load_model(ckpt_path, device='cpu'):
    """Any stage's checkpoint file -> (model in eval mode on device, the checkpoint dict)."""
    ckpt = load_checkpoint(ckpt_path, map_location='cpu')
    return model_from_checkpoint(ckpt, ckpt_path).to(device).eval(), ckpt


@torch.no_grad()
def concept_geometry(ckpt_path, data_dir=None, split='val', n_batches=10, batch_size=16, device='cpu', seed=1337):
    """The collapse diagnostics of model.concept_diagnostics (erank, erank_batchmean,
    concept_cos_mean/max, participation_ratio) for any checkpoint, averaged over n_batches fixed
    windows of clean text from a prepared data directory (by default the checkpoint's own)."""
    for name, value in (('n_batches', n_batches), ('batch_size', batch_size)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"concept_geometry: {name}={value!r} must be a positive int")
    model, ckpt = load_model(ckpt_path, device)
    if model.standard:
        raise ConfigError(f"{ckpt_path} is an encoder='standard' checkpoint: its token states are not a fixed set of "
                          f"C concept vectors, so the collapse diagnostics do not apply")
    data_dir = data_dir or ckpt.get('trained_on') or ckpt.get('data_dir')  # an export's data_dir holds only its tokenizer
    if not data_dir:
        raise SystemExit(f"{ckpt_path} does not record its data directory: pass data_dir=<a prepared data directory>")
    check_vocab(ckpt, prepare_data.load_meta(data_dir), ckpt_path, data_dir)
    batches = fixed_batches(data_dir, split, model.cfg.block_size, batch_size, n_batches, True, seed, 0, device)
    report = average_diagnostics([concept_diagnostics(model.encoder(idx)) for idx, _ in batches])
    if not all(math.isfinite(v) for v in report.values()):
        raise SystemExit(f"{ckpt_path}: the concepts are not finite on {data_dir}'s {split} windows (the weights are "
                         f"finite, the model's outputs overflow): the run diverged; use an earlier checkpoint")
    return report
