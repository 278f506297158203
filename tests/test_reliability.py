"""Training runs that go wrong: divergence, inexact resume, a full disk, interrupted writes, nothing
to score, foreign checkpoint files, the float16 GradScaler. Each ends in one line that names the
cause and the fix, with nothing lost and no temporary file left behind."""
import errno
import math
import os
import resource
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, read_log, run_script


def ckpt_of(out):
    return os.path.join(out, 'ckpt.pt')


def temporaries(out):
    return [name for name in os.listdir(out) if '.tmp.' in name]


def one_line_failure(res):
    """The run failed with a message and no traceback; returns its last stderr line."""
    assert res.returncode != 0, res.stdout[-2000:]
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    return res.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# 1. a step that makes the weights non-finite

DIVERGE = ['--learning_rate=1e6', '--warmup_iters=0', '--max_iters=40']


@pytest.mark.parametrize('script, eval_interval', [('train_mlm.py', 2), ('train_mlm.py', 20),
                                                   ('train_tsdae.py', 2), ('train_diffusion.py', 2)])
def test_divergence_stops_in_one_line_and_names_no_missing_checkpoint(data_dir, tmp_path, script, eval_interval):
    """The first update is finite and diverges: an evaluation right after it, or the skipped steps
    that follow, stop the run without a traceback and say that no checkpoint exists."""
    out = str(tmp_path / 'run')
    res = run_script(script, *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', *DIVERGE,
                     f'--eval_interval={eval_interval}', check=False)
    line = one_line_failure(res)
    assert 'no checkpoint was written' in line and 'last good checkpoint' not in line, line
    assert not os.path.exists(ckpt_of(out))
    assert all(math.isfinite(r['val_loss']) for r in read_log(out))  # a nan is never logged


def test_divergence_after_a_good_checkpoint_keeps_and_names_it(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
               '--eval_interval=2')
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', *DIVERGE,
                     '--eval_interval=2', '--init_from=resume', check=False)
    line = one_line_failure(res)
    assert f'the last good checkpoint is {ckpt_of(out)} (iter 2)' in line, line
    ckpt = torch.load(ckpt_of(out), weights_only=True)
    assert ckpt['iter_num'] == 2 and all(bool(v.isfinite().all()) for v in ckpt['model'].values())


def test_diagnostics_of_non_finite_concepts_are_nan_not_a_crash():
    from model import concept_diagnostics
    concepts = torch.randn(2, 4, 8)
    concepts[0, 1, 2] = float('nan')
    report = concept_diagnostics(concepts)
    assert report.keys() == concept_diagnostics(torch.randn(2, 4, 8)).keys()
    assert all(math.isnan(v) for v in report.values())


def optimizer_step_for(params, scaler=None, max_nonfinite=10, dtype='float32'):
    """common.optimizer_step as a training loop calls it, keeping the count of skips in a row."""
    import common
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = scaler or torch.amp.GradScaler('cpu', enabled=False)
    streak = [0]

    def step(params, loss, it):
        _, streak[0] = common.optimizer_step(optimizer, scaler, params, loss, 1.0, streak[0], max_nonfinite, it,
                                             '/nowhere/ckpt.pt', None, dtype)
    step.scaler = scaler
    return step, optimizer


def test_non_finite_weights_stop_at_the_first_skipped_step():
    """Skipped steps leave the weights as they are: once they are non-finite no later step can
    recover, so the first skip that finds them so stops the run, not max_nonfinite skips later."""
    w = torch.nn.Parameter(torch.ones(3))
    step, _ = optimizer_step_for([w])
    with torch.no_grad():
        w[1] = float('inf')
    (w * 2).sum().backward()
    with pytest.raises(SystemExit, match='weights are not finite .*no checkpoint was written'):
        step([w], float('nan'), 7)


def test_non_finite_weights_are_never_saved(tmp_path):
    """The last line of defence: a parameter the validation loss does not see can still diverge."""
    import common
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[0] = float('nan')
    step, optimizer = optimizer_step_for(list(model.parameters()))
    with pytest.raises(SystemExit, match='weights are not finite .*bias.*not saved'):
        common.training_checkpoint('mlm', model, optimizer, step.scaler, {}, {}, 4, 1.0, None, None, None, 0.0)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# issue 17, defect 7: the float16 GradScaler's own skipped steps

