"""The standard-encoder arm (encoder='standard') and time-budgeted runs (max_minutes)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, read_log, run_script
from model import ConceptConfig, ConceptDiffusion, ConceptMLM


def cfg(**kw):
    base = dict(encoder='standard', vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, n_concepts=8,
                ffn_size=64, pad_id=96, mask_id=95, eod_id=94)
    base.update(kw)
    return ConceptConfig(**base)


def batch(B=3, N=30, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(94, (B, N), generator=g)
    return idx, torch.where(torch.rand(B, N, generator=g) < p, idx, -100)


def test_standard_mlm_sparse_loss_equals_dense_cross_entropy():
    torch.manual_seed(0)
    model = ConceptMLM(cfg()).eval()
    idx, targets = batch()
    _, sparse, stats = model(idx, targets)
    logits, _, _ = model(idx)  # (B, N, V): the lm_head on every token state
    dense = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert 'concepts' not in stats and model.decoder is None


def test_standard_padding_changes_nothing_and_hidden_tokens_are_invisible():
    torch.manual_seed(0)
    model = ConceptMLM(cfg()).eval()
    idx, targets = batch()
    mask = torch.ones_like(idx, dtype=torch.bool)
    pad = torch.randint(94, (3, 17))
    idx_p, mask_p = torch.cat([idx, pad], 1), torch.cat([mask, torch.zeros_like(pad, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.encoder(idx, mask), model.encoder(idx_p, mask_p)[:, :30], rtol=1e-5, atol=1e-5)
    _, loss, _ = model(idx, targets, mask)
    _, loss_p, _ = model(idx_p, torch.cat([targets, torch.full_like(pad, -100)], 1), mask_p)
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-5)
    # a hidden token changes no state, not even at its own position (TSDAE's deletion)
    mask[:, 5] = False
    other = idx.clone()
    other[:, 5] = (idx[:, 5] + 1) % 94
    torch.testing.assert_close(model.encoder(idx, mask), model.encoder(other, mask))
    assert not torch.allclose(model.encoder(idx), model.encoder(other))


def test_standard_arm_attends_across_tokens_and_costs_quadratic_flops():
    """Tokens see each other (unlike the concept arm's static tokens): changing one token changes
    the states elsewhere; and its FLOPs grow with N², the concept arm's linearly."""
    torch.manual_seed(0)
    model = ConceptMLM(cfg()).eval()
    idx, _ = batch(B=1)
    other = idx.clone()
    other[0, 0] = (idx[0, 0] + 1) % 94
    assert not torch.allclose(model.encoder(idx)[0, 10], model.encoder(other)[0, 10])
    f = [model.encoder_flops(n) for n in (64, 128, 256)]
    assert f[2] - 2 * f[1] == pytest.approx(4 * (f[1] - 2 * f[0]))  # the N² term quadruples
    concept = ConceptMLM(cfg(encoder='concept'))
    c = [concept.encoder_flops(n) for n in (64, 128, 256)]
    assert c[2] - c[1] == pytest.approx(2 * (c[1] - c[0]))


@pytest.mark.parametrize('kw,word', [(dict(bixt=True), 'bixt'), (dict(recursive_iters=2), 'recursive_iters'),
                                     (dict(concept_losses='vicreg'), 'concept_losses'), (dict(encoder='concpet'), 'concpet')])
def test_settings_that_need_concepts_are_refused(kw, word):
    with pytest.raises(ValueError, match=word):
        ConceptMLM(cfg(**kw))


def test_standard_denoiser_is_time_conditioned_starts_as_identity_and_samples():
    torch.manual_seed(0)
    model = ConceptDiffusion(cfg())
    assert model.decoder is None and model.encoder.time_emb is not None
    layers = model.encoder.layers
    assert all(l.time_cond and torch.count_nonzero(l.adaLN.weight) == 0 for l in layers)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(layers[0](x, cond=torch.randn(2, 32)), x)  # AdaLN-Zero: the identity at init
    idx, _ = batch(B=2)
    _, loss, stats = model(idx, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and 'concepts' not in stats
    assert model.encoder.layers[0].adaLN.weight.grad is not None  # t reaches every layer
    x = idx.clone()
    x[:, 10:] = 95
    out = model.generate(x, steps=4, generator=torch.Generator().manual_seed(0))
    assert not (out == 95).any() and torch.equal(out[:, :10], idx[:, :10])
    bound, n = model.eval().nll_bound(idx, n_grid=2, generator=torch.Generator().manual_seed(0))
    # encoding without a noise level reads clean text (t = 0): the embeddings eval_glue pools
    torch.testing.assert_close(model.encoder(idx), model.encoder(idx, t=torch.zeros(2)))
    assert bound > 0 and n == idx.numel()
    with pytest.raises(ValueError, match='clean'):
        ConceptDiffusion(cfg(condition='clean'))
    with pytest.raises(ValueError, match='has no concepts: local_window apply to the concept arm only'):
        ConceptDiffusion(cfg(local_window=2))


# --- the stages with encoder='standard'

def test_mlm_stage_refuses_a_decoder_that_cannot_apply(data_dir, tmp_path):
    out = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=1',
                     '--encoder=standard', '--decoder=posonly', check=False)
    assert out.returncode != 0 and 'Traceback' not in out.stderr
    assert "decoder='posonly' applies to the concept arm only" in out.stderr


def test_tsdae_stage_refuses_drop_mode_and_learns_in_hide_mode(data_dir, tmp_path):
    out = run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "d"}', '--max_iters=1',
                     '--encoder=standard', '--deletion_mode=drop', check=False)
    assert out.returncode != 0 and "deletion_mode='hide'" in out.stderr and 'Traceback' not in out.stderr
    run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "h"}', '--max_iters=40',
               '--eval_interval=40', '--encoder=standard')
    first, last = read_log(str(tmp_path / 'h'))
    assert last['val_loss'] < first['val_loss'] - 0.5 and 'erank' not in last


