"""Concept geometry: regularisers, their weighting and the collapse diagnostics, on constructed
inputs whose answers are known."""
import math

import pytest
import torch

import model
from model import (CONCEPT_LOSSES, ConceptLossWeighting, concept_diagnostics,
                      concept_reg_losses, covariance_loss, parse_concept_losses, variance_loss)

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
@pytest.mark.parametrize('pooled', [False, True])
def test_each_regulariser_passes_gradient(name, pooled):
    c = random_concepts().requires_grad_()
    loss = concept_reg_losses(c, [name], pooled=pooled)[name]
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_regularisers_are_float32_and_finite_in_bfloat16():
    c = random_concepts().bfloat16()
    for name, loss in concept_reg_losses(c, list(CONCEPT_LOSSES)).items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        ref = CONCEPT_LOSSES[name](c.float()).item()
        assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6), name


def test_pooled_variance_misses_within_sample_collapse():
    """The original's failure mode: samples differ, but each sample's concepts are identical."""
    c = identical(B=256, C=8, H=16)
    assert variance_loss(c, pooled=True).item() < 0.1        # pooled statistics look healthy
    assert variance_loss(c).item() > 0.98                    # within-sample: fully penalised
    assert covariance_loss(c).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('shape', [(3, 5, 16), (3, 16, 5), (2, 7, 7)])
def test_covariance_matches_the_direct_formula(shape):
    """Both the Gram (C < H) and the covariance (C >= H) routes equal Σ_{d≠e} Cov_de² / H."""
    c = random_concepts(*shape).double() * 2 + 1
    for pooled in (False, True):
        x = c.reshape(1, -1, shape[-1]) if pooled else c
        xc = x - x.mean(1, keepdim=True)
        cov = xc.transpose(1, 2) @ xc / (x.shape[1] - 1)
        off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        ref = (off.pow(2).sum((1, 2)) / shape[-1]).mean()
        assert covariance_loss(c, pooled=pooled).item() == pytest.approx(ref.item(), rel=1e-4)


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

def losses(task=2.5, regs=(0.3, 0.1)):
    names = ['vicreg', 't_regs_mst'][:len(regs)]
    return names, torch.tensor(task), {n: torch.tensor(v) for n, v in zip(names, regs)}


def test_fixed_weighting_and_warmup():
    names, task, regs = losses()
    w = ConceptLossWeighting(names, 'fixed', weight=0.02, warmup_iters=100)
    assert list(w.parameters()) == []
    full = 2.5 + 0.01 * (0.3 + 0.1)
    for step, warm in ((0, 0.0), (50, 0.5), (100, 1.0), (1000, 1.0)):
        total, info = w(task, regs, step)
        assert total.item() == pytest.approx(2.5 + warm * (full - 2.5), rel=1e-6)
        assert info['warm'] == warm and info['w_vicreg'] == pytest.approx(0.01 * warm)
        assert info['vicreg'] == pytest.approx(0.3) and info['w_task'] == 1.0
    no_warmup = ConceptLossWeighting(names, 'fixed', weight=0.02, warmup_iters=0)
    assert no_warmup(task, regs, 0)[0].item() == pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize('strategy', ['learnable', 'kendall_gal'])
def test_warmup_gates_learned_weightings(strategy):
    names, task, regs = losses()
    w = ConceptLossWeighting(names, strategy, warmup_iters=10)
    total, info = w(task, regs, 0)  # warm = 0: the task alone, the regulariser weights do not learn
    expected = 2.5 if strategy == 'learnable' else 0.5 * 2.5
    assert total.item() == pytest.approx(expected) and info['w_vicreg'] == 0.0
    total.backward()
    grad = next(w.parameters()).grad
    assert torch.isfinite(grad).all() and (grad[1:] == 0).all()
    half, _ = w(task, regs, 5)
    full, _ = w(task, regs, 10)
    if strategy == 'kendall_gal':  # at s = 0: each term is 0.5·L, scaled by warm for the regs
        assert half.item() == pytest.approx(0.5 * 2.5 + 0.5 * 0.5 * 0.4)
        assert full.item() == pytest.approx(0.5 * (2.5 + 0.4))
    else:  # softmax of (0, log 0.5, log 0.5) = (0.5, 0.25, 0.25)
        assert half.item() == pytest.approx(0.5 * 2.5 + 0.25 * 0.4)
        assert full.item() == pytest.approx((2.5 + 0.4) / 3)


