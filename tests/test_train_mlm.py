"""train_mlm.py end to end: logs, checkpoints, learning, exact resume, DDP, clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, read_log, run_script
from model import ConceptConfig, ConceptMLM


def load_mlm_noise(mask_prob=0.15):
    special = {'eod': 1000, 'pad': 1001, 'mask': 1002, 'cls': 1003, 'sep': 1004}
    model = ConceptMLM(ConceptConfig(vocab_size=1005, block_size=512, n_layer=1, n_head=2, n_embd=32, n_concepts=4,
                                     ffn_size=64, pad_id=1001, mask_id=1002, eod_id=1000, cls_id=1003, sep_id=1004))
    return (lambda idx, generator: model.mlm_noise(idx, generator, mask_prob)), special


def test_mlm_masking_rules():
    """15% of real tokens picked; of those 80% [MASK], 10% random, 10% kept; never a special."""
    mlm_noise, special = load_mlm_noise()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1000, (64, 512), generator=g)
    idx[:, ::7] = special['eod']
    idx[:, -50:] = special['pad']
    inputs, targets = mlm_noise(idx, g)
    real = idx < 1000
    picked = targets != -100
    assert not picked[~real].any() and torch.equal(inputs[~real], idx[~real])
    assert torch.equal(targets[picked], idx[picked])
    frac = picked.sum() / real.sum()
    assert abs(frac - 0.15) < 0.01
    as_mask = (inputs == special['mask'])[picked].float().mean()
    kept = (inputs == idx)[picked].float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / 1000) < 0.02
    assert (inputs[picked & (inputs != special['mask'])] < 1000).all()  # random ids are ordinary tokens
    assert not torch.equal(mlm_noise(idx, torch.Generator().manual_seed(1))[1], targets)


def run_in_this_process(monkeypatch, data_dir, out_dir):
    """train_mlm.py for 2 iterations in this process, so a test can patch the model class first."""
    import runpy
    monkeypatch.setattr(sys, 'argv', ['train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                                      '--max_iters=2', '--eval_interval=2'])
    runpy.run_path(os.path.join(ROOT, 'train_mlm.py'), run_name='__main__')


def test_the_stage_feeds_the_model_the_masked_input(data_dir, tmp_path, monkeypatch):
    """The script run in this process with a spy on the model: in training and in evaluation the
    model gets the noised ids (80% of the labelled positions hold [MASK]), never the clean text."""
    import common
    from model import ConceptMLM
    seen, forward = [], ConceptMLM.forward

    def spy(self, idx, targets=None, *args, **kwargs):
        seen.append((idx.clone(), targets.clone()))
        return forward(self, idx, targets, *args, **kwargs)
    monkeypatch.setattr(ConceptMLM, 'forward', spy)
    run_in_this_process(monkeypatch, data_dir, tmp_path)
    mask_id = common.load_meta(data_dir)['special_tokens']['mask']
    assert len(seen) == 2 + 2 * 2  # 2 training steps, 2 evaluations of eval_iters=2 batches
    for idx, targets in seen:
        picked = targets != -100
        assert 0.7 < (idx[picked] == mask_id).float().mean() < 0.9
        assert (idx[~picked] != mask_id).all()


def test_a_step_with_no_masked_token_logs_no_train_loss(data_dir, tmp_path, monkeypatch):
    """Training steps whose micro-batches have nothing to score log no train loss ('-', null),
    never a 0 that reads as a perfect model; validation is scored as usual."""
    from model import ConceptMLM
    forward = ConceptMLM.forward

    def no_targets_in_training(self, idx, targets=None, *args, **kwargs):
        if self.training:
            targets = torch.full_like(targets, -100)
        return forward(self, idx, targets, *args, **kwargs)
    monkeypatch.setattr(ConceptMLM, 'forward', no_targets_in_training)
    run_in_this_process(monkeypatch, data_dir, tmp_path)
    records = read_log(str(tmp_path))
    assert [r['train_loss'] for r in records] == [None, None]
    assert records[-1]['val_loss'] > 0


def test_smoke_logs_and_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=4',
                     '--eval_interval=2')
    assert 'step 0: train loss -, val loss' in res.stdout  # no training yet: a dash, never "nan"
    assert 'nan' not in res.stdout
    records = read_log(out)
    assert [r['iter'] for r in records] == [0, 2, 4]
    assert records[0]['train_loss'] is None and records[-1]['train_loss'] > 0
    for key in ('iter', 'train_loss', 'val_loss', 'val_accuracy', 'lr', 'tokens_seen', 'elapsed_s'):
        assert key in records[-1]
    assert records[-1]['tokens_seen'] == 4 * 8 * 64
    run = json.load(open(os.path.join(out, 'run.json')))
    assert run['config']['max_iters'] == 4 and 'git_commit' in run and run['torch'] == torch.__version__
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 4 and ckpt['model_args']['vocab_size'] == 1024
    assert ckpt['tokenizer']['kind'] == 'bpe'
    assert not any(name.endswith('.tmp') or '.tmp.' in name for name in os.listdir(out))


@pytest.mark.parametrize('variant', [['--decoder=perceiver'], ['--decoder=posonly'],
                                     ['--bixt=True'], ['--recursive_iters=2'], ['--encoder=standard']])
def test_loss_falls_on_real_text(data_dir, tmp_path, variant):
    out = str(tmp_path / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=60',
               '--eval_interval=60', *variant)
    first, last = read_log(out)
    assert last['val_loss'] < first['val_loss'] - 0.5, (first, last)


def final_weights(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']


@pytest.mark.parametrize('arm', ['concept', 'standard'])
def test_resume_is_exact(data_dir, tmp_path, arm):
    """N iterations + resume + N iterations == 2N uninterrupted, bit for bit (CPU, float32)."""
    common = [*TINY, f'--data_dir={data_dir}', '--lr_decay_iters=8', '--eval_interval=2', '--dropout=0.1',
              f'--encoder={arm}']
    straight, halves = str(tmp_path / 'straight'), str(tmp_path / 'halves')
    run_script('train_mlm.py', *common, f'--out_dir={straight}', '--max_iters=8')
    run_script('train_mlm.py', *common, f'--out_dir={halves}', '--max_iters=4')
    out = run_script('train_mlm.py', *common, f'--out_dir={halves}', '--max_iters=8', '--init_from=resume')
    assert 'resumed from' in out.stdout
    a, b = final_weights(straight), final_weights(halves)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the log of the resumed run reads like the uninterrupted one: no repeated evaluation at iter 4,
    # the same values, and elapsed_s goes on rising
    log_a, log_b = read_log(straight), read_log(halves)
    assert [(r['iter'], r['val_loss']) for r in log_b] == [(r['iter'], r['val_loss']) for r in log_a]
    assert all(r1['elapsed_s'] <= r2['elapsed_s'] for r1, r2 in zip(log_b, log_b[1:]))


def torchrun_mlm(*args):
    """train_mlm.py in 2 gloo processes through torchrun; asserts that it succeeded."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train_mlm.py'), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize('arm', ['concept', 'standard'])
