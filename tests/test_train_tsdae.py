"""train_tsdae.py: the deletion noise, what the encoder can see, learning, warm start from MLM."""
import pytest
import torch

from conftest import TINY, read_log, run_script
from model import ConceptConfig, ConceptMLM

SPECIAL = {'eod': 1000, 'pad': 1001, 'mask': 1002, 'cls': 1003, 'sep': 1004}
NOISE_MODEL = ConceptMLM(ConceptConfig(vocab_size=1005, block_size=256, n_layer=1, n_head=2, n_embd=32, n_concepts=4,
                                       ffn_size=64, decoder='posonly', pad_id=1001, mask_id=1002, eod_id=1000,
                                       cls_id=1003, sep_id=1004))


def tsdae_noise(mode='hide', rate=0.6):
    return lambda idx, generator, attn_mask=None: NOISE_MODEL.tsdae_noise(idx, generator, rate, mode, attn_mask)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1000, (32, 256), generator=g)
    idx[:, ::9] = SPECIAL['eod']
    attn_mask = torch.ones_like(idx, dtype=torch.bool)
    attn_mask[:, -40:] = False  # padding
    idx[~attn_mask] = SPECIAL['pad']
    return idx, attn_mask


def test_deletion_rate_and_what_is_never_deleted():
    idx, attn_mask = batch()
    inputs, visible, targets = tsdae_noise()(idx, torch.Generator().manual_seed(1), attn_mask)
    deletable = attn_mask & (idx < 1000)
    deleted = deletable & ~visible
    assert abs(deleted.sum() / deletable.sum() - 0.6) < 0.02
    assert visible[attn_mask & (idx == SPECIAL['eod'])].all()      # specials stay
    assert not visible[~attn_mask].any()                            # padding stays hidden
    assert torch.equal(inputs, idx)                                 # 'hide' keeps ids and positions


def test_labels_on_real_tokens_only_and_at_least_one_token_kept():
    idx, attn_mask = batch()
    _, visible, targets = tsdae_noise(rate=1.0)(idx, torch.Generator().manual_seed(1), attn_mask)
    assert torch.equal(targets[attn_mask], idx[attn_mask]) and (targets[~attn_mask] == -100).all()
    assert ((visible & (idx < 1000)).sum(1) == 1).all()  # rate 1.0 still keeps one ordinary token per row


def test_drop_mode_closes_the_gaps():
    idx, attn_mask = batch()
    g = torch.Generator().manual_seed(1)
    _, visible, _ = tsdae_noise('hide')(idx, g, attn_mask)
    packed, packed_mask, targets = tsdae_noise('drop')(idx, torch.Generator().manual_seed(1), attn_mask)
    for row in range(idx.shape[0]):
        assert torch.equal(packed[row][packed_mask[row]], idx[row][visible[row]])
    assert torch.equal(packed_mask.sum(1), visible.sum(1)) and (packed[~packed_mask] == SPECIAL['pad']).all()


def test_the_encoder_cannot_see_deleted_tokens():
    torch.manual_seed(0)
    cfg = ConceptConfig(vocab_size=1005, block_size=256, n_layer=2, n_head=2, n_embd=32, n_concepts=8,
                        ffn_size=64, decoder='posonly', pad_id=1001, mask_id=1002)
    model = ConceptMLM(cfg).eval()
    idx, attn_mask = batch()
    idx, attn_mask = idx[:4], attn_mask[:4]
    inputs, visible, _ = tsdae_noise()(idx, torch.Generator().manual_seed(1), attn_mask)
    changed = torch.where(visible, inputs, (inputs + 1) % 1000)  # rewrite every deleted or padded id
    torch.testing.assert_close(model.encoder(inputs, visible), model.encoder(changed, visible))


def test_the_stage_hides_deleted_tokens_from_the_encoder(data_dir, tmp_path):
    """Deletion reaches the model: with the same initial weights and windows, the loss at step 0
    depends on the deletion rate (it would not if the stage ignored the visibility mask)."""
    losses = []
    for mode, rate in (('hide', 0.0), ('hide', 0.9), ('drop', 0.9)):
        out = str(tmp_path / f'{mode}{rate}')
        run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=0',
                   f'--deletion_mode={mode}', f'--deletion_rate={rate}')
        losses.append(read_log(out)[0]['val_loss'])
    assert abs(losses[1] - losses[0]) > 1e-3 and abs(losses[2] - losses[0]) > 1e-3, losses


def test_decoder_must_not_see_the_answer(data_dir, tmp_path):
    out = run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                     '--decoder=perceiver', check=False)
    assert out.returncode != 0 and "decoder must be 'posonly'" in out.stderr


@pytest.mark.parametrize('mode', ['hide', 'drop'])
def test_loss_falls_and_warm_start_from_mlm_starts_lower(data_dir, tmp_path, mode):
    common = [*TINY, f'--data_dir={data_dir}', '--max_iters=40', '--eval_interval=40', f'--deletion_mode={mode}']
    scratch = str(tmp_path / 'scratch')
    run_script('train_tsdae.py', *common, f'--out_dir={scratch}')
    first, last = read_log(scratch)
    assert last['val_loss'] < first['val_loss'] - 0.3 and 'val_recon_accuracy' in last
    if mode == 'drop':
        return
    mlm = str(tmp_path / 'mlm')
    run_script('train_mlm.py', *common[:-1], '--decoder=posonly', '--max_iters=60', f'--out_dir={mlm}')
    warm = str(tmp_path / 'warm')
    out = run_script('train_tsdae.py', *common, f'--out_dir={warm}', f'--init_from={mlm}/ckpt.pt')
    assert 'warm start from' in out.stdout and 'loaded' in out.stdout and 'encoder.layers.0' in out.stdout
    assert read_log(warm)[0]['val_loss'] < first['val_loss']
