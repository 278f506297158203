"""Concept geometry: regularisers, their weighting and the collapse diagnostics, on constructed
inputs whose answers are known."""
import math

import pytest
import torch

from model import (CONCEPT_LOSSES, ConceptConfig, ConceptMLM, concept_diagnostics, covariance_loss,
                   parse_concept_losses, variance_loss)

B, C, H = 4, 8, 8


def identical(B=B, C=C, H=H, seed=0):
    """Every concept of a sample is the same vector (a different one per sample): full collapse."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, H, generator=g).expand(B, C, H).contiguous()


def orthogonal(B=B, C=C, H=H, seed=0, scale=None):
    """Each sample's concepts are orthogonal rows (a random rotation per sample), of norm sqrt(C)
    by default so that each dimension's std over the concepts is 1 (VICReg's target)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(B, H, H, generator=g)).Q[:, :C, :]  # (B, C, H) orthonormal rows
    return q * (math.sqrt(C) if scale is None else scale)


def random_concepts(B=B, C=C, H=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, generator=g)


# --- regularisers

def test_identical_concepts_get_the_highest_penalty():
    same, orth, rand = identical(), orthogonal(), random_concepts()
    for name, fn in CONCEPT_LOSSES.items():
        if name == 'covariance':  # identical concepts have no variance, hence no covariance
            assert fn(same).item() == pytest.approx(0.0, abs=1e-6)
            continue
        top = fn(same).item()
        assert top > fn(orth).item() + 1e-3, name
        if name not in ('vicreg',):  # random concepts with C = H pay VICReg's covariance term
            assert top > fn(rand).item() + 1e-3, name
    assert CONCEPT_LOSSES['orthogonality'](same).item() == pytest.approx(1.0, abs=1e-5)
    assert CONCEPT_LOSSES['uniformity'](same).item() == pytest.approx(1.0, abs=1e-5)
    assert CONCEPT_LOSSES['variance'](same).item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-5)
    assert CONCEPT_LOSSES['t_regs_mst'](same).item() == pytest.approx(0.0, abs=1e-3)


def test_orthonormal_concepts_give_zero_orthogonality_loss():
    for scale in (1.0, 3.0):
        orth = orthogonal(scale=scale)
        assert CONCEPT_LOSSES['orthogonality'](orth).item() == pytest.approx(0.0, abs=1e-10)
        assert CONCEPT_LOSSES['soft_orthogonality'](orth).item() == pytest.approx(0.0, abs=1e-10)
        assert CONCEPT_LOSSES['uniformity'](orth).item() == pytest.approx(math.exp(-4.0), rel=1e-4)
        assert CONCEPT_LOSSES['t_regs_mst'](orth).item() == pytest.approx(-math.sqrt(2.0), rel=1e-4)
    one_hot = torch.eye(C).expand(B, C, C) * math.sqrt(C)  # each dimension's std over the concepts is 1
    assert variance_loss(one_hot).item() == 0.0


@pytest.mark.parametrize('name', list(CONCEPT_LOSSES))
def test_each_regulariser_passes_gradient(name):
    c = random_concepts().requires_grad_()
    loss = CONCEPT_LOSSES[name](c)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_regularisers_are_float32_and_finite_in_bfloat16():
    c = random_concepts().bfloat16()
    for name in CONCEPT_LOSSES:
        loss = CONCEPT_LOSSES[name](c)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        ref = CONCEPT_LOSSES[name](c.float()).item()
        assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6), name


def test_variance_sees_within_sample_collapse():
    """The original's failure mode: samples differ, but each sample's concepts are identical (batch-pooled
    statistics looked healthy there)."""
    c = identical(B=256, C=8, H=16)
    assert variance_loss(c).item() > 0.98                    # within-sample: fully penalised
    assert covariance_loss(c).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('shape', [(3, 5, 16), (3, 16, 5), (2, 7, 7)])
def test_covariance_matches_the_direct_formula(shape):
    """Both the Gram (C < H) and the covariance (C >= H) routes equal Σ_{d≠e} Cov_de² / H."""
    c = random_concepts(*shape).double() * 2 + 1
    xc = c - c.mean(1, keepdim=True)
    cov = xc.transpose(1, 2) @ xc / (c.shape[1] - 1)
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    ref = (off.pow(2).sum((1, 2)) / shape[-1]).mean()
    assert covariance_loss(c).item() == pytest.approx(ref.item(), rel=1e-4)


