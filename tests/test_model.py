"""model.py: the encoder variants, the MLM decoders, sparse decoding, padding, and cost in N."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import model as model_module
from model import ConceptConfig, ConceptMLM, Packing, gather_and_pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = list(itertools.product(['perceiver', 'posonly'], [False, True], [0, 3]))


def tiny_cfg(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, n_concepts=8, ffn_size=64,
                n_dec_layer=1, pad_id=96, mask_id=95)
    base.update(kw)
    return ConceptConfig(**base)


def random_batch(B=4, N=40, vocab=95, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(vocab, (B, N), generator=g)
    targets = torch.where(torch.rand(B, N, generator=g) < p, idx, -100)
    return idx, targets


@pytest.mark.parametrize('decoder,bixt,recursive', VARIANTS)
def test_sparse_loss_equals_dense_cross_entropy(decoder, bixt, recursive):
    torch.manual_seed(0)
    model = ConceptMLM(tiny_cfg(decoder=decoder, bixt=bixt, recursive_iters=recursive)).eval()
    idx, targets = random_batch()
    _, sparse_loss, stats = model(idx, targets)
    logits, _, _ = model(idx)  # (B, N, V) at every position
    dense_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert stats['n_pred'] == int((targets != -100).sum())
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_logits_and_ce_equals_cross_entropy(label_smoothing):
    """The loss head picks the label's logit by comparison, not gather: same values and same
    gradients (to the hidden states and the tied embedding) as F.cross_entropy."""
    torch.manual_seed(0)
    model = ConceptMLM(tiny_cfg())
    h = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(97, (50,))
    results = []
    for reference in (False, True):
        model.zero_grad()
        h.grad = None
        if reference:
            logits = model.lm_head(h)
            ce = F.cross_entropy(logits, labels, reduction='none', label_smoothing=label_smoothing)
        else:
            logits, ce = model.logits_and_ce(h, labels, label_smoothing)
            assert not logits.requires_grad  # detached: no (M, V) zero gradient in the backward
        (ce * torch.linspace(0.5, 1.5, 50)).sum().backward()
        results.append((logits.detach(), ce.detach(), h.grad, model.lm_head.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('decoder,bixt,recursive', VARIANTS)
def test_every_variant_learns(decoder, bixt, recursive):
    """forward + backward, and the loss falls when fitting a small fixed batch."""
    torch.manual_seed(0)
    model = ConceptMLM(tiny_cfg(decoder=decoder, bixt=bixt, recursive_iters=recursive))
    idx, targets = random_batch(B=8, N=32, vocab=20, p=0.25)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), 'cpu')
    losses = []
    for _ in range(60):
        _, loss, _ = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if 'wpe' not in n and 'mix' not in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize('bixt,recursive', [(False, 0), (True, 0), (False, 2)])
def test_padding_changes_nothing(bixt, recursive):
    """Appending masked padding of any content leaves the concepts and the loss unchanged."""
    torch.manual_seed(0)
    model = ConceptMLM(tiny_cfg(bixt=bixt, recursive_iters=recursive)).eval()
    idx, targets = random_batch(B=3, N=30)
    mask = torch.ones_like(idx, dtype=torch.bool)
    pad = torch.randint(95, (3, 17))
    idx_p = torch.cat([idx, pad], 1)
    mask_p = torch.cat([mask, torch.zeros_like(pad, dtype=torch.bool)], 1)
    targets_p = torch.cat([targets, torch.full_like(pad, -100)], 1)
    torch.testing.assert_close(model.encoder(idx, mask), model.encoder(idx_p, mask_p), rtol=1e-5, atol=1e-5)
    _, loss, _ = model(idx, targets, mask)
    _, loss_p, _ = model(idx_p, targets_p, mask_p)
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-5)


def test_hidden_tokens_are_invisible():
    """A token hidden by attn_mask cannot influence the concepts, whatever its id."""
    torch.manual_seed(0)
    for bixt in (False, True):
        model = ConceptMLM(tiny_cfg(bixt=bixt)).eval()
        idx, _ = random_batch(B=2, N=20)
        mask = torch.ones_like(idx, dtype=torch.bool)
        mask[:, 5] = False
        other = idx.clone()
        other[:, 5] = (idx[:, 5] + 1) % 95
        torch.testing.assert_close(model.encoder(idx, mask), model.encoder(other, mask))
        assert not torch.allclose(model.encoder(idx), model.encoder(other))


def test_recursive_iterations_overridable_and_shared():
    model = ConceptMLM(tiny_cfg(recursive_iters=3))
    assert len(model.encoder.layers) == 1
    idx, _ = random_batch(B=2, N=16)
    assert not torch.allclose(model.encoder(idx, n_iters=1), model.encoder(idx, n_iters=5))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_both_attention_kernels_agree_with_a_key_mask(monkeypatch, dtype):
    """attention() sends attentions with a short side to SDPA's math kernel on the CPU in
    training, and everything else to the flash kernel: both must give the same result and the
    same gradients, masks included."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 16, generator=g).to(dtype) for T in (8, 40, 40))
    key_mask = torch.rand(2, 40, generator=g) < 0.7
    results = []
    for threshold in (0, 10**9):  # 0: always flash; 10**9: always math
        monkeypatch.setattr(model_module, 'SHORT_SIDE', threshold)
        calls = []
        monkeypatch.setattr(model_module, 'sdpa_kernel', lambda backend: calls.append(backend) or sdpa_kernel(backend))
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        y = model_module.attention(qq, kk, vv, key_mask)
        y.float().pow(2).sum().backward()
        results.append([y, qq.grad, kk.grad, vv.grad])
        assert calls == ([] if threshold == 0 else [SDPBackend.MATH])  # the kernel the threshold picks
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for flash, math_ in zip(*results):
        torch.testing.assert_close(flash.float(), math_.float(), **tol)
    for (_, _, k_grad, _), b in itertools.product(results, range(2)):  # masked keys get no gradient, both kernels
        assert k_grad[b][:, ~key_mask[b]].abs().max() == 0


