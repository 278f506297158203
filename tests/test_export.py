"""tools/export.py: the Hub-layout directory, loading it (and a hub id) wherever a checkpoint is
taken (common.load_export), the exact round trip, clear errors, no temporary left by a killed export;
and wandb's offline run holding the metrics. Nothing here touches the network: hub calls are replaced
by fakes, and subprocesses get a dead proxy."""
import glob
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, TINY, read_log, run_script
from tools import export

NO_NETWORK = {'HF_HUB_OFFLINE': '1', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9',
              'WANDB_ERROR_REPORTING': 'false'}


def run_export(monkeypatch, *args):
    """tools/export.py's command line, in this process (an error is the InputError the user sees)."""
    monkeypatch.setattr(sys, 'argv', ['tools/export.py', *args])
    runpy.run_path(os.path.join(ROOT, 'tools', 'export.py'), run_name='__main__')


@pytest.fixture(scope='module')
def mlm_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('mlm') / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=3',
               '--eval_interval=3')
    return out


@pytest.fixture(scope='module')
def mlm_export(mlm_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('hub') / 'tiny_mlm')
    res = run_script('tools/export.py', f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={out}', env=NO_NETWORK)
    assert f'exported {mlm_run}/ckpt.pt to {out}' in res.stdout
    return out


def test_the_directory_holds_weights_config_tokenizer_and_card(mlm_run, mlm_export):
    from safetensors import safe_open
    assert sorted(os.listdir(mlm_export)) == ['README.md', 'config.json', 'model.safetensors', 'tokenizer.tiktoken']
    ckpt = torch.load(f'{mlm_run}/ckpt.pt', weights_only=True)
    with safe_open(f'{mlm_export}/model.safetensors', 'pt') as f:
        names, tied = set(f.keys()), json.loads(f.metadata()['tied'])
    assert tied == {'lm_head.weight': 'encoder.wte.weight'}  # the tied lm_head is stored once
    assert names | set(tied) == set(ckpt['model']) and not names & set(tied)
    config = json.load(open(f'{mlm_export}/config.json'))
    assert config['stage'] == 'mlm' and config['encoder'] == 'concept'
    assert config['model_args'] == {'encoder': 'concept', **ckpt['model_args']}
    assert config['vocab_size'] == ckpt['model_args']['vocab_size'] == 1024
    assert config['special_tokens'] == ckpt['special_tokens'] and config['tokenizer'] == ckpt['tokenizer']
    card = open(f'{mlm_export}/README.md').read()
    last = read_log(mlm_run)[-1]
    assert f"| val_loss | {read_log(mlm_run)[0]['val_loss']:.4f} | {last['val_loss']:.4f} |" in card
    assert f"{last['tokens_seen']:,} tokens seen" in card and 'ln(1024)' in card and 'stage `mlm`, 3 iterations' in card


def test_round_trip_gives_the_same_weights_and_embeddings(mlm_run, mlm_export):
    from eval_glue import encode
    original, exported = common.load_checkpoint(f'{mlm_run}/ckpt.pt'), common.load_checkpoint(mlm_export)
    assert set(original['model']) == set(exported['model'])
    for name, t in original['model'].items():
        assert torch.equal(t, exported['model'][name]), name
    assert exported['model_args'] == original['model_args'] and exported['stage'] == 'mlm'
    texts = ['Return the number of items.', 'a second, longer sentence to pad the first one']
    a, b = encode(texts, f'{mlm_run}/ckpt.pt'), encode(texts, mlm_export)
    assert a.shape == (2, 32) and torch.equal(a, b)


def test_concept_geometry_of_an_export_reads_the_data_it_was_trained_on(mlm_run, mlm_export):
    from tools.plot import concept_geometry
    kwargs = dict(n_batches=1, batch_size=2)
    assert concept_geometry(mlm_export, **kwargs) == concept_geometry(f'{mlm_run}/ckpt.pt', **kwargs)


def test_encode_loads_an_export_again_once_it_is_replaced(mlm_run, tmp_path):
    from eval_glue import encode
    export.export(f'{mlm_run}/ckpt.pt', f'{tmp_path}/hub')
    before = encode(['a sentence'], f'{tmp_path}/hub')
    ckpt = torch.load(f'{mlm_run}/ckpt.pt', weights_only=True)
    ckpt['model']['encoder.concepts'] = ckpt['model']['encoder.concepts'] + 1.0  # another model, same shape
    os.makedirs(tmp_path / 'run2')
    torch.save(ckpt, tmp_path / 'run2' / 'ckpt.pt')
    os.utime(tmp_path / 'hub', (0, 0))  # the export being replaced is older, as on disk it would be
    export.export(f'{tmp_path}/run2/ckpt.pt', f'{tmp_path}/hub')
    assert not torch.equal(before, encode(['a sentence'], f'{tmp_path}/hub'))  # not the cached first model


def test_a_diffusion_export_samples_exactly_like_its_checkpoint(data_dir, tmp_path):
    run = str(tmp_path / 'diff')
    run_script('train_diffusion.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={run}', '--max_iters=2',
               '--eval_interval=2', '--bound_levels=2')
    run_script('tools/export.py', f'--ckpt={run}/ckpt.pt', f'--out_dir={tmp_path}/hub', env=NO_NETWORK)
    assert json.load(open(f'{tmp_path}/hub/config.json'))['stage'] == 'diffusion'
    args = ['--prompt=Return the', '--length=20', '--steps=4', '--num_samples=2', '--seed=7']
    outs = [run_script('sample.py', f'--ckpt={ck}', *args, env=NO_NETWORK).stdout
            for ck in (f'{run}/ckpt.pt', f'{tmp_path}/hub')]
    samples = ['\n'.join(line for line in out.splitlines() if not line.startswith('config:')) for out in outs]
    assert samples[0].count('-' * 80) == 2 and samples[0] == samples[1]


def test_a_warm_start_takes_an_export(data_dir, mlm_export, tmp_path):
    out = run_script('train_tsdae.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/t', '--max_iters=1',
                     '--eval_interval=1', f'--init_from={mlm_export}', env=NO_NETWORK)
    line = next(s for s in out.stdout.splitlines() if s.startswith('warm start from'))
    assert f'warm start from {mlm_export} (mlm stage, iter 3)' in line and 'loaded 0 ' not in line


def test_a_compiled_older_checkpoint_exports_without_prefixes_and_with_the_encoder_arm(mlm_run, tmp_path):
    from safetensors import safe_open
    ckpt = torch.load(f'{mlm_run}/ckpt.pt', weights_only=True)
    ckpt['model'] = {f'_orig_mod.{k}': v for k, v in ckpt['model'].items()}  # what a compiled model saves
    ckpt['model_args'].pop('encoder')  # as in checkpoints older than the encoder key
    os.makedirs(tmp_path / 'run')
    torch.save(ckpt, tmp_path / 'run' / 'ckpt.pt')
    export.export(f'{tmp_path}/run/ckpt.pt', f'{tmp_path}/hub')
    with safe_open(f'{tmp_path}/hub/model.safetensors', 'pt') as f:
        assert f.keys() and not [k for k in f.keys() if '_orig_mod' in k]
    assert json.load(open(f'{tmp_path}/hub/config.json'))['model_args']['encoder'] == 'concept'


def test_a_hub_id_loads_through_huggingface_hub(mlm_run, mlm_export, monkeypatch):
    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda repo_id, **kw: asked.append(repo_id) or mlm_export)
    loaded = common.load_checkpoint('someone/tiny-mlm')
    assert asked == ['someone/tiny-mlm']
    original = common.load_checkpoint(f'{mlm_run}/ckpt.pt')
    assert all(torch.equal(t, loaded['model'][k]) for k, t in original['model'].items())


