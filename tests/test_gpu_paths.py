"""The CUDA and MPS code paths, exercised on the CPU where that is honest: a checkpoint resumed
onto a device that is not the CPU (the meta device stands in), device names and capabilities
faked with monkeypatch, host reads counted by intercepting every op that reads the device.
tests/test_cuda.py holds what needs a real GPU."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
import model as model_module
from conftest import ROOT, TINY, run_script
from model import ConceptConfig, ConceptDiffusion, ConceptMLM, attention


def tiny_cfg(**kw):
    args = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32, n_concepts=8, ffn_size=64,
                pad_id=0, mask_id=1, eod_id=2)
    return ConceptConfig(**{**args, **kw})


# ----------------------------------------------------------------------------------------------
# defect 1: resume onto a device other than the CPU


def test_resume_onto_another_device_keeps_rng_states_on_the_cpu(data_dir, tmp_path):
    """init_model reads the checkpoint onto the CPU and the script moves only the model (and, through
    load_state_dict, the optimizer state) to its device: the RNG and sampler states, which
    torch.set_rng_state and Generator.set_state accept only as CPU ByteTensors, stay there.
    The meta device plays the GPU: its tensors are refused by those setters as CUDA ones are."""
    meta = common.load_meta(data_dir)
    config = dict(block_size=32, n_layer=1, n_head=2, n_embd=16, n_concepts=4, ffn_size=32, decoder='perceiver',
                  tie_weights=False, init_from='scratch')  # .to('meta') unties shared parameters, .to('cuda') not
    model, args, _ = common.init_model('mlm', config, meta, data_dir, None)
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    sampler = common.TokenWindows(data_dir, 'train', 32, 2)
    sampler.next_step()
    path = str(tmp_path / 'ckpt.pt')
    common.save_checkpoint(path, common.training_checkpoint('mlm', model, optimizer, scaler, args, config, 3, 1.0,
                                                            sampler, meta, data_dir, 0.0))
    moved, _, ckpt = common.init_model('mlm', {**config, 'init_from': 'resume'}, meta, data_dir, path)
    moved.to('meta')
    assert next(moved.parameters()).device.type == 'meta'
    assert ckpt['rng'][0]['torch'].device.type == 'cpu' and ckpt['sampler']['generator'].device.type == 'cpu'
    resumed = common.TokenWindows(data_dir, 'train', 32, 2)
    optimizer = moved.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'meta')
    assert common.restore_training_state(ckpt, optimizer, scaler, resumed, 0, config) == (3, 1.0, 0.0)
    assert torch.equal(resumed.next_step()[0][0], sampler.next_step()[0][0])  # the sampler goes on


# ----------------------------------------------------------------------------------------------
# defect 2: the global batch at any world size


def test_the_global_batch_is_kept_at_any_world_size():
    for world in (1, 2, 4, 8, 16, 32, 64):
        accum, micro = common.split_global_batch(64, 8, world)
        assert accum * micro * world == 512, world
    assert common.split_global_batch(64, 8, 8) == (1, 64) and common.split_global_batch(64, 8, 2) == (4, 64)
    assert common.split_global_batch(64, 8, 16) == (1, 32)
    with pytest.raises(common.InputError, match='cannot be split evenly over 3 processes'):
        common.split_global_batch(64, 8, 3)


def test_more_processes_than_accumulation_steps_run_the_same_global_batch(data_dir, tmp_path):
    """2 processes with gradient_accumulation_steps=1 (once refused) each run half of the batch:
    the same training as 1 process with 2 micro-batches of that half."""
    import subprocess
    import sys
    common = [*TINY, f'--data_dir={data_dir}', '--max_iters=2', '--eval_interval=2']
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    run_script('train_mlm.py', *common, '--batch_size=4', '--gradient_accumulation_steps=2', f'--out_dir={single}')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(ROOT, 'train_mlm.py'), *common, '--batch_size=8',
                          '--gradient_accumulation_steps=1', f'--out_dir={ddp}'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert 'tokens per iteration: 512 (4 x 64 x 2)' in res.stdout
    a = torch.load(os.path.join(single, 'ckpt.pt'), weights_only=True)['model']
    b = torch.load(os.path.join(ddp, 'ckpt.pt'), weights_only=True)['model']
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# defect 3: no parameter that never runs (DDP without find_unused_parameters)


@pytest.mark.parametrize('layers', [dict(recursive_iters=1), dict(recursive_iters=2), dict(n_layer=1),
                                    dict(n_layer=2)])
def test_bixt_builds_no_parameter_that_a_step_leaves_unused(layers):
    torch.manual_seed(0)
    model = ConceptMLM(tiny_cfg(bixt=True, **layers))
    idx = torch.randint(5, 256, (2, 16))
    targets = torch.where(torch.rand(2, 16) < 0.5, idx, -100)
    targets[:, 0] = idx[:, 0]
    model(idx, targets)[1].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


# ----------------------------------------------------------------------------------------------
# defect 4: emulated bf16 is not bf16


def test_a_gpu_with_only_emulated_bf16_gets_float16_and_the_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert common.init_process('cuda', 'bfloat16')[5] == 'float16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert common.init_process('cuda', 'bfloat16')[5] == 'bfloat16'


# ----------------------------------------------------------------------------------------------
# defect 5: MPS has no float64


class NoFloat64(TorchDispatchMode):
    """Fails on any op that makes a float64 tensor, as MPS does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise TypeError(f"{func} made a float64 tensor")
        return out