def test_gather_and_pack_layout():
    select = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pos, valid, _ = gather_and_pack(select)
    assert pos.tolist()[0] == [1, 3, 4] and pos.tolist()[1][0] == 0
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_no_targets_gives_zero_loss_with_graph():
    model = ConceptMLM(tiny_cfg())
    idx, _ = random_batch(B=2, N=10)
    _, loss, stats = model(idx, torch.full_like(idx, -100))
    assert loss.item() == 0.0 and loss.requires_grad and stats['n_pred'] == 0


def test_unknown_decoder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown decoder 'perciever'.*perceiver, posonly"):
        ConceptMLM(tiny_cfg(decoder='perciever'))


def test_tied_lm_head_and_weight_decay_groups():
    model = ConceptMLM(tiny_cfg())
    assert model.lm_head.weight is model.encoder.wte.weight
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert opt.defaults['fused']  # one pass per tensor on the CPU too
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g['params'])
    assert n_opt == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('bixt', [False, True])
def test_flops_are_linear_in_sequence_length(bixt):
    model = ConceptMLM(tiny_cfg(bixt=bixt))
    f = [model.encoder_flops(n) for n in (1000, 2000, 3000)]
    assert f[2] - f[1] == pytest.approx(f[1] - f[0])
    assert model.estimate_flops(1, 100, 15) == 3 * (model.encoder_flops(100) + model.decoder_flops(15))
    assert model.estimate_flops(4, 100, 60) == 4 * model.estimate_flops(1, 100, 15)