def test_gradscaler_warmup_skips_do_not_count_as_non_finite_steps():
    """A scale too large for the gradient overflows it while the loss is finite: the GradScaler
    halves the scale and skips the step, as it is meant to; 26 such skips in a row are no
    divergence. A non-finite loss still counts."""
    w = torch.nn.Parameter(torch.ones(4))
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 120, growth_interval=10 ** 6)
    step, optimizer = optimizer_step_for([w], scaler, max_nonfinite=3, dtype='float16')
    for it in range(40):
        loss = (w * 1e10).sum()
        scaler.scale(loss).backward()
        step([w], loss.item(), it)
    assert scaler.get_scale() < 2.0 ** 95  # it was lowered until the gradient fit
    assert not torch.equal(w.detach(), torch.ones(4))  # and steps were then taken
    with pytest.raises(SystemExit, match='3 non-finite steps in a row'):
        for it in range(3):
            loss = (w * float('nan')).sum()
            scaler.scale(loss).backward()
            step([w], loss.item(), it)


# ----------------------------------------------------------------------------------------------
# 2. resume that is not exact, silently

def test_resume_with_a_longer_default_schedule_says_so_and_the_flag_keeps_the_runs_own(data_dir, tmp_path):
    common = [*TINY, f'--data_dir={data_dir}', '--eval_interval=2']
    out, kept = str(tmp_path / 'changed'), str(tmp_path / 'kept')
    for d in (out, kept):
        run_script('train_mlm.py', *common, f'--out_dir={d}', '--max_iters=4')
    res = run_script('train_mlm.py', *common, f'--out_dir={out}', '--max_iters=8', '--init_from=resume')
    assert 'the LR schedule changes' in res.stdout and '--lr_decay_iters=4 keeps' in res.stdout, res.stdout
    res = run_script('train_mlm.py', *common, f'--out_dir={kept}', '--max_iters=8', '--init_from=resume',
                     '--lr_decay_iters=4')
    assert 'note: resuming' not in res.stdout
    lr = {r['iter']: r['lr'] for r in read_log(kept)}
    assert lr[6] == lr[8] == pytest.approx(3e-4)  # the run's own schedule had reached min_lr at iter 4


def test_resume_differences_name_each_changed_setting():
    import common
    old = {'max_iters': 4, 'lr_decay_iters': 0, 'learning_rate': 1e-3, 'batch_size': 8, 'eval_iters': 2}
    assert common.resume_differences(old, {**old, 'eval_iters': 5}) == []
    assert common.resume_differences(old, {**old, 'max_iters': 8, 'lr_decay_iters': 4}) == []
    notes = common.resume_differences(old, {**old, 'max_iters': 8, 'batch_size': 16})
    assert len(notes) == 2 and '--lr_decay_iters=4' in notes[0] and 'batch_size=8 there, 16 here' in notes[1]


# ----------------------------------------------------------------------------------------------
# 3. a full disk or a file-size limit; output paths that cannot be written

def test_file_size_limit_during_a_checkpoint_write_is_one_line_and_leaves_no_temporary(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    limit = 200_000  # bytes: the log and run.json fit, the checkpoint does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1'}
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'train_mlm.py'), *TINY, f'--data_dir={data_dir}',
                          f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    line = one_line_failure(res)
    assert f'could not write {ckpt_of(out)}' in line and 'file-size limit' in line, line
    assert temporaries(out) == [] and not os.path.exists(ckpt_of(out))


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import common
    path = str(tmp_path / 'ckpt.pt')
    common.save_checkpoint(path, {'iter_num': 1})

    def full_disk(obj, f):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit, match='No space left on device.*ckpt.pt is unchanged.*--init_from=resume'):
        common.save_checkpoint(path, {'iter_num': 2})
    assert os.listdir(tmp_path) == ['ckpt.pt']
    assert torch.load(path, weights_only=True) == {'iter_num': 1}


def test_resume_does_not_write_the_checkpoint_it_loaded_again(data_dir, tmp_path):
    """On a full disk a resume that first re-saves the loaded iteration fails again at once."""
    out = str(tmp_path / 'run')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2']
    run_script('train_mlm.py', *common)
    before = os.stat(ckpt_of(out))
    run_script('train_mlm.py', *common, '--init_from=resume')
    after = os.stat(ckpt_of(out))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize('script', ['train_mlm.py', 'train_tsdae.py', 'train_diffusion.py'])
def test_an_output_path_that_is_a_file_fails_first(tmp_path, script):
    """Checked before the data is read: the dataset here does not exist, and the message is still
    about out_dir (tests run as root, where a read-only directory is writable: a file stands in)."""
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    for out in (blocker, blocker / 'run'):
        res = run_script(script, *TINY, f'--data_dir={tmp_path}/no_data', f'--out_dir={out}', check=False)
        line = one_line_failure(res)
        assert line.startswith(f'error: --out_dir={out} is ') and 'a file' in line, line


# ----------------------------------------------------------------------------------------------
# 4. what an interrupted run left

def test_a_new_run_removes_the_temporaries_of_a_killed_one(data_dir, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale, live = out / f'ckpt.pt.tmp.{dead.pid}', out / f'ckpt.pt.tmp.{os.getpid()}'
    stale.write_bytes(b'half a checkpoint')
    live.write_bytes(b'a checkpoint being written')
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1',
                     '--eval_interval=1')
    assert 'removed 1 temporary file' in res.stdout
    assert not stale.exists() and live.exists()  # a live process's file is its own