def test_standard_checkpoints_record_the_arm_and_evaluate(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    run_script('train_diffusion.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4',
               '--eval_interval=4', '--encoder=standard')
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['model_args']['encoder'] == 'standard' and ckpt['config']['encoder'] == 'standard'
    assert json.load(open(os.path.join(out, 'run.json')))['config']['encoder'] == 'standard'
    res = run_script('sample.py', f'--ckpt={out}/ckpt.pt', '--prompt=Return the', '--num_samples=1', '--length=16',
                     '--steps=4', '--device=cpu')
    assert '[MASK]' not in res.stdout


# --- max_minutes

def test_time_budget_ends_the_run_at_min_lr_and_resume_continues_it(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=100000', '--max_iters=3',
              '--log_interval=1000']
    run_script('train_mlm.py', *common, '--max_minutes=0.05')  # 3 s; max_iters=3 does not stop it
    log = read_log(out)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert log[-1]['iter'] > 3 and log[-1]['iter'] == ckpt['iter_num']
    assert log[-1]['lr'] == pytest.approx(3e-4)  # min_lr at the end of the budget
    assert 3.0 <= ckpt['train_seconds'] < 6.0
    first_iters = ckpt['iter_num']
    run_script('train_mlm.py', *common, '--max_minutes=0.1', '--init_from=resume')
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert 6.0 <= ckpt['train_seconds'] < 9.0 and ckpt['iter_num'] > first_iters
    assert read_log(out)[-1]['lr'] == pytest.approx(3e-4)


def test_the_arms_get_their_own_default_out_dir(monkeypatch):
    import common
    monkeypatch.setattr('sys.argv', ['train_mlm.py', 'config/tiny.py', '--encoder=standard'])
    assert common.default_out_dir('mlm', 'standard') == os.path.join('out', 'tiny_mlm_standard')
    assert common.default_out_dir('mlm') == os.path.join('out', 'tiny_mlm')