def test_parse_concept_losses():
    assert parse_concept_losses('vicreg,t_regs_mst') == ['vicreg', 't_regs_mst']
    assert parse_concept_losses(' vicreg , t_regs_mst ') == ['vicreg', 't_regs_mst']
    assert parse_concept_losses('') == [] and parse_concept_losses('none') == []
    with pytest.raises(ValueError, match='vicreg.*t_regs_mst'):  # names the valid choices
        parse_concept_losses('vicreg,mst')
    with pytest.raises(ValueError, match="'mst'"):
        parse_concept_losses('mst')
    with pytest.raises(ValueError, match='twice'):
        parse_concept_losses('vicreg,vicreg')


def test_minimising_vicreg_raises_erank():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 1, 16, generator=g)
    c = (base + 0.05 * torch.randn(4, 8, 16, generator=g)).requires_grad_()  # nearly collapsed
    before = concept_diagnostics(c)['erank']
    opt = torch.optim.Adam([c], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        CONCEPT_LOSSES['vicreg'](c).backward()
        opt.step()
    after = concept_diagnostics(c)['erank']
    assert before < 2.0 and after > before + 2.0, (before, after)


# --- diagnostics

KEYS = {'erank', 'erank_batchmean', 'concept_cos_mean', 'concept_cos_max', 'participation_ratio'}


def test_diagnostics_keys_and_extremes():
    d = concept_diagnostics(identical())
    assert set(d) == KEYS and all(type(v) is float for v in d.values())
    assert d['erank'] == pytest.approx(1.0, abs=1e-3)
    assert d['participation_ratio'] == pytest.approx(1.0, abs=1e-3)
    assert d['concept_cos_mean'] == pytest.approx(1.0, abs=1e-5)
    assert d['concept_cos_max'] == pytest.approx(1.0, abs=1e-5)

    d = concept_diagnostics(orthogonal())
    assert d['erank'] == pytest.approx(C, rel=1e-4)
    assert d['participation_ratio'] == pytest.approx(C, rel=1e-4)
    assert d['concept_cos_mean'] == pytest.approx(0.0, abs=1e-5)
    assert d['concept_cos_max'] == pytest.approx(0.0, abs=1e-5)

    same_every_sample = orthogonal(B=1).expand(3, C, H)  # batch mean = each sample
    assert concept_diagnostics(same_every_sample)['erank_batchmean'] == pytest.approx(C, rel=1e-4)
    # diverse concepts, but the sign of each sample's set is random: the batch mean cancels out
    # partly, so the original's batch-mean ratio reads lower than the per-sample erank
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None]
    d = concept_diagnostics(orthogonal(B=1).expand(4, C, H) * signs + 0.01 * random_concepts())
    assert d['erank'] > C - 0.1 and d['erank_batchmean'] < d['erank']


def test_diagnostics_do_not_track_gradient_and_average():
    import common
    c = random_concepts().bfloat16().requires_grad_()
    saved = []  # tensors autograd keeps for a backward pass: none may be, for a diagnostic
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        d1 = concept_diagnostics(c)
    assert not saved
    d2 = concept_diagnostics(identical())
    assert 1.0 < d1['erank'] <= C
    avg = common.mean_diagnostics([d1, d2])
    assert set(avg) == KEYS and avg['erank'] == pytest.approx((d1['erank'] + d2['erank']) / 2)
    assert common.mean_diagnostics([]) == {}


# --- weighting

def test_fixed_weighting_and_warmup():
    """task + warm·(weight / K)·Σ L_k, warm ramping 0 -> 1 over concept_loss_warmup; evaluation: the task alone."""
    torch.manual_seed(0)
    m = ConceptMLM(ConceptConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16, n_concepts=4,
                                 ffn_size=32, concept_losses='vicreg,t_regs_mst', concept_loss_weight=0.02,
                                 concept_loss_warmup=100, pad_id=96, mask_id=95))
    c = random_concepts(2, 4, 16)
    regs = CONCEPT_LOSSES['vicreg'](c).item() + CONCEPT_LOSSES['t_regs_mst'](c).item()
    task = torch.tensor(2.5)
    for step, warm in ((0, 0.0), (50, 0.5), (100, 1.0), (1000, 1.0)):
        stats = {}
        total = m.add_concept_losses(task, c, step, stats)
        assert total.item() == pytest.approx(2.5 + warm * 0.01 * regs, rel=1e-6) and stats['task_loss'].item() == 2.5
    assert m.eval().add_concept_losses(task, c, 1000, {}) is task