def test_sampling_and_the_nll_bound_make_no_float64_tensor_on_mps(monkeypatch):
    assert model_module.widest_float(torch.device('mps')) == torch.float32
    assert model_module.widest_float('cpu') == torch.float64
    monkeypatch.setattr(model_module, 'widest_float', lambda device: torch.float32)  # as on MPS
    torch.manual_seed(0)
    model = ConceptDiffusion(tiny_cfg(n_dec_layer=1)).eval()
    idx = torch.randint(5, 256, (2, 24))
    g = torch.Generator().manual_seed(0)
    with NoFloat64():
        bound, n = model.nll_bound(idx, n_grid=2, generator=g)
        x = model.generate(torch.where(torch.arange(24) >= 8, 1, idx), steps=4, generator=g, top_k=5)
    assert bound > 0 and n > 0 and not (x == 1).any()


# ----------------------------------------------------------------------------------------------
# defect 6: peak FLOP/s by exact device name; the MFU window


@pytest.mark.parametrize('name, dtype, peak', [
    ('NVIDIA L40', 'bfloat16', 181e12), ('NVIDIA L4', 'bfloat16', 121e12), ('NVIDIA L40S', 'float32', 183e12),
    ('NVIDIA H200 NVL', 'bfloat16', 835e12), ('NVIDIA H200', 'bfloat16', 989e12),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 PCIe', 'float16', 756e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12), ('NVIDIA A10', 'bfloat16', 125e12),
    ('NVIDIA GeForce RTX 4090 Laptop GPU', 'bfloat16', None), ('NVIDIA B200', 'bfloat16', None)])
def test_gpu_peak_flops_matches_the_whole_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert common.peak_flops('cuda', dtype) == peak
    assert common.throughput([1, 1.0, 4e14], 1000, common.peak_flops('cuda', dtype)) == (
        '1,000 tok/s, mfu ' + ('n/a' if peak is None else f"{100 * 4e14 / peak:.1f}%"))


def test_the_cpu_gets_a_measured_peak_once():
    first = common.peak_flops('cpu', 'float32')
    assert first > 1e8  # a real machine does more than 0.1 GFLOP/s
    assert common.peak_flops('cpu', 'float32') == first  # cached: measured once per process and dtype
    common._cpu_peak.clear()
    state = torch.get_rng_state()
    common.peak_flops('cpu', 'float32')
    assert torch.equal(torch.get_rng_state(), state)  # measuring draws nothing from the global RNG
    assert common.peak_flops('mps', 'bfloat16') is None


def test_the_throughput_window_leaves_out_the_first_step_and_evaluation(data_dir, tmp_path):
    """The log line after the first step says n/a (compilation, warm-up); later lines count only the
    steps since the last line, never an evaluation between them."""
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=4',
                     '--eval_interval=2')
    lines = [line for line in res.stdout.splitlines() if line.startswith('iter ')]
    assert 'tok/s n/a (warm-up step)' in lines[0] and all(' tok/s, mfu ' in line for line in lines[1:]), lines
    assert common.throughput([2, 2.0, 200.0], 1000, 100.0) == '1,000 tok/s, mfu 100.0%'


# ----------------------------------------------------------------------------------------------
# defect 8: the math-SDPA precision flag stays within the CPU branch


def test_the_math_sdpa_precision_flag_is_set_only_inside_cpu_attention():
    default = model_module._MATH_SDP_REDUCTION_DEFAULT
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == default  # importing model set nothing
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == default
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:  # the CPU branch still runs the math kernel in bf16, as it is meant to
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(default)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------
# host synchronisations in a training step


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value (item, bool, int,
    float), data-dependent shapes (nonzero, boolean-mask indexing), and tensors made from host
    data (torch.tensor(list, device=...): a copy from pageable memory, synchronous on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ('aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.lift_fresh') or (
                name == 'aten.index' and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) if i is not None)):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('stage', ['mlm', 'tsdae', 'diffusion'])
