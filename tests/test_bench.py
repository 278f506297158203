"""bench.py runs end to end and writes the JSON contract (numbers are measured, never asserted:
speed targets are checked by running bench.py itself, not by timed tests)."""
import json
import re

from conftest import run_script


def test_bench_writes_rows_for_both_models(tmp_path):
    out = tmp_path / 'b.json'
    run_script('bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--n_concepts=8', '--ffn_size=64',
               '--vocab_size=256', '--seq_lens=64,128', '--stages=mlm,diffusion', '--tokens_per_batch=256',
               '--warmup_steps=1', '--timed_steps=1', '--dtype=float32', f'--out={out}')
    result = json.loads(out.read_text())
    assert set(result) == {'machine', 'peak_flops', 'rows'} and result['peak_flops']['float32'] > 0
    rows = result['rows']
    assert {(r['model'], r['stage'], r['seq_len']) for r in rows} == {
        (m, s, n) for m in ('concept', 'standard') for s in ('mlm', 'diffusion') for n in (64, 128)}
    for r in rows:
        assert not r.get('oom')
        assert r['batch_size'] == 256 // r['seq_len']
        for key in ('train_tokens_per_s', 'infer_tokens_per_s', 'peak_mem_mb', 'mfu'):
            assert r[key] > 0, (key, r)


def test_generate_rows_for_both_arms(tmp_path):
    out = tmp_path / 'g.json'
    run = run_script('bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--n_concepts=8', '--ffn_size=64',
                     '--vocab_size=256', '--seq_lens=64', '--stages=generate', '--generate_steps=3', '--timed_steps=1',
                     '--dtype=float32', f'--out={out}')
    rows = json.loads(out.read_text())['rows']
    assert {(r['model'], r['stage']) for r in rows} == {('concept', 'generate'), ('standard', 'generate')}
    for r in rows:
        assert r['steps'] == 3 and r['batch_size'] == 1 and r['generate_tokens_per_s'] > 0, r
    assert 'standard generate tok/s' in run.stdout


def test_bad_settings_are_one_line_before_any_work(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    tiny = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--vocab_size=256', '--seq_lens=64', '--models=concept']
    cases = [('--stages=mlmm', "stages='mlmm': mlmm; use mlm, tsdae, diffusion, generate"),
             ('--seq_lens=0', "seq_lens='0': 0; use positive integers"),
             ('--seq_lens=', "seq_lens='': empty; use positive integers"),
             ('--timed_steps=-1', 'timed_steps=-1 must be >= 0'), ('--n_layer=0', 'n_layer=0 must be > 0'),
             ('--timed_seconds=1e309', 'timed_seconds=inf is not a finite number'),
             ('--dtype=float64', "dtype='float64': choose one of float32, bfloat16, float16"),
             (f'--out={tmp_path}', f'--out={tmp_path} is a directory; give a file name'),
             # issue 35: an unwritable --out was found only after the whole measurement, as a traceback
             ('--out=/proc/b.json', '--out=/proc/b.json cannot be written'),
             ('--worker=garbage', "worker='garbage': --worker is bench.py's own"),
             ('--worker=concept:mlm:0', "worker='concept:mlm:0'")]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda case: run_script('bench.py', *tiny, case[0], check=False), cases))
    for (arg, message), out in zip(cases, outs):
        assert out.returncode == 1 and re.fullmatch(r'error: [^\n]*\n', out.stderr), (arg, out.stderr)
        assert message in out.stderr, (arg, out.stderr)
        assert 'TFLOP/s' not in out.stdout and 'BENCH_ROW' not in out.stdout  # nothing was measured


def test_a_crashed_row_says_so_and_is_not_called_out_of_memory(tmp_path):
    out = tmp_path / 'b.json'
    run = run_script('bench.py', '--n_layer=1', '--n_head=3', '--n_embd=32', '--n_concepts=8', '--ffn_size=64',
                     '--vocab_size=256', '--seq_lens=64', '--stages=mlm', '--models=concept', '--dtype=float32',
                     f'--out={out}')
    row, = json.loads(out.read_text())['rows']
    assert 'oom' not in row and 'not divisible' in row['error']
    assert 'crashed: ' in run.stdout and 'out of memory' not in run.stdout