def test_learned_weights_are_float32_vectors():
    for strategy in ('learnable', 'kendall_gal'):
        w = ConceptLossWeighting(['vicreg'], strategy)
        assert all(p.dim() == 1 and p.dtype == torch.float32 for p in w.parameters())
    names, task, regs = losses()
    w = ConceptLossWeighting(names, 'kendall_gal')
    total, _ = w(task.bfloat16(), {k: v.bfloat16() for k, v in regs.items()}, 0)
    assert total.dtype == torch.float32


def test_kendall_gal_respects_its_clamp(monkeypatch):
    names, task, regs = losses()
    assert model.S_BOUND == 5.0 and model.MAX_REG_RATIO == 1.0
    w = ConceptLossWeighting(names, 'kendall_gal')
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([1e3, -1e3, 1e3]))  # task muted, one regulariser inflated
    s = w.log_variances()
    assert s[0].item() == pytest.approx(5.0) and s[2].item() == pytest.approx(5.0)  # the box
    assert s[1].item() == pytest.approx(5.0)  # capped at the task's: never heavier than the task
    total, info = w(task, regs, 0)
    assert info['w_task'] == pytest.approx(0.5 * math.exp(-5.0))  # the task's weight floor
    assert info['w_vicreg'] <= info['w_task'] * (1 + 1e-6)
    assert math.isfinite(total.item())
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, -1e3, 2.0]))
    s = w.log_variances()
    assert s[1].item() == pytest.approx(0.0)  # at the cap (s_task) rather than at the box's -5
    assert s[2].item() == pytest.approx(5 * math.tanh(2 / 5))  # lighter than the task: untouched
    monkeypatch.setattr(model, 'MAX_REG_RATIO', 2.0)
    ratio2 = ConceptLossWeighting(names, 'kendall_gal')
    with torch.no_grad():
        ratio2.log_var.copy_(torch.tensor([0.0, -4.0, 0.0]))
    _, info = ratio2(task, regs, 0)
    assert info['w_vicreg'] == pytest.approx(2.0 * info['w_task'])


def test_kendall_gal_cannot_lower_the_total_by_shrinking_the_task_weight():
    names, task, regs = losses(task=2.5, regs=(1e-4, 1e-4))  # nearly solved regularisers
    w = ConceptLossWeighting(names, 'kendall_gal')
    totals = []
    for raw in torch.linspace(math.log(2.5), 40.0, 50):  # from the task's optimum to "muted"
        with torch.no_grad():
            w.log_var.copy_(torch.tensor([raw.item(), -40.0, -40.0]))  # regularisers want max weight
        totals.append(w(task, regs, 0)[0].item())
    assert all(b >= a - 1e-6 for a, b in zip(totals, totals[1:]))  # nondecreasing as w_task shrinks

    # the original's failure, replayed: with losses fixed, optimise the weights
    w = ConceptLossWeighting(names, 'kendall_gal')
    opt = torch.optim.Adam(w.parameters(), lr=0.1)
    for step in range(500):
        opt.zero_grad()
        total, info = w(task, regs, step)
        total.backward()
        opt.step()
    assert info['w_task'] == pytest.approx(0.5 / 2.5, rel=0.05)  # the task's own optimum, 0.5/L
    assert info['w_vicreg'] <= info['w_task'] * (1 + 1e-6) and info['w_t_regs_mst'] <= info['w_task'] * (1 + 1e-6)
    assert total.item() > -3 * 5.0 / 2  # bounded below by -(K+1)·s_bound/2


def test_weighting_rejects_unknown_strategy_and_handles_no_regularisers():
    with pytest.raises(ValueError, match='kendall_gal'):
        ConceptLossWeighting(['vicreg'], 'uncertainty')
    for strategy in ConceptLossWeighting.STRATEGIES:
        total, info = ConceptLossWeighting([], strategy)(torch.tensor(1.5), {}, 0)
        assert total.item() == 1.5 and info['w_task'] == 1.0
