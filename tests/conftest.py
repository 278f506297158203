"""Shared fixtures: a small real corpus (pydocs, offline) prepared once per test session, and a
helper that runs a stage script the way a user does."""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# A test run started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would every
# script a test starts: the Ctrl-C tests need Python's own handler there, which a handled SIGINT here gives
signal.signal(signal.SIGINT, signal.default_int_handler)

# the tiny shape used by script tests: the smallest model that still learns on real text
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--n_concepts=8', '--ffn_size=64', '--block_size=64',
        '--batch_size=8', '--eval_iters=2', '--log_interval=1', '--device=cpu', '--dtype=float32',
        '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4']


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """~280k tokens of Python docstrings with a 1024-token BPE."""
    import prepare_data
    out = str(tmp_path_factory.mktemp('data') / 'pydocs_small')
    prepare_data.prepare(dataset='pydocs', max_docs=3000, vocab_size=1024, data_dir=out, val_fraction=0.05)
    return out


def run_script(script, *args, env=None, check=True, timeout=600):
    """Run ROOT/script with args as a subprocess; return CompletedProcess (stdout+stderr text)."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_function(script, name, **script_globals):
    """A function exactly as a stage script defines it at module level, with the script globals it
    reads supplied by the test (the scripts themselves run top to bottom and cannot be imported)."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = dict(script_globals)
    exec(compile(ast.Module([fn], []), script, 'exec'), namespace)
    return namespace[name]