def test_ddp_two_processes_match_gradient_accumulation(data_dir, tmp_path, arm):
    """2 gloo processes x accumulation 1 == 1 process x accumulation 2 (same data, same noise)."""
    common = [*TINY, f'--data_dir={data_dir}', '--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2',
              f'--encoder={arm}']
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    run_script('train_mlm.py', *common, f'--out_dir={single}')
    res = torchrun_mlm(*common, f'--out_dir={ddp}')
    assert res.stdout.count('tokens per iteration') == 1  # rank 0 prints, once
    a, b = final_weights(single), final_weights(ddp)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_resume_is_exact_with_dropout(data_dir, tmp_path):
    """2 processes: each rank draws its own dropout masks, and resume gives each its own RNG back."""
    common = [*TINY, f'--data_dir={data_dir}', '--lr_decay_iters=4', '--eval_interval=2', '--dropout=0.1',
              '--gradient_accumulation_steps=2']
    straight, halves = str(tmp_path / 'straight'), str(tmp_path / 'halves')
    torchrun_mlm(*common, f'--out_dir={straight}', '--max_iters=4')
    torchrun_mlm(*common, f'--out_dir={halves}', '--max_iters=2')
    torchrun_mlm(*common, f'--out_dir={halves}', '--max_iters=4', '--init_from=resume')
    a, b = final_weights(straight), final_weights(halves)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_unknown_decoder_is_one_clear_line(data_dir, tmp_path):
    out = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=1',
                     '--decoder=perciever', check=False)
    assert out.returncode != 0
    assert "unknown decoder 'perciever'" in out.stderr and 'Traceback' not in out.stderr