def test_push_to_hub_uploads_the_directory(mlm_run, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(('create', repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message=''):
            calls.append(('upload', folder_path, repo_id))
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    hub = str(tmp_path / 'hub')
    run_export(monkeypatch, f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={hub}', '--push_to_hub=me/tiny-mlm')
    assert calls == [('create', 'me/tiny-mlm', True), ('upload', hub, 'me/tiny-mlm')]
    assert "encode(['a sentence'], 'me/tiny-mlm')" in open(f'{hub}/README.md').read()

    class NoToken(FakeApi):
        def create_repo(self, repo_id, exist_ok=False):
            raise RuntimeError('Invalid user token.\nmore detail')
    monkeypatch.setattr(huggingface_hub, 'HfApi', NoToken)
    with pytest.raises(common.InputError, match=r"uploading .* failed \(RuntimeError: Invalid user token.\); the export"):
        run_export(monkeypatch, f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={hub}', '--push_to_hub=me/tiny-mlm')
    assert sorted(os.listdir(hub)) == ['README.md', 'config.json', 'model.safetensors', 'tokenizer.tiktoken']


def test_exporting_again_replaces_the_export_and_leaves_no_temporary_files(mlm_run, tmp_path):
    for _ in range(2):
        export.export(f'{mlm_run}/ckpt.pt', f'{tmp_path}/hub')
    assert os.listdir(tmp_path) == ['hub'] and len(os.listdir(tmp_path / 'hub')) == 4
    assert oct(os.stat(tmp_path / 'hub' / 'model.safetensors').st_mode & 0o044) == oct(0o044 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_card_reports_eval_results_beside_the_checkpoint(mlm_run, tmp_path):
    import shutil
    shutil.copytree(mlm_run, tmp_path / 'run')
    results = {'sst2': {'accuracy': 71.25, 'std': {'accuracy': 0.0}, 'majority': {'accuracy': 50.9},
                        'n_train': 100, 'n_eval': 872, 'seconds': 3.5, 'head': 'pool', 'seeds': [42]}}
    json.dump(results, open(tmp_path / 'run' / 'glue_pool.json', 'w'))
    with open(tmp_path / 'run' / 'log.jsonl', 'a') as f:
        f.write('{"iter": 99, "val_lo')  # a record cut short by a crash is left out, not an error
    export.export(f'{tmp_path}/run/ckpt.pt', f'{tmp_path}/hub', name='me/tiny-mlm')
    card = open(tmp_path / 'hub' / 'README.md').read()
    assert "encode(['a sentence'], 'me/tiny-mlm')" in card and 'final (iter 3)' in card
    assert '## Evaluation (`glue_pool.json`, eval_glue.py)' in card and '| sst2 | accuracy | pool | 71.2 |' in card
    assert '| 50.9 | - | - | >maj | 100 | 872 |' in card  # the majority baseline beside the score (no bow: an older file)


def test_bad_inputs_are_one_line_and_write_nothing(mlm_run, mlm_export, tmp_path, monkeypatch):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    (tmp_path / 'empty_dir').mkdir()
    cases = [
        ([f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={tmp_path}/mine'], 'exists and is not an export'),
        ([f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={tmp_path}/mine/notes.txt'], 'is a file'),
        ([f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={tmp_path}/new', f'--data_dir={tmp_path}'],
         'tokenizer.tiktoken, the tokenizer, is missing'),
        ([f'--ckpt={mlm_run}/ckpt.pt', f'--out_dir={tmp_path}/new', '--push_to_hub=not a repo'], 'not a hub repo id'),
        ([f'--ckpt={tmp_path}/empty_dir', f'--out_dir={tmp_path}/new'], 'a directory without config.json'),
        ([f'--ckpt={tmp_path}/none.pt', f'--out_dir={tmp_path}/new'], 'not found'),
        (['--ckpt=nobody/no-such-repo', f'--out_dir={tmp_path}/new'], 'is not a local path, and downloading it'),
        ([f'--ckpt={mlm_run}/ckpt.pt'], '--out_dir is needed'),
        ([f'--ckpt={mlm_run}/ckpt.pt', '--out_dir=/proc/hub'], 'cannot be written'),
    ]
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # read per request: no network
    for args, message in cases:  # in this process: the exception's message is the one line the user sees
        with pytest.raises(common.InputError) as e:
            run_export(monkeypatch, *args)
        assert message in str(e.value) and str(e.value).startswith('error: ') and '\n' not in str(e.value), (args, e.value)
    assert sorted(os.listdir(tmp_path)) == ['empty_dir', 'mine'] and os.listdir(tmp_path / 'mine') == ['notes.txt']
    config = json.load(open(f'{mlm_export}/config.json'))
    json.dump({**config, 'format_version': 99}, open(tmp_path / 'empty_dir' / 'config.json', 'w'))
    out = run_script('sample.py', f'--ckpt={tmp_path}/empty_dir', check=False, env=NO_NETWORK)
    assert out.returncode != 0 and 'export the checkpoint again' in out.stderr


def test_an_export_killed_midway_leaves_a_temporary_that_the_next_export_removes(mlm_run, tmp_path, capsys):
    """kill -9 during an export leaves <out_dir>.tmp.<pid>/ (issue 35): the next export to the same
    out_dir removes it, whether out_dir is new or an earlier export; a live writer's is left alone."""
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # a pid that no process has any more
    for earlier in (False, True):
        if earlier:
            export.export(f'{mlm_run}/ckpt.pt', f'{tmp_path}/hub')
        leftover = tmp_path / f'hub.tmp.{dead.pid}'
        leftover.mkdir()
        (leftover / 'model.safetensors').write_bytes(b'\0' * 1000)
        alive = tmp_path / f'hub.tmp.{os.getppid()}'  # a running process's temporary: not ours to remove
        alive.mkdir(exist_ok=True)
        export.export(f'{mlm_run}/ckpt.pt', f'{tmp_path}/hub')
        assert sorted(os.listdir(tmp_path)) == ['hub', alive.name]
        assert 'removed 1 temporary file(s) that an interrupted run left' in capsys.readouterr().out
        assert len(os.listdir(tmp_path / 'hub')) == 4


# ----------------------------------------------------------------------------------------------
# wandb, offline

def wandb_history(run_file, block=32768):
    """The history rows of an offline run's .wandb file: a LevelDB-style log (a 7-byte ':W&B' header,
    32 KiB blocks of records with a 7-byte header: crc32, length, type full/first/middle/last) of
    wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data = open(run_file, 'rb').read()
    assert data[:4] == b':W&B'
    pos, chunks, pending = 7, [], b''
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b'') + chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof('record_type') == 'history':
            rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_without_an_api_key_logs_offline_to_dot_wandb(data_dir, tmp_path):
    """No WANDB_API_KEY, no WANDB_MODE, no netrc, no network: the run logs offline into ./wandb of
    the working directory, without a prompt, and its history holds every evaluation of log.jsonl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(NO_NETWORK, HOME=str(tmp_path), NETRC=str(tmp_path / 'no_netrc'), OMP_NUM_THREADS='1',
               PYTHONUNBUFFERED='1')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'train_mlm.py'), *TINY, f'--data_dir={data_dir}',
                          f'--out_dir={tmp_path}/run', '--max_iters=2', '--eval_interval=1', '--wandb_log=True'],
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'logging offline to ./wandb' in out.stdout
    run_file, = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    history = wandb_history(run_file)
    records = read_log(f'{tmp_path}/run')
    assert [r['iter'] for r in records] == [0, 1, 2]
    assert [h['iter'] for h in history] == [0, 1, 2] and [h['_step'] for h in history] == [0, 1, 2]
    for h, r in zip(history, records):
        for key in ('val_loss', 'val_accuracy', 'train_loss', 'tokens_seen', 'erank'):
            assert h[key] == r[key], key
