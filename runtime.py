"""
The mechanics that the three training stages share, so that each train_*.py reads as its own
stage: device and DDP setup, the memmap batch loader over a prepared data directory, the LR
schedule, checkpoint I/O, and logging (console, log.jsonl, run.json, optional wandb).
Nothing here knows about a particular objective.
"""
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import prepare_data
from model import ConfigError

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
                'recursive_iters', 'concept_loss_weight', 'concept_loss_warmup', 'max_minutes')
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
    if device_type == 'cuda' and dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        print("this GPU has no bfloat16; using float16 with a GradScaler", file=sys.stderr)
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
    static destructors at a normal interpreter exit abort a two-process CPU run now and then
    ('terminate called without an active exception', SIGABRT after the last step: 3 of 50 runs of
    a two-process train_mlm.py; 3 of 116 with the DDP model deleted first; 0 of 60 with os._exit)."""
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

    def _tokens(self):
        # re-open the memmap per draw: keeps the process's RSS from growing as pages are touched
        tokens, _ = prepare_data.open_split(self.data_dir, self.split, self.meta)
        return tokens

    def next_step(self):
        """The micro-batches of this rank for one optimizer step: a list of accum pairs
        (idx (B, T) int64 on device, noise_seed int)."""
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
        return {'generator': self.generator.get_state(), 'step': self.step}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
        self.step = state['step']


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
    fraction of it. The ranks agree on the time spent once every log_interval iterations (the log
    synchronises then anyway), so all of them take the same learning rate and stop at the same
    iteration; a run can overrun its budget by up to log_interval steps. `spent` goes into the
    checkpoint, so --init_from=resume continues the budget where it stopped."""

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
        if self.seconds and it % self.log_interval == 0:
            self.spent = all_reduce_mean(self.clock, self.rt)


# ----------------------------------------------------------------------------------------------
# checkpoints: tensors and plain Python values only, written atomically

