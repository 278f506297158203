"""What only a CUDA GPU can check: SDPA's fused kernels against the math kernel, packed against
padded decoding, exact resume, float16 with a GradScaler, compilation with a varying number of
decoded positions, host synchronisations in a step, and the peak memory of an h512l2 step.
Every test is skipped without CUDA; `make gpu-check` runs them with the rest of the GPU check."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import TINY, run_script
from model import ConceptConfig, ConceptDiffusion, ConceptMLM, Decoder, Packing, attention, gather_and_pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
DEVICE = 'cuda'


def h512l2(**kw):
    """The shape of config/h512l2.py."""
    args = dict(vocab_size=8192, block_size=512, n_layer=2, n_head=8, n_embd=512, n_concepts=128, ffn_size=1024,
                pad_id=8191, mask_id=8190, eod_id=8189)
    return ConceptConfig(**{**args, **kw})


def math_sdpa(q, k, v, mask=None):
    """The reference: SDPA's math kernel in float32."""
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('with_mask', [False, True])
@pytest.mark.parametrize('T, S', [(128, 512), (512, 128), (77, 2048)])
def test_sdpa_matches_the_math_kernel(dtype, with_mask, T, S):
    g = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(4, 8, T, 64, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(4, 8, S, 64, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(4, 8, S, 64, device=DEVICE, dtype=dtype, generator=g)
    mask = None
    if with_mask:
        mask = torch.rand(4, S, device=DEVICE, generator=g) < 0.7
        mask[:, 0] = True
    tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out.float(), math_sdpa(q, k, v, mask), atol=tol, rtol=tol)
    q.requires_grad_(True)
    attention(q, k, v, mask).float().sum().backward()  # the backward kernels run too
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize('kind', ['perceiver', 'posonly'])
def test_packed_decoding_equals_padded_decoding(kind):
    torch.manual_seed(0)
    cfg = h512l2(decoder=kind)
    decoder = Decoder(cfg).to(DEVICE)
    concepts = torch.randn(8, 128, 512, device=DEVICE)
    select = torch.rand(8, 512, device=DEVICE) < torch.linspace(0.05, 0.9, 8, device=DEVICE)[:, None]
    pos, valid, packing = gather_and_pack(select)
    tok = torch.randn(*pos.shape, 512, device=DEVICE) if kind == 'perceiver' else None
    padded = decoder(concepts, pos, tok)[valid]
    packed = decoder(concepts, pos, tok, packing=packing)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
    assert torch.equal(packing.index, Packing.of(valid).index)
    assert torch.equal(gather_and_pack(select)[0], pos)


def test_resume_on_cuda_continues_exactly(data_dir, tmp_path):
    """4 iterations straight against 2 + resume + 2, with dropout (the CUDA RNG state is restored).
    Atomic-add backward kernels (index_add of the packed decoder rows) may reorder float sums:
    a close match, not bit-for-bit."""
    common = [*TINY, f'--data_dir={data_dir}', '--device=cuda', '--lr_decay_iters=4', '--eval_interval=2',
              '--dropout=0.1']
    straight, halves = str(tmp_path / 'straight'), str(tmp_path / 'halves')
    run_script('train_mlm.py', *common, f'--out_dir={straight}', '--max_iters=4')
    run_script('train_mlm.py', *common, f'--out_dir={halves}', '--max_iters=2')
    out = run_script('train_mlm.py', *common, f'--out_dir={halves}', '--max_iters=4', '--init_from=resume')
    assert 'resumed from' in out.stdout
    a = torch.load(os.path.join(straight, 'ckpt.pt'), weights_only=True)['model']
    b = torch.load(os.path.join(halves, 'ckpt.pt'), weights_only=True)['model']
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_float16_with_a_grad_scaler_trains(data_dir, tmp_path):
    out = run_script('train_diffusion.py', *TINY, f'--data_dir={data_dir}', '--device=cuda', '--dtype=float16',
                     '--max_iters=30', '--eval_interval=30', f'--out_dir={tmp_path}')
    records = [r for r in map(__import__('json').loads, open(tmp_path / 'log.jsonl'))]
    assert records[-1]['iter'] == 30 and records[-1]['val_loss'] < records[0]['val_loss']
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['scaler'] is not None and ckpt['scaler']['scale'] > 0
    assert 'stopping' not in out.stderr


@pytest.mark.parametrize('stage', ['mlm', 'diffusion'])
def test_compiled_decoder_does_not_recompile_for_each_number_of_positions(stage):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = h512l2(n_dec_layer=2 if stage == 'diffusion' else 1)
    model = (ConceptDiffusion(cfg) if stage == 'diffusion' else ConceptMLM(cfg)).to(DEVICE)
    model.compile_for_training('cuda')
    g = torch.Generator(DEVICE).manual_seed(0)
    frames = []
    for step in range(6):
        idx = torch.randint(8000, (16, 512), device=DEVICE, generator=g)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            if stage == 'diffusion':
                _, loss, _ = model(idx, generator=g)
            else:  # a masking rate that changes M from step to step
                targets = torch.where(torch.rand(idx.shape, device=DEVICE, generator=g) < 0.1 + 0.05 * step, idx, -100)
                _, loss, _ = model(idx, targets)
        loss.backward()
        frames.append(counters['frames']['ok'])
    torch._dynamo.reset()
    assert frames[1] == frames[-1], f"compiled frames after each step: {frames}"


def test_a_training_step_synchronises_twice():
    """torch.cuda's sync debug mode warns at every synchronisation: a step has two (the shapes of
    the decoded positions, the optimizer's finite check)."""
    torch.manual_seed(0)
    model = ConceptDiffusion(h512l2(n_dec_layer=2)).to(DEVICE)
    optimizer = model.configure_optimizers(0.01, 3e-4, (0.9, 0.99), 'cuda')
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    idx = torch.randint(8000, (16, 512), device=DEVICE)
    g = torch.Generator(DEVICE).manual_seed(0)
    for warm in (True, False):  # the first step initialises the optimizer state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    _, loss, stats = model(idx, generator=g)
                loss.backward()
                common.optimizer_step(optimizer, scaler, model.parameters(), loss.detach(), 1.0, 0, 3, 0, 'x.pt', None,
                                      'bfloat16')
            finally:
                torch.cuda.set_sync_debug_mode('default')
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message)]
    assert len(syncs) <= 2, syncs


@pytest.mark.parametrize('batch', [64, 256])
def test_peak_memory_of_an_h512l2_diffusion_step(batch):
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    model = ConceptDiffusion(h512l2(n_dec_layer=2, dropout=0.1)).to(DEVICE)
    optimizer = model.configure_optimizers(0.01, 3e-4, (0.9, 0.99), 'cuda')
    idx = torch.randint(8000, (batch, 512), device=DEVICE)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.max_memory_allocated()
    for _ in range(2):  # the second step holds the optimizer state too
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss, _ = model(idx, generator=torch.Generator(DEVICE).manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    print(f"\nh512l2 diffusion step, batch {batch} x 512, bf16: peak {peak / 2**30:.2f} GiB "
          f"of {total / 2**30:.0f} GiB ({torch.cuda.get_device_name()})")
    assert peak < 0.8 * total
    # activations are linear in the batch: 256 sequences need at most ~4x the memory of 64
    limit = {64: 12, 256: 40}[batch] * 2**30
    assert peak < limit, f"{peak / 2**30:.1f} GiB"
