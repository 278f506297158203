"""
Speed and memory of the concept encoder against a standard transformer encoder of the same shape.

    python bench.py config/h512l2.py --seq_lens=512,2048,8192 --dtype=bfloat16 --json=bench.json
    python bench.py config/tiny.py --seq_lens=128,1024 --stages=mlm --dtype=float32

For each model ('concept', 'standard'), stage ('mlm', 'tsdae', 'diffusion') and sequence length,
a fresh process measures training throughput (forward + backward + AdamW step, tokens/s; the
median of timed_steps steps, or of 2 when they take timed_seconds; compiled as the training
scripts compile when compile=True), inference throughput (encoding only, eager, tokens/s), peak
memory (process RSS on the CPU, max allocated on CUDA) and MFU against the matmul peak of the
same dtype, measured by this script on the same machine in the same run. Data are random tokens:
speed does not depend on the text. A row that ran out of memory (or whose process the OOM killer
ended) says "oom": true instead of numbers; one whose process crashed says "error": its last line.

The peer ('standard') is model.py's encoder='standard' arm, the one the training scripts train:
a bidirectional transformer encoder from the same blocks (SDPA self-attention over the tokens,
the same gated FFN, the same n_layer, n_embd, n_head, ffn_size and vocabulary) with the same
objective, the lm_head only at the positions that carry a loss, and for diffusion MDLM's
AdaLN-conditioned denoiser. Its attention is O(N²) in compute (SDPA's fused kernels keep its
memory low).

--stages=generate measures sampling instead: ConceptDiffusion.generate() filling a fully masked
sequence in generate_steps denoising steps (tokens/s of finished text, eager, no gradients).
Every step re-encodes the sequence: O(C·N) for the concept arm, O(N²) for the standard one.
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time
from statistics import median

import torch
import torch.nn as nn

from model import ConceptConfig, ConceptDiffusion, ConceptMLM, ConfigError
from runtime import gpu_peak_flops, keep_freed_memory, resolve_device

# ----------------------------------------------------------------------------------------------
# defaults (a config file such as config/h512l2.py sets the model shape; its training keys are
# skipped here)
n_layer = 2
n_head = 8
n_embd = 512
n_concepts = 128
ffn_size = 1024
n_dec_layer = 1                  # MLM / TSDAE decoder layers (the diffusion decoder uses 2)
shared_token_kv = False          # the concept encoder's ablation flag (model.py): one token K/V projection
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
json_out = ''                    # write the results here (also --json=...)
worker = ''                      # internal: 'model:stage:seq_len' runs one measurement and prints JSON
# ----------------------------------------------------------------------------------------------
if any(a.startswith('--json=') for a in sys.argv):  # --json is the documented spelling
    sys.argv = [a.replace('--json=', '--json_out=', 1) if a.startswith('--json=') else a for a in sys.argv]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
try:
    device = resolve_device(device)
except ConfigError as e:
    raise SystemExit(f"bench.py: {e}")
keep_freed_memory()  # as the training scripts do (runtime.setup_runtime): bench measures their steps
device_type = 'cuda' if device.startswith('cuda') else device  # 'cuda' | 'mps' | 'cpu'
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
if device_type == 'mps' and dtype == 'bfloat16':
    dtype = 'float16'  # as the training scripts do on MPS (runtime.setup_runtime)
# A GPU step at the CPU's 8192 tokens takes about a millisecond, launch overhead included: the
# GPU needs a training-sized batch (the h512l2 config's 64 x 512 tokens) and more steps to mean
# anything, and compiled rows a few more warm-up steps (autotuning, the dynamic decoder graph).
DEVICE_SIZES = {'cuda': (32768, 3, 20), 'mps': (8192, 2, 5), 'cpu': (8192, 1, 3)}  # tokens, warm-up, timed
tokens_per_batch = tokens_per_batch or DEVICE_SIZES[device_type][0]
warmup_steps = DEVICE_SIZES[device_type][1] if warmup_steps < 0 else warmup_steps
timed_steps = timed_steps or DEVICE_SIZES[device_type][2]


def setting_list(name, value, allowed=None):
    """'a,b' -> ['a', 'b'] (ints for seq_lens); an empty list or a value not allowed is a one-line
    error before anything is measured (a typo must not end up as a row)."""
    items = [v.strip() for v in value.split(',') if v.strip()]
    if allowed is None:
        items = [int(v) if v.isdigit() and int(v) > 0 else v for v in items]
        bad = [v for v in items if not isinstance(v, int)]
    else:
        bad = [v for v in items if v not in allowed]
    if bad or not items:
        want = ', '.join(allowed) if allowed else 'positive integers'
        raise SystemExit(f"bench.py: --{name}={value!r}: {', '.join(map(str, bad)) or 'empty'}; use {want}")
    return items


stage_list = setting_list('stages', stages, ('mlm', 'tsdae', 'diffusion', 'generate'))
model_list = setting_list('models', models, ('concept', 'standard'))
seq_len_list = setting_list('seq_lens', seq_lens)
if dtype not in DTYPES:
    raise SystemExit(f"bench.py: --dtype={dtype!r}; use one of {', '.join(DTYPES)}")
if timed_steps < 1 or warmup_steps < 0 or tokens_per_batch < 1:
    raise SystemExit("bench.py: timed_steps and tokens_per_batch must be >= 1, warmup_steps >= 0")
if json_out and (os.path.isdir(json_out) or not os.path.isdir(os.path.dirname(os.path.abspath(json_out)))):
    raise SystemExit(f"bench.py: --json={json_out}: not a file in an existing directory")
ptdtype = DTYPES[dtype]
MASK_ID, PAD_ID = vocab_size - 3, vocab_size - 4  # the last ids play the special tokens
N_REGULAR = vocab_size - 5


def stage_batch(model, stage, B, N, g):
    """Random token ids and the stage's own noise (model.py), so the count of decoded positions
    follows the stage: (ids, targets, attn_mask)."""
    idx = torch.randint(N_REGULAR, (B, N), generator=g)
    if stage == 'mlm':
        return (*model.mlm_noise(idx, g, 0.15), None)
    if stage == 'tsdae':
        inputs, visible, targets = model.tsdae_noise(idx, g, 0.6)
        return inputs, targets, visible
    return idx, None, None  # diffusion: the model draws its own noise


def build(model_name, stage, N):
    cfg = ConceptConfig(encoder=model_name, vocab_size=vocab_size, block_size=N, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, n_concepts=n_concepts, ffn_size=ffn_size, n_dec_layer=n_dec_layer,
                        pad_id=PAD_ID, mask_id=MASK_ID, shared_token_kv=shared_token_kv and model_name == 'concept',
                        decoder={'mlm': 'perceiver', 'tsdae': 'posonly'}.get(stage, 'diffusion'))
    if stage in ('diffusion', 'generate'):
        cfg.n_dec_layer = 2
        return ConceptDiffusion(cfg)
    return ConceptMLM(cfg)


def loss_and_decoded(model, stage, batch):
    idx, targets, visible = batch
    if stage == 'diffusion':
        _, loss, stats = model(idx.to(device), generator=torch.Generator(device=device).manual_seed(0))
    else:
        _, loss, stats = model(idx.to(device), targets.to(device), None if visible is None else visible.to(device))
    return loss, stats['n_pred']


def measure(spec):
    """One row, in this (fresh) process."""
    model_name, stage, N = spec.split(':')
    N = int(N)
    B = 1 if stage == 'generate' else max(1, tokens_per_batch // N)  # sampling: one sequence, as a user waits for it
    if device_type == 'cpu' and mem_limit_gb > 0:
        limit = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row = {'model': model_name, 'stage': stage, 'seq_len': N, 'batch_size': B}
    ctx = torch.autocast(device_type, dtype=ptdtype) if dtype != 'float32' else torch.autocast(device_type, enabled=False)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model = build(model_name, stage, N).to(device)
        if stage == 'generate':
            row.update(measure_generate(model, B, N, ctx))
            return finish_row(row)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device_type in ('cuda', 'cpu'))
        encode = model.encoder.forward  # eager, both
        if compile:  # as the training scripts compile the concept model
            model.compile_for_training(device_type)
        batches = [stage_batch(model, stage, B, N, g) for _ in range(2)]
        step_times, step_flops = [], []
        step = 0
        while not timed_enough(step_times):
            sync()
            t0 = time.perf_counter()
            with ctx:
                loss, n_decoded = loss_and_decoded(model, stage, batches[step % 2])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= warmup_steps:
                step_times.append(time.perf_counter() - t0)
                step_flops.append(model.estimate_flops(N, n_decoded / B) * B)
            step += 1
        # the median step: one step slowed down by a neighbour on a shared machine moves it little
        row['train_tokens_per_s'] = B * N / median(step_times)
        row['train_flops_per_s'] = sum(step_flops) / len(step_flops) / median(step_times)
        idx = batches[0][0].to(device)
        encode_times = []
        with torch.no_grad(), ctx:  # no warm-up: eager, and the median drops a slow first call
            while not timed_enough(encode_times):
                sync()
                t0 = time.perf_counter()
                encode(idx)
                sync()
                encode_times.append(time.perf_counter() - t0)
        row['infer_tokens_per_s'] = B * N / median(encode_times)
    except (RuntimeError, MemoryError) as e:
        if 'memory' not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        row['oom'] = True
    return finish_row(row)


def measure_generate(model, B, N, ctx):
    """Sampling speed: generate() fills a fully masked sequence of N tokens in generate_steps
    steps; tokens/s of finished text, the median of the timed runs (eager: no warm-up run)."""
    idx = torch.full((B, N), MASK_ID, device=device)
    times = []
    with ctx:
        while not timed_enough(times):
            sync()
            t0 = time.perf_counter()
            model.generate(idx, steps=generate_steps, generator=torch.Generator(device=device).manual_seed(0))
            sync()
            times.append(time.perf_counter() - t0)
    return {'steps': generate_steps, 'generate_tokens_per_s': B * N / median(times)}


def finish_row(row):
    """The row's peak memory."""
    if device_type == 'cuda':
        row['peak_mem_mb'] = torch.cuda.max_memory_allocated() / 2**20
    elif device_type == 'mps':  # MPS keeps no peak: what the driver holds at the end of the row
        row['peak_mem_mb'] = torch.mps.driver_allocated_memory() / 2**20
    else:
        row['peak_mem_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def timed_enough(times):
    """timed_steps timings, or 2 once they add up to timed_seconds (the slow rows)."""
    return len(times) >= timed_steps or (len(times) >= 2 and sum(times) >= timed_seconds)


def sync():
    """Wait for the device: its kernels run asynchronously, and a timing must include them."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def matmul_peak():
    """The machine's dense matmul FLOP/s in this dtype: the best of a few large square matmuls."""
    n = 4096 if device_type == 'cuda' else 2048
    a = torch.randn(n, n, device=device, dtype=ptdtype)
    b = torch.randn(n, n, device=device, dtype=ptdtype)
    best = 0.0
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


if worker:
    print('BENCH_ROW ' + json.dumps(measure(worker)), flush=True)
    sys.exit(0)

# ----------------------------------------------------------------------------------------------
# the driver: one fresh process per row, then a table and the JSON
measured_peak = matmul_peak()
device_name = (torch.cuda.get_device_name(device) if device_type == 'cuda'
               else platform.processor() or platform.machine())
listed_peak = gpu_peak_flops(device_name, dtype) if device_type == 'cuda' else None
# MFU on a known GPU is against its listed dense peak (the usual definition); elsewhere against the
# matmul peak measured here (a CPU has no meaningful datasheet figure)
peak = listed_peak or measured_peak
print(f"{device} ({device_name}) {dtype}: measured matmul peak {measured_peak / 1e12:.2f} TFLOP/s; MFU against "
      + (f"the listed peak {listed_peak / 1e12:.0f} TFLOP/s" if listed_peak else "the measured peak")
      + f"; {tokens_per_batch} tokens per batch, {warmup_steps} warm-up + {timed_steps} timed steps")
rows = []
argv = [a for a in sys.argv[1:] if not a.startswith('--worker=')]
for stage in stage_list:
    for N in seq_len_list:
        for model_name in model_list:
            spec = f"{model_name}:{stage}:{N}"
            t_row = time.perf_counter()
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f'--worker={spec}'],
                                 capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith('BENCH_ROW ')]
            if lines:
                row = json.loads(lines[-1][len('BENCH_ROW '):])
            else:  # killed by a signal (the OOM killer's SIGKILL) or crashed: say which, not a number
                row = {'model': model_name, 'stage': stage, 'seq_len': N, 'batch_size': max(1, tokens_per_batch // N),
                       'error': (out.stderr.strip().splitlines() or [f'exit {out.returncode}'])[-1][:200]}
                if out.returncode < 0:
                    row['oom'] = True
            if 'train_flops_per_s' in row:
                row['mfu'] = row.pop('train_flops_per_s') / peak
            rows.append(row)
            print(f"{stage:9s} N={N:6d} {model_name:8s} " + (
                'out of memory' if row.get('oom') else f"crashed: {row['error']}" if 'error' in row else
                f"generate {row['generate_tokens_per_s']:10,.0f} tok/s in {row['steps']} steps  "
                f"peak {row['peak_mem_mb']:8,.0f} MB" if stage == 'generate' else
                f"train {row['train_tokens_per_s']:10,.0f} tok/s  infer {row['infer_tokens_per_s']:11,.0f} tok/s  "
                f"peak {row['peak_mem_mb']:8,.0f} MB  mfu {100 * row['mfu']:5.1f}%") +
                f"  ({time.perf_counter() - t_row:.0f} s)", flush=True)

print("\n| stage | N | concept train tok/s | standard train tok/s | train speed-up | infer speed-up | "
      "concept MB | standard MB | concept MFU |\n|---|---|---|---|---|---|---|---|---|")
for stage in [s for s in stage_list if s != 'generate']:
    for N in seq_len_list:
        c = next((r for r in rows if r['model'] == 'concept' and r['stage'] == stage and r['seq_len'] == N), None)
        s = next((r for r in rows if r['model'] == 'standard' and r['stage'] == stage and r['seq_len'] == N), None)
        if c is None or s is None:
            continue

        def fmt(r, key, f='{:,.0f}'):
            return 'oom' if r.get('oom') else 'error' if 'error' in r else f.format(r[key])
        failed = any(r.get('oom') or 'error' in r for r in (c, s))
        speed = '-' if failed else f"{c['train_tokens_per_s'] / s['train_tokens_per_s']:.1f}x"
        infer = '-' if failed else f"{c['infer_tokens_per_s'] / s['infer_tokens_per_s']:.1f}x"
        print(f"| {stage} | {N} | {fmt(c, 'train_tokens_per_s')} | {fmt(s, 'train_tokens_per_s')} | {speed} | {infer} | "
              f"{fmt(c, 'peak_mem_mb')} | {fmt(s, 'peak_mem_mb')} | {fmt(c, 'mfu', '{:.1%}')} |")
if 'generate' in stage_list:
    print(f"\n| N | concept generate tok/s | standard generate tok/s | speed-up ({generate_steps} steps) |"
          "\n|---|---|---|---|")
    for N in seq_len_list:
        c, s = (next((r for r in rows if r['model'] == m and r['stage'] == 'generate' and r['seq_len'] == N), {})
                for m in ('concept', 'standard'))
        rate = [f"{r['generate_tokens_per_s']:,.0f}" if 'generate_tokens_per_s' in r else 'oom' if r.get('oom') else '-'
                for r in (c, s)]
        both = all('generate_tokens_per_s' in r for r in (c, s))
        speed = f"{c['generate_tokens_per_s'] / s['generate_tokens_per_s']:.1f}x" if both else '-'
        print(f"| {N} | {rate[0]} | {rate[1]} | {speed} |")
if json_out:
    machine = {'device': device, 'device_name': device_name, 'measured_peak_flops': measured_peak,
               'peak_source': 'listed' if listed_peak else 'measured', 'tokens_per_batch': tokens_per_batch,
               'cpu_count': os.cpu_count(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
               'shape': dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_concepts=n_concepts,
                             ffn_size=ffn_size, vocab_size=vocab_size, shared_token_kv=shared_token_kv),
               'compile': compile}
    with open(json_out, 'w') as f:
        json.dump({'machine': machine, 'peak_flops': {dtype: peak}, 'rows': rows}, f, indent=2)
    print(f"wrote {json_out}")