def save_checkpoint(path, state):
    """torch.save to a temporary file beside path, then os.replace: a crash mid-write never
    leaves a truncated ckpt.pt."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} not found (train one first, e.g. python train_mlm.py config/tiny.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise SystemExit(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); it may be corrupt")
    ckpt['model'] = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    return ckpt


def check_vocab(ckpt, meta, ckpt_path, data_dir):
    """A checkpoint is only meaningful with the tokenizer it was trained with: the same size, and
    the same recipe (two BPEs of one size trained on different text share no ids)."""
    if ckpt['model_args']['vocab_size'] != meta['vocab_size']:
        raise SystemExit(f"checkpoint {ckpt_path} has vocab_size {ckpt['model_args']['vocab_size']} but {data_dir} "
                         f"has {meta['vocab_size']}: use the data directory the checkpoint was trained on")
    if ckpt.get('tokenizer') not in (None, meta['tokenizer']):
        raise SystemExit(f"checkpoint {ckpt_path} was trained with another tokenizer than {data_dir}'s "
                         f"({ckpt['tokenizer'].get('name')} vs {meta['tokenizer'].get('name')}, or the same name "
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
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------
# throughput accounting

# dense peak FLOP/s per GPU by name fragment: (bf16/fp16 tensor core, tf32). Unknown -> None, and
# the log says "n/a" rather than a wrong MFU.
GPU_PEAK_FLOPS = {
    'H200': (989e12, 494e12), 'H100 NVL': (835e12, 418e12), 'H100 PCIe': (756e12, 378e12),
    'H100': (989e12, 494e12), 'A100': (312e12, 156e12), 'A10G': (125e12, 62.5e12),
    'L40S': (362e12, 183e12), 'L4': (121e12, 60e12), 'RTX 4090': (165e12, 82.6e12),
    'RTX 3090': (71e12, 35.6e12), 'V100': (125e12, 15.7e12),
}


def peak_flops(rt):
    """Peak dense FLOP/s of one device in the run's dtype, or None when unknown (CPUs: bench.py
    measures theirs)."""
    if rt.device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name(rt.device)
    for key, (half, tf32) in GPU_PEAK_FLOPS.items():
        if key in name:
            return tf32 if rt.dtype == 'float32' else half
    return None


def format_mfu(flops_per_s, peak):
    return 'n/a' if not peak else f"{100 * flops_per_s / peak:.1f}%"


class Throughput:
    """tokens/s and MFU over the iterations since the last log line (the stages' log mechanics)."""

    def __init__(self, rt):
        self.rt, self.peak = rt, peak_flops(rt)
        self.reset()

    def reset(self):
        self.t0, self.flops, self.tokens = time.time(), 0.0, 0

    def add(self, tokens, flops):
        self.tokens += tokens
        self.flops += flops

    def report(self):
        """'N tok/s, mfu X%' since the last report, and start counting anew."""
        dt = time.time() - self.t0
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


def erank_text(metrics):
    """', concept erank X' for the evaluation line; nothing for the standard arm, which has no concepts."""
    return f", concept erank {metrics['erank']:.2f}" if 'erank' in metrics else ''


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
            with open(self.log_path) as f:
                records = [r for r in map(json.loads, f) if r['iter'] <= resumed_at]
        with open(self.log_path, 'w') as f:  # a fresh run starts a fresh log
            f.writelines(json.dumps(r) + '\n' for r in records)
        if records:
            self.t0 -= records[-1]['elapsed_s']
            self.logged = {r['iter'] for r in records}
        run = {'script': script, 'config': config, 'git_commit': git_commit(), 'argv': sys.argv,
               'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'python': platform.python_version(),
               'torch': torch.__version__, 'numpy': np.__version__, 'platform': platform.platform(),
               'device': rt.device, 'device_name': (torch.cuda.get_device_name(rt.device)
                                                    if rt.device_type == 'cuda' else platform.processor()),
               'world_size': rt.world_size, 'dtype': rt.dtype}
        with open(os.path.join(out_dir, 'run.json'), 'w') as f:
            json.dump(run, f, indent=2, default=str)
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
        with open(self.log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.wandb is not None:
            self.wandb.log(record, step=record.get('iter'))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------
# small shared steps of the stage scripts

def resolve_data_dir(dataset):
    """`dataset` is a prepared data directory; a bare name such as 'pydocs' means data/pydocs."""
    if os.path.isdir(dataset) or os.path.sep in dataset:
        return dataset
    return os.path.join('data', dataset)


def warm_start(model, ckpt_path, print0=print):
    """Load every tensor of another stage's checkpoint whose name and shape match (the encoder,
    and the decoder where the architectures agree); report what was loaded and what is new."""
    ckpt = load_checkpoint(ckpt_path)
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


def default_out_dir(stage):
    """out/<config file stem>_<stage> (out/tiny_mlm for `train_mlm.py config/tiny.py`), so that
    stages and model sizes sharing one config file never overwrite each other's checkpoints."""
    configs = [a for a in sys.argv[1:] if not a.startswith('--')]
    name = os.path.splitext(os.path.basename(configs[-1]))[0] if configs else 'run'
    return os.path.join('out', f"{name}_{stage}")


# ----------------------------------------------------------------------------------------------
# model construction, the optimizer step and checkpoint contents, as every stage does them

def build_model(stage, model_class, config_class, model_args, init_from, ckpt_path, meta, data_dir, rt):
    """init_from: 'scratch' | 'resume' (the same stage's run in ckpt_path, continued) | the path of
    any stage's checkpoint to warm-start from (matching tensors are copied, see warm_start).
    Returns (model on rt.device, model_args actually used, the resume checkpoint or None)."""
    ckpt = None
    if init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path, map_location=rt.device)
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
        model.load_state_dict(ckpt['model'])
        rt.print0(f"resumed from {ckpt_path} at iter {ckpt['iter_num']}")
    elif init_from != 'scratch':
        warm, _, _ = warm_start(model, init_from, rt.print0)
        check_vocab(warm, meta, init_from, data_dir)
    return model.to(rt.device), model_args, ckpt


def restore_training_state(ckpt, optimizer, scaler, sampler, rt):
    """Everything besides the weights that exact resume needs."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    sampler.load_state_dict(ckpt['sampler'])
    set_rng_state(ckpt['rng'], rt.rank)
    return ckpt['iter_num'], ckpt['best_val_loss']


def save_training_checkpoint(rt, path, stage, raw_model, optimizer, scaler, model_args, config, iter_num,
                             best_val_loss, sampler, meta, data_dir, train_seconds=0.0):
    """Called on every rank (each contributes its RNG state); rank 0 writes ckpt.pt atomically.
    Its contents are tensors and plain Python values only (it loads with weights_only=True); the
    tokenizer recipe and data directory travel along, so eval_glue.py and sample.py need only --ckpt."""
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
    """unscale -> clip -> step, skipping any step whose loss or gradient is not finite. All ranks
    take the same decision; max_nonfinite skips in a row stop the run, leaving the last good
    checkpoint untouched."""

    def __init__(self, optimizer, scaler, grad_clip, max_nonfinite, ckpt_path, rt):
        self.optimizer, self.scaler, self.grad_clip = optimizer, scaler, grad_clip
        self.max_nonfinite, self.ckpt_path, self.rt = max_nonfinite, ckpt_path, rt
        self.streak = 0

    def __call__(self, params, loss_value, iter_num):
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float('inf'))
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if self.rt.ddp:
            finite = all_reduce_mean(float(finite), self.rt) == 1.0
        if finite:
            self.scaler.step(self.optimizer)
            self.streak = 0
        else:
            self.streak += 1
            self.rt.print0(f"iter {iter_num}: non-finite loss or gradient, step skipped ({self.streak} in a row)")
            if self.streak >= self.max_nonfinite:
                raise SystemExit(f"{self.streak} non-finite steps in a row; stopping. The last good checkpoint is "
                                 f"{self.ckpt_path}; try a lower learning_rate or dtype='float32'")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)


# ----------------------------------------------------------------------------------------------
# using a trained checkpoint

def model_from_checkpoint(ckpt, **overrides):
    """A checkpoint dict's model (ConceptDiffusion for the diffusion stage, ConceptMLM otherwise)
    with its weights, on the CPU; overrides replace ConceptConfig fields (e.g. dropout=0.1)."""
    from model import ConceptConfig, ConceptDiffusion, ConceptMLM
    args = {**ckpt['model_args'], **overrides}
    model = (ConceptDiffusion if args.get('decoder') == 'diffusion' else ConceptMLM)(ConceptConfig(**args))
    model.load_state_dict(ckpt['model'])
    return model


def load_model(ckpt_path, device='cpu'):
    """Any stage's checkpoint file -> (model in eval mode on device, the checkpoint dict)."""
    ckpt = load_checkpoint(ckpt_path, map_location='cpu')
    return model_from_checkpoint(ckpt).to(device).eval(), ckpt


@torch.no_grad()
def concept_geometry(ckpt_path, data_dir=None, split='val', n_batches=10, batch_size=16, device='cpu', seed=1337):
    """The collapse diagnostics of model.concept_diagnostics (erank, erank_batchmean,
    concept_cos_mean/max, participation_ratio) for any checkpoint, averaged over n_batches fixed
    windows of clean text from a prepared data directory (by default the checkpoint's own)."""
    from model import average_diagnostics, concept_diagnostics
    model, ckpt = load_model(ckpt_path, device)
    if model.standard:
        raise ConfigError(f"{ckpt_path} is an encoder='standard' checkpoint: its token states are not a fixed set of "
                          f"C concept vectors, so the collapse diagnostics do not apply")
    data_dir = data_dir or ckpt['data_dir']
    check_vocab(ckpt, prepare_data.load_meta(data_dir), ckpt_path, data_dir)
    batches = fixed_batches(data_dir, split, model.cfg.block_size, batch_size, n_batches, True, seed, 0, device)
    return average_diagnostics([concept_diagnostics(model.encoder(idx)) for idx, _ in batches])