@pytest.mark.parametrize('decoder', ['perceiver', 'posonly'])
def test_no_parameter_grows_with_the_sequence_length(decoder):
    """Positions are fixed sinusoids with a gain per channel: a model sized for 32,768 tokens has the
    parameters of one sized for 64, and a model trained on 64-token windows reads 300 tokens."""
    torch.manual_seed(0)
    short, long = ConceptMLM(tiny_cfg(decoder=decoder)), ConceptMLM(tiny_cfg(decoder=decoder, block_size=32768))
    assert short.get_num_params() == long.get_num_params() == sum(p.numel() for p in short.parameters())
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in long.state_dict().items()}
    idx, targets = random_batch(N=300)
    _, loss, _ = short.eval()(idx, targets)
    assert torch.isfinite(loss)


def test_positions_are_sinusoids_that_tell_every_position_apart():
    from model import sinusoids
    f = sinusoids(torch.arange(131072), 32)  # (N, 32)
    assert f.shape == (131072, 32) and f.abs().max() <= 1.0
    torch.testing.assert_close(f[:, :16] ** 2 + f[:, 16:] ** 2, torch.ones(131072, 16))
    near = torch.cdist(f[:4096], f[:4096]) + torch.eye(4096) * 10  # distinct codes, none within 1e-3 of another
    assert near.min() > 1e-3


@pytest.mark.parametrize('bixt', [False, True])
def test_32k_tokens_fit_in_linear_memory(bixt):
    """One N x N float32 matrix at N=32,768 is 4 GiB; the whole forward must stay far below."""
    code = f"""
import resource, torch
from model import ConceptConfig, ConceptMLM
torch.manual_seed(0)
cfg = ConceptConfig(vocab_size=512, block_size=32768, n_layer=2, n_head=4, n_embd=128, n_concepts=64,
                    ffn_size=256, bixt={bixt})
model = ConceptMLM(cfg).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx = torch.randint(500, (1, 32768))
targets = torch.where(torch.rand(1, 32768) < 0.15, idx, -100)
with torch.no_grad():
    _, loss, _ = model(idx, targets)
assert torch.isfinite(loss)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 1024, f"forward over 32k tokens grew RSS by {peak_mb:.0f} MB"


@pytest.mark.parametrize('decoder', ['perceiver', 'posonly'])
def test_packed_decoder_traces_as_one_graph(decoder):
    """Packing indexes with a precomputed index, not the boolean mask, so the compiled decoder
    has no data-dependent shapes: no graph break (a mask here cost failed compile attempts)."""
    torch._dynamo.reset()
    model = ConceptMLM(tiny_cfg(decoder=decoder))
    idx, targets = random_batch()
    pos, valid, _ = gather_and_pack(targets != -100)
    concepts = model.encoder(idx)
    tok = model.encoder.wte(torch.gather(idx, 1, pos)) if decoder == 'perceiver' else None
    explanation = torch._dynamo.explain(model.decoder)(concepts, pos, tok, None, None, Packing.of(valid))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(model.decoder(concepts, pos, tok, packing=Packing.of(valid)),
                               model.decoder(concepts, pos, tok)[valid])


def test_compiled_training_step_equals_eager_and_keeps_the_math_kernel():
    """compile_for_training (encoder static; decoder and loss dynamic in M) gives eager's loss
    and gradients for batches with different numbers of masked positions, and on the CPU no
    attention of the step runs in the flash kernel (inductor's pattern matcher, which would
    put it back, is off)."""
    torch.manual_seed(0)
    eager = ConceptMLM(tiny_cfg(decoder='perceiver'))
    compiled = ConceptMLM(tiny_cfg(decoder='perceiver'))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_for_training('cpu')
    for seed, p in ((0, 0.3), (1, 0.15)):  # two values of M, one compiled (dynamic) graph
        idx, targets = random_batch(B=4, N=40, p=p, seed=seed)
        losses = []
        for m in (eager, compiled):
            m.zero_grad()
            with torch.profiler.profile() as prof:
                _, loss, _ = m(idx, targets)
                loss.backward()
            losses.append(loss)
            if m is compiled:
                assert not [e.name for e in prof.events() if 'flash_attention' in e.name]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