# ----------------------------------------------------------------------------------------------
# 5. validation batches with nothing to score

def test_validation_loss_is_a_mean_over_tokens_not_over_batches(data_dir, tmp_path):
    """mask_prob=0.01 on 64-token windows leaves some validation batches without a masked token:
    they must not count as a loss of 0. The logged loss equals the token mean recomputed here."""
    import common
    from model import IGNORE_INDEX
    out = str(tmp_path / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
               '--eval_interval=2', '--mask_prob=0.01', '--eval_iters=6', '--batch_size=1')
    model, _ = common.load_model(ckpt_of(out))
    loss_sum, n_tokens, empty = 0.0, 0, 0
    with torch.no_grad():
        for idx, nseed in common.fixed_batches(data_dir, 'val', 64, 1, 6, True, 1337, 0, 'cpu'):
            inputs, targets = model.mlm_noise(idx, common.noise_generator(nseed, 'cpu'), 0.01)
            n = int((targets != IGNORE_INDEX).sum())
            empty += n == 0
            if n:
                loss_sum += model(inputs, targets)[1].item() * n
                n_tokens += n
    assert empty > 0  # the case this test is about
    assert read_log(out)[-1]['val_loss'] == pytest.approx(loss_sum / n_tokens, rel=1e-5)


def test_nothing_to_score_is_one_line_and_never_a_best_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
                     '--eval_interval=1', '--mask_prob=1e-9', check=False)
    assert 'no token to score' in one_line_failure(res)
    assert not os.path.exists(ckpt_of(out))


# ----------------------------------------------------------------------------------------------
# 6. a torn line in log.jsonl

def test_a_torn_last_log_line_is_dropped_on_resume(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=2']
    run_script('train_mlm.py', *common, '--max_iters=2')
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write('{"iter": 4, "train_loss": 6.1, "val_lo')  # the crash came mid-write
    res = run_script('train_mlm.py', *common, '--max_iters=4', '--init_from=resume')
    assert 'dropped 1 unreadable line' in res.stdout
    assert [r['iter'] for r in read_log(out)] == [0, 2, 4]


# ----------------------------------------------------------------------------------------------
# 9. files that are not checkpoints of this project

@pytest.fixture
def foreign_files(tmp_path):
    from model import ConceptConfig, ConceptMLM
    model = ConceptMLM(ConceptConfig(n_layer=1, n_head=2, n_embd=32, n_concepts=4, ffn_size=64, block_size=16,
                                     vocab_size=64, pad_id=60, mask_id=61, eod_id=62, cls_id=63, sep_id=59))
    files = {'bare state_dict': tmp_path / 'state_dict.pt', 'bare tensor': tmp_path / 'tensor.pt',
             'could not be read': tmp_path / 'notes.txt'}
    torch.save(model.state_dict(), files['bare state_dict'])
    torch.save(torch.zeros(3, 4), files['bare tensor'])
    files['could not be read'].write_text('not a checkpoint\n')
    return files


def test_init_from_a_foreign_file_is_one_line(data_dir, tmp_path, foreign_files):
    for what, path in foreign_files.items():
        res = run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/run',
                         '--max_iters=1', f'--init_from={path}', check=False)
        line = one_line_failure(res)
        assert what in line and str(path) in line, line


def test_load_model_and_encode_refuse_foreign_files_in_one_line(data_dir, foreign_files):
    import eval_glue
    import common
    for what, path in foreign_files.items():
        for call in (lambda: common.load_model(str(path)), lambda: eval_glue.encode(['a sentence'], str(path))):
            with pytest.raises(SystemExit) as e:
                call()
            assert what in str(e.value) and '\n' not in str(e.value)


def test_resuming_a_checkpoint_without_training_state_is_one_line(data_dir, tmp_path):
    out = str(tmp_path / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1',
               '--eval_interval=1')
    ckpt = torch.load(ckpt_of(out), weights_only=True)
    torch.save({k: ckpt[k] for k in ('stage', 'model', 'model_args', 'tokenizer', 'data_dir')}, ckpt_of(out))
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
                     '--init_from=resume', check=False)
    assert 'no training state' in one_line_failure(res)
    torch.save({**ckpt, 'sampler': {'generator': torch.zeros(3, dtype=torch.uint8), 'step': 1}}, ckpt_of(out))
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
                     '--init_from=resume', check=False)
    assert 'training state in the checkpoint does not fit' in one_line_failure(res)