def test_a_training_step_reads_the_device_twice(monkeypatch, stage):
    """One read for the shapes of the decoded positions (gather_and_pack), one for the optimizer's
    finite check; the stage's noise adds none. tolist() bypasses the op dispatcher on the CPU, so
    its calls are counted too."""
    tolist_calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda self: tolist_calls.append(1) or tolist(self))
    torch.manual_seed(0)
    cfg = tiny_cfg(concept_losses='vicreg,t_regs_mst', concept_loss_warmup=2, decoder='posonly' if stage == 'tsdae' else
                   'perceiver', pad_id=253, mask_id=254, eod_id=255)  # the specials on top, as prepare_data puts them
    model = ConceptDiffusion(cfg) if stage == 'diffusion' else ConceptMLM(cfg)
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    idx = torch.randint(0, 253, (4, 32))
    g = torch.Generator().manual_seed(0)
    counter = HostReads()
    with counter:
        if stage == 'diffusion':
            _, loss, stats = model(idx, generator=g, step=5)
        elif stage == 'tsdae':
            inputs, visible, targets = model.tsdae_noise(idx, g, 0.6)
            _, loss, stats = model(inputs, targets, visible, step=5)
        else:
            inputs, targets = model.mlm_noise(idx, g, 0.3)
            _, loss, stats = model(inputs, targets, step=5)
        loss.backward()
        grad_norm, _ = common.optimizer_step(optimizer, scaler, model.parameters(), stats['task_loss'], 1.0, 0, 3, 5,
                                             'ckpt.pt', None, 'float32')
    assert len(counter.reads) + len(tolist_calls) == 2, (counter.reads, len(tolist_calls))
    assert isinstance(grad_norm, torch.Tensor) and float(grad_norm) > 0


def test_gather_and_pack_equals_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    for B, N, p in ((5, 40, 0.3), (3, 17, 0.0), (4, 9, 1.0), (1, 1, 1.0)):
        select = torch.rand(B, N, generator=g) < p
        pos, valid, packing = model_module.gather_and_pack(select)
        assert torch.equal(packing.index, valid.flatten().nonzero().squeeze(1))
        x = torch.randn(B, pos.shape[1], 3, generator=g)
        assert torch.equal(packing.pack(x), x[valid])
        assert torch.equal(packing.unpack(packing.pack(x))[valid], x[valid])
        assert torch.equal(packing.rows(), valid.nonzero()[:, 0])


# ----------------------------------------------------------------------------------------------
# the next batch is prefetched; checkpoints keep the state before it


def test_a_prefetched_step_is_the_next_step_and_resume_draws_it_again(data_dir):
    plain = common.TokenWindows(data_dir, 'train', 32, 3, accum=2)
    fetching = common.TokenWindows(data_dir, 'train', 32, 3, accum=2)
    for _ in range(3):
        expected = plain.next_step()
        got = fetching.next_step()
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(expected, got))
        fetching.prefetch()
        state = fetching.state_dict()  # what a checkpoint taken now holds
        assert state['step'] == plain.state_dict()['step']
        assert torch.equal(state['generator'], plain.state_dict()['generator'])
    resumed = common.TokenWindows(data_dir, 'train', 32, 3, accum=2)
    resumed.load_state_dict(fetching.state_dict())
    nxt = plain.next_step()
    for a, b, c in zip(nxt, fetching.next_step(), resumed.next_step()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == b[1] == c[1]


# ----------------------------------------------------------------------------------------------
# compile: only the number of decoded positions is dynamic


def test_compile_marks_only_the_decoded_dimension_dynamic(monkeypatch):
    """torch.compile with a recording backend (dynamo's tracing and guards, no code generation):
    the decoder's and the loss's graphs take at most the symbols of M and M' (the batch, width and
    concept count stay constants), and batches with other M compile nothing new."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    symbols = []

    def recording_backend(gm, example_inputs):
        free = set()
        for node in gm.graph.nodes:
            value = node.meta.get('example_value')
            if node.op == 'placeholder' and isinstance(value, torch.Tensor):
                for d in value.shape:
                    if isinstance(d, torch.SymInt):
                        free |= d.node.expr.free_symbols
        symbols.append(free)
        return gm.forward

    real_compile = torch.compile

    def compile_recorded(fn=None, **kwargs):
        return real_compile(fn, backend=recording_backend, dynamic=kwargs.get('dynamic'))
    monkeypatch.setattr(torch, 'compile', compile_recorded)
    torch.manual_seed(0)
    model = ConceptDiffusion(tiny_cfg())
    model.compile_for_training('cpu')
    g = torch.Generator().manual_seed(0)
    n_graphs = []
    for _ in range(4):
        _, loss, stats = model(torch.randint(5, 256, (4, 48), generator=g), generator=g)
        loss.backward()
        n_graphs.append(len(symbols))
    torch._dynamo.reset()
    assert n_graphs[1] == n_graphs[-1], n_graphs  # nothing recompiled after the first step's M
    assert any(symbols) and all(len(s) <= 2 for s in symbols), symbols
    assert counters['frames']['ok'] > 0
