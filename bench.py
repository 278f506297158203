"""
Speed and memory of the concept encoder against the standard encoder of the same shape (model.py's
encoder='standard' arm: the same blocks, widths, vocabulary and objective; O(N²) attention).

    python bench.py config/h512l2.py --seq_lens=512,2048,8192 --dtype=bfloat16 --out=bench.json
    python bench.py config/h512l2.py --seq_lens=8192,32768 --stages=generate

Each row (stage, N, model) runs on random tokens in a fresh process: training tokens/s (the median step of
forward, backward and AdamW, compiled as training compiles), eager encoding tokens/s, peak memory (RSS on the
CPU, max allocated on CUDA), MFU against common.peak_flops; "oom" if it ran out of memory, a crash its last
line. --stages=generate times generate() filling one masked sequence in generate_steps steps (O(C·N) vs O(N²)).
"""
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from statistics import median

import torch

import common
from model import ConceptConfig, ConceptDiffusion, ConceptMLM

# defaults (a config file such as config/h512l2.py sets the model shape; its training keys are skipped)
n_layer = 2
n_head = 8
n_embd = 512
n_concepts = 128
ffn_size = 1024
n_dec_layer = 1                  # MLM / TSDAE decoder layers (the diffusion decoder uses 2)
vocab_size = 8192
seq_lens = '512,2048,8192'       # comma-separated sequence lengths
stages = 'mlm,tsdae,diffusion'   # and 'generate' (sampling speed; not in the default)
generate_steps = 8               # denoising steps of a generate row
models = 'concept,standard'
tokens_per_batch = 0             # batch size = max(1, tokens_per_batch // seq_len); 0: by device (below)
warmup_steps = -1                # untimed steps before timing (compile, autotuning, caches); -1: by device
timed_steps = 0                  # tokens/s from the median timed step; 0: by device
timed_seconds = 5.0              # but stop after 2 steps once this much has been timed (slow rows)
device = 'auto'                  # 'auto' | 'cpu' | 'cuda' | 'mps'
dtype = 'bfloat16'               # autocast dtype; 'float32' runs without autocast
compile = False                  # torch.compile the models (measure with and without)
mem_limit_gb = 20.0              # CPU: address-space limit of a worker; beyond it the row says oom
out = ''                         # write the results here as JSON
worker = ''                      # internal: 'model:stage:seq_len' runs one measurement and prints JSON
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
STAGES, MODELS = ('mlm', 'tsdae', 'diffusion', 'generate'), ('concept', 'standard')
LEAST = {'vocab_size': 6, 'generate_steps': 1, 'tokens_per_batch': 0, 'warmup_steps': -1, 'timed_steps': 0,
         'timed_seconds': 0, 'mem_limit_gb': 0}  # 6: the 5 specials and one ordinary token


def setting_list(name, value, allowed=None):
    """'a,b' -> ['a', 'b'] (positive ints without allowed); a typo is one line before anything is measured."""
    items = [v.strip() for v in value.split(',') if v.strip()]
    bad = [v for v in items if (v not in allowed if allowed else not (v.isdigit() and int(v) > 0))]
    if bad or not items:
        raise common.InputError(f"{name}={value!r}: {', '.join(bad) or 'empty'}; use "
                                f"{', '.join(allowed) if allowed else 'positive integers'}")
    return items if allowed else [int(v) for v in items]


common.check_settings({k: globals()[k] for k in (*LEAST, 'n_layer', 'n_head', 'n_embd', 'n_concepts', 'ffn_size',
                                                 'n_dec_layer', 'dtype')})
for key, least in LEAST.items():
    if not globals()[key] >= least:
        raise common.InputError(f"{key}={globals()[key]!r} must be >= {least}")
stage_list, model_list = setting_list('stages', stages, STAGES), setting_list('models', models, MODELS)
seq_len_list = setting_list('seq_lens', seq_lens)
spec = worker.split(':')
if worker and (len(spec) != 3 or spec[0] not in MODELS or spec[1] not in STAGES or
               not spec[2].isdigit() or int(spec[2]) < 1):
    raise common.InputError(f"worker={worker!r}: --worker is bench.py's own, to run one row in a fresh process: "
                            f"<model>:<stage>:<seq_len>, e.g. concept:mlm:512; leave it out to measure every row")
if out and not worker:
    common.check_output(out)
device = common.resolve_device(device)
common.keep_freed_memory()  # as the training scripts do: bench measures their steps
device_type = common.device_type(device)  # 'cuda' | 'mps' | 'cpu'
if device_type == 'mps' and dtype == 'bfloat16':
    dtype = 'float16'  # as the training scripts do on MPS