def test_resume_refuses_another_tokenizer_stage_or_shape(data_dir, tmp_path):
    """--init_from=resume continues the same run: another vocabulary, another tokenizer of the same
    size, another stage's checkpoint or another shape is one line saying what to do instead."""
    import prepare_data
    run_dir = str(tmp_path / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={run_dir}', '--max_iters=1',
               '--eval_interval=1')
    smaller, same_size = str(tmp_path / 'smaller'), str(tmp_path / 'same_size')
    prepare_data.prepare(dataset='pydocs', max_docs=500, vocab_size=600, data_dir=smaller)
    prepare_data.prepare(dataset='pydocs', max_docs=800, vocab_size=1024, data_dir=same_size)
    resume = [*TINY, f'--out_dir={run_dir}', '--max_iters=2', '--init_from=resume']
    cases = [('train_mlm.py', [f'--data_dir={smaller}'], 'vocab_size 1024'),
             ('train_mlm.py', [f'--data_dir={same_size}'], 'another tokenizer'),
             ('train_tsdae.py', [f'--data_dir={data_dir}'], 'is a mlm checkpoint'),
             ('train_mlm.py', [f'--data_dir={data_dir}', '--block_size=32'], 'block_size=64 there, 32 here')]
    for script, extra, message in cases:
        out = run_script(script, *resume, *extra, check=False)
        assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr, (script, out.stderr)
    assert torch.load(os.path.join(run_dir, 'ckpt.pt'), weights_only=True)['iter_num'] == 1  # untouched


def test_settings_out_of_range_are_one_clear_line(data_dir, tmp_path, monkeypatch):
    import common
    for bad in ({'eval_iters': 0}, {'gradient_accumulation_steps': -1}, {'batch_size': 0}, {'dropout': 1.0},
                {'mask_prob': 0.0}, {'t_min': 1.5}, {'log_interval': 0}, {'max_minutes': float('inf')},
                {'learning_rate': float('nan')}, {'seed': 10 ** 30}, {'seed': -1}, {'decoder_x': float('-inf')},
                {'encoder': 'transformer'}, {'dtype': 'fp8'}):
        with pytest.raises(common.InputError, match=f'{next(iter(bad))}='):
            common.check_settings({'eval_iters': 20, 'mask_prob': 0.15, **bad})
    common.check_settings({'eval_iters': 1, 'mask_prob': 1.0, 'dropout': 0.0, 't_min': 0.0, 'max_iters': 0, 'seed': 2 ** 63 - 1})
    with pytest.raises(common.InputError, match='local_window=64 reaches past the 64-token window: at most .* 63'):
        common.check_settings({'block_size': 64, 'local_window': 64})
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, 'is_available', lambda: False)
        with pytest.raises(common.InputError, match='no CUDA device'):
            common.resolve_device('cuda')
    out = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--eval_iters=0',
                     check=False)
    assert out.returncode != 0 and 'eval_iters=0 must be > 0' in out.stderr and 'Traceback' not in out.stderr
    # issue 35: a seed out of range and a non-finite budget are one line before anything runs
    for arg, message in (('--seed=1e30', 'must be an integer from 0 to 2**63 - 1'),
                         ('--max_minutes=1e309', 'max_minutes=inf is not a finite number')):
        out = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/x', arg, check=False)
        assert out.returncode == 1 and message in out.stderr and 'Traceback' not in out.stderr, out.stderr
        assert not os.path.exists(f'{tmp_path}/x')


def test_missing_dataset_is_one_clear_line(tmp_path):
    out = run_script('train_mlm.py', *TINY, f'--data_dir={tmp_path}/nope', f'--out_dir={tmp_path}', check=False)
    assert out.returncode != 0 and 'prepare_data.py' in out.stderr and 'Traceback' not in out.stderr