def test_a_pickle_that_would_run_code_is_refused_in_our_own_words(data_dir, tmp_path):
    """torch.load(weights_only=True) refuses it; the line says why, whole (issue 35)."""
    import common
    path = tmp_path / 'evil.pt'
    torch.save({'model': {}, 'model_args': {}, 'payload': os.system}, path)
    with pytest.raises(common.InputError, match='arbitrary code execution'):
        common.load_checkpoint(str(path))
    res = run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/run', '--max_iters=1',
                     f'--init_from={path}', check=False)
    assert 'arbitrary code execution' in one_line_failure(res)


def test_resuming_a_finished_run_says_that_nothing_is_left_to_train(data_dir, tmp_path):
    """A resume at or past its end trains nothing, and says so (issue 35)."""
    out = str(tmp_path / 'run')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=2']
    run_script('train_mlm.py', *common, '--max_iters=2')
    res = run_script('train_mlm.py', *common, '--max_iters=2', '--init_from=resume')
    assert 'already the end of this run' in res.stdout and 'iter 1:' not in res.stdout
    assert torch.load(ckpt_of(out), weights_only=True)['iter_num'] == 2


@pytest.mark.parametrize('script,stage', [('train_tsdae.py', 'tsdae'), ('train_diffusion.py', 'diffusion')])
def test_every_stage_records_its_own_stage_and_resumes(data_dir, tmp_path, script, stage):
    out = str(tmp_path / 'run')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=2', '--lr_decay_iters=4']
    run_script(script, *common, '--max_iters=2')
    assert torch.load(ckpt_of(out), weights_only=True)['stage'] == stage
    res = run_script(script, *common, '--max_iters=4', '--init_from=resume')
    assert 'resumed from' in res.stdout and [r['iter'] for r in read_log(out)] == [0, 2, 4]


def test_a_checkpoint_with_learned_position_tables_is_refused_in_one_line(tmp_path):
    """Checkpoints written before positions became sinusoids hold encoder.wpe.weight (block_size, H)."""
    import common
    from model import ConceptConfig, ConceptMLM
    args = dict(n_layer=1, n_head=2, n_embd=32, n_concepts=4, ffn_size=64, block_size=16, vocab_size=64, pad_id=60,
                mask_id=61, eod_id=62, cls_id=63, sep_id=59)
    state = ConceptMLM(ConceptConfig(**args)).state_dict()
    state['encoder.wpe.weight'] = torch.zeros(16, 32)
    del state['encoder.wpe.proj']
    torch.save({'stage': 'mlm', 'model': state, 'model_args': args}, tmp_path / 'old.pt')
    with pytest.raises(common.InputError, match='learned position tables .* train it again'):
        common.load_model(str(tmp_path / 'old.pt'))


def test_a_checkpoint_with_retired_options_loads_at_their_old_defaults_and_is_refused_otherwise(tmp_path):
    """Checkpoints from before issue 32 hold shared_token_kv, loss_weighting and concept_loss_pooled."""
    import common
    from model import ConceptConfig, ConceptMLM
    args = dict(n_layer=1, n_head=2, n_embd=32, n_concepts=4, ffn_size=64, block_size=16, vocab_size=64, pad_id=60,
                mask_id=61, eod_id=62, cls_id=63, sep_id=59)
    state = ConceptMLM(ConceptConfig(**args)).state_dict()
    old = dict(args, shared_token_kv=False, loss_weighting='fixed', concept_loss_pooled=False)
    torch.save({'stage': 'mlm', 'model': state, 'model_args': old}, tmp_path / 'old.pt')
    model, _ = common.load_model(str(tmp_path / 'old.pt'))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for retired, said in ((dict(shared_token_kv=True), 'shared_token_kv=True was retired'),
                          (dict(loss_weighting='kendall_gal'), "loss_weighting='kendall_gal' was retired"),
                          (dict(decoder='weighted'), "unknown decoder 'weighted'")):
        torch.save({'stage': 'mlm', 'model': state, 'model_args': dict(old, **retired)}, tmp_path / 'retired.pt')
        with pytest.raises(common.InputError, match=said) as e:
            common.load_model(str(tmp_path / 'retired.pt'))
        assert '\n' not in str(e.value)


def test_ctrl_c_of_a_training_run_is_one_line_about_its_checkpoint(data_dir, tmp_path):
    """SIGINT mid-run (issue 35): no KeyboardInterrupt traceback, a line naming what is kept."""
    import signal
    import time
    out = str(tmp_path / 'run')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_mlm.py'), *TINY, f'--data_dir={data_dir}',
                             f'--out_dir={out}', '--max_iters=100000', '--eval_interval=2'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(ckpt_of(out)) and time.time() < deadline:  # interrupted after a checkpoint
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == (f'interrupted; {ckpt_of(out)} is whole, the last checkpoint written: '
                                            f'continue with --init_from=resume')
    assert temporaries(out) == []