# a GPU needs a training-sized batch (a step of 8192 tokens takes a millisecond), compiled rows more warm-up
DEVICE_SIZES = {'cuda': (32768, 3, 20), 'mps': (8192, 2, 5), 'cpu': (8192, 1, 3)}  # tokens, warm-up, timed
tokens_per_batch = tokens_per_batch or DEVICE_SIZES[device_type][0]
warmup_steps = DEVICE_SIZES[device_type][1] if warmup_steps < 0 else warmup_steps
timed_steps = timed_steps or DEVICE_SIZES[device_type][2]
MASK_ID, PAD_ID, N_REGULAR = vocab_size - 3, vocab_size - 4, vocab_size - 5  # the last 5 ids play the specials


def timed(step):
    """Seconds of each call of step() (for a median: a call slowed by a neighbour moves it little):
    timed_steps calls, or 2 once they add up to timed_seconds. Each waits for the device's async kernels."""
    sync = {'cuda': torch.cuda.synchronize, 'mps': lambda: torch.mps.synchronize()}.get(device_type, lambda: None)
    times = []
    while len(times) < timed_steps and not (len(times) >= 2 and sum(times) >= timed_seconds):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def measure(model_name, stage, N):
    """One row, in this (fresh) process."""
    B = 1 if stage == 'generate' else max(1, tokens_per_batch // N)  # sampling: one sequence, as a user waits for it
    if device_type == 'cpu' and mem_limit_gb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (int(mem_limit_gb * 2**30),) * 2)
    row = {'model': model_name, 'stage': stage, 'seq_len': N, 'batch_size': B}
    ctx = common.autocast(device, dtype)
    try:
        torch.manual_seed(0)
        cfg = ConceptConfig(encoder=model_name, vocab_size=vocab_size, block_size=N, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, n_concepts=n_concepts, ffn_size=ffn_size, pad_id=PAD_ID, mask_id=MASK_ID,
                            n_dec_layer=2 if stage in ('diffusion', 'generate') else n_dec_layer,
                            decoder={'mlm': 'perceiver', 'tsdae': 'posonly'}.get(stage, 'diffusion'))
        model = (ConceptMLM if stage in ('mlm', 'tsdae') else ConceptDiffusion)(cfg).to(device)
        noise = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731 (the same noise at every step)
        if stage == 'generate':
            idx = torch.full((B, N), MASK_ID, device=device)  # (1, N): everything to fill
            with ctx:
                times = timed(lambda: model.generate(idx, steps=generate_steps, generator=noise()))
            return {**row, 'steps': generate_steps, 'generate_tokens_per_s': B * N / median(times)}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type in ('cuda', 'cpu'))
        encode = model.encoder.forward  # eager, both
        if compile:  # as the training scripts compile the concept model
            model.compile_for_training(device_type)
        g = torch.Generator().manual_seed(0)
        batches = []  # two of (ids, targets, visible) (B, N), with the stage's own noise: the decoded count follows it
        for _ in range(2):
            idx = torch.randint(N_REGULAR, (B, N), generator=g)
            if stage == 'tsdae':
                inputs, visible, targets = model.tsdae_noise(idx, g, 0.6)
            else:  # diffusion: the model draws its own noise
                (inputs, targets), visible = model.mlm_noise(idx, g, 0.15) if stage == 'mlm' else (idx, None), None
            batches.append([None if t is None else t.to(device) for t in (inputs, targets, visible)])
        flops, cycle = [], itertools.cycle(batches)

        def train_step():
            idx, targets, visible = next(cycle)
            with ctx:
                _, loss, stats = model(idx, generator=noise()) if stage == 'diffusion' else model(idx, targets, visible)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flops.append(model.estimate_flops(B, N, stats['n_pred']))
        for _ in range(warmup_steps):
            train_step()
        times = timed(train_step)
        row['train_tokens_per_s'] = B * N / median(times)
        row['train_flops_per_s'] = sum(flops[-len(times):]) / len(times) / median(times)
        with torch.no_grad(), ctx:  # no warm-up: eager, and the median drops a slow first call
            times = timed(lambda: encode(batches[0][0]))
        row['infer_tokens_per_s'] = B * N / median(times)
    except (RuntimeError, MemoryError) as e:
        if 'memory' not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        row['oom'] = True
    return row


if worker:  # the row and its peak memory (MPS keeps no peak: what its driver holds at the end)
    row = measure(spec[0], spec[1], int(spec[2]))
    row['peak_mem_mb'] = (torch.cuda.max_memory_allocated() if device_type == 'cuda' else
                          torch.mps.driver_allocated_memory() if device_type == 'mps' else
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print('BENCH_ROW ' + json.dumps(row), flush=True)
    sys.exit(0)

# the driver: one fresh process per row, then a table and the JSON
peak = common.peak_flops(device, dtype)
device_name = (torch.cuda.get_device_name(device) if device_type == 'cuda' else
               platform.processor() or platform.machine())
peak_source = peak and ('listed' if device_type == 'cuda' else 'measured matmul')
print(f"{device} ({device_name}) {dtype}: MFU against " + (f"the {peak_source} peak {peak / 1e12:.2f} TFLOP/s" if peak
      else "no known peak: n/a") + f"; {tokens_per_batch} tokens per batch, {warmup_steps} warm-up + {timed_steps} "
      f"timed steps")
rows, argv = [], [a for a in sys.argv[1:] if not a.startswith('--worker=')]
try:
    for stage, N, model_name in itertools.product(stage_list, seq_len_list, model_list):
        t_row = time.perf_counter()
        run = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f'--worker={model_name}:{stage}:{N}'],
                             capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith('BENCH_ROW ')]
        if lines:
            row = json.loads(lines[-1][len('BENCH_ROW '):])
        else:  # killed by a signal (the OOM killer's SIGKILL) or crashed: say which, not a number
            row = {'model': model_name, 'stage': stage, 'seq_len': N,
                   'batch_size': 1 if stage == 'generate' else max(1, tokens_per_batch // N),
                   'error': (run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[-1][:200]}
            if run.returncode < 0:
                row['oom'] = True
        if 'train_flops_per_s' in row:
            row['mfu'] = row['train_flops_per_s'] / peak if peak else None
        rows.append(row)
        mfu = f"{100 * row['mfu']:5.1f}%" if row.get('mfu') is not None else '  n/a'
        print(f"{stage:9s} N={N:6d} {model_name:8s} " + (
            'out of memory' if row.get('oom') else f"crashed: {row['error']}" if 'error' in row else
            f"generate {row['generate_tokens_per_s']:10,.0f} tok/s in {row['steps']} steps  "
            f"peak {row['peak_mem_mb']:8,.0f} MB" if stage == 'generate' else
            f"train {row['train_tokens_per_s']:10,.0f} tok/s  infer {row['infer_tokens_per_s']:11,.0f} tok/s  "
            f"peak {row['peak_mem_mb']:8,.0f} MB  mfu {mfu}") + f"  ({time.perf_counter() - t_row:.0f} s)", flush=True)
    stopped = False
except KeyboardInterrupt:  # the rows measured so far are still tabled and written
    stopped = True


def cell(r, key, f='{:,.0f}'):
    return ('-' if r is None else 'oom' if r.get('oom') else 'error' if 'error' in r else 'n/a' if r[key] is None
            else f.format(r[key]))


def ratio(c, s, key):  # the concept arm's speed-up over the standard one
    return f"{c[key] / s[key]:.1f}x" if c and s and key in c and key in s else '-'


found = {(r['model'], r['stage'], r['seq_len']): r for r in rows}
print("\n| stage | N | concept train tok/s | standard train tok/s | train speed-up | infer speed-up | "
      "concept MB | standard MB | concept MFU |\n|---|---|---|---|---|---|---|---|---|")
for stage, N in itertools.product([s for s in stage_list if s != 'generate'], seq_len_list):
    c, s = found.get(('concept', stage, N)), found.get(('standard', stage, N))
    if c and s:
        print(f"| {stage} | {N} | {cell(c, 'train_tokens_per_s')} | {cell(s, 'train_tokens_per_s')} | "
              f"{ratio(c, s, 'train_tokens_per_s')} | {ratio(c, s, 'infer_tokens_per_s')} | {cell(c, 'peak_mem_mb')} | "
              f"{cell(s, 'peak_mem_mb')} | {cell(c, 'mfu', '{:.1%}')} |")
if 'generate' in stage_list:
    print(f"\n| N | concept generate tok/s | standard generate tok/s | speed-up ({generate_steps} steps) |"
          "\n|---|---|---|---|")
    for N in seq_len_list:
        c, s = found.get(('concept', 'generate', N)), found.get(('standard', 'generate', N))
        print(f"| {N} | {cell(c, 'generate_tokens_per_s')} | {cell(s, 'generate_tokens_per_s')} | "
              f"{ratio(c, s, 'generate_tokens_per_s')} |")
if out:
    machine = {'device': device, 'device_name': device_name, 'peak_source': peak_source,
               'tokens_per_batch': tokens_per_batch, 'cpu_count': os.cpu_count(),
               'torch': torch.__version__, 'threads': torch.get_num_threads(), 'compile': compile,
               'shape': dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_concepts=n_concepts,
                             ffn_size=ffn_size, vocab_size=vocab_size)}
    common.write_text(out, json.dumps({'machine': machine, 'peak_flops': {dtype: peak}, 'rows': rows}, indent=2))
    print(f"wrote {out}")
if stopped:
    common.interrupted(f"{len(rows)} measured row(s) above" + (f" and in {out}" if out else ""))
