"""bench.py runs end to end and writes the JSON contract (numbers are measured, never asserted:
speed targets are checked by running bench.py itself, not by timed tests)."""
import json

from conftest import run_script


def test_bench_writes_rows_for_both_models(tmp_path):
    out = tmp_path / 'b.json'
    run_script('bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--n_concepts=8', '--ffn_size=64',
               '--vocab_size=256', '--seq_lens=64,128', '--stages=mlm,diffusion', '--tokens_per_batch=256',
               '--warmup_steps=1', '--timed_steps=1', '--dtype=float32', f'--json={out}')
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
                     '--dtype=float32', f'--json={out}')
    rows = json.loads(out.read_text())['rows']
    assert {(r['model'], r['stage']) for r in rows} == {('concept', 'generate'), ('standard', 'generate')}
    for r in rows:
        assert r['steps'] == 3 and r['batch_size'] == 1 and r['generate_tokens_per_s'] > 0, r
    assert 'standard generate tok/s' in run.stdout


def test_bad_settings_are_one_line_before_any_work(tmp_path):
    for arg, message in (('--stages=mlmm', "mlmm; use mlm, tsdae, diffusion"),
                         ('--seq_lens=0', '0; use positive integers'), (f'--json={tmp_path}', 'not a file')):
        out = run_script('bench.py', arg, check=False)
        assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr, (arg, out.stderr)
        assert 'matmul peak' not in out.stdout  # nothing was measured


def test_a_crashed_row_says_so_and_is_not_called_out_of_memory(tmp_path):
    out = tmp_path / 'b.json'
    run = run_script('bench.py', '--n_layer=1', '--n_head=3', '--n_embd=32', '--n_concepts=8', '--ffn_size=64',
                     '--vocab_size=256', '--seq_lens=64', '--stages=mlm', '--models=concept', '--dtype=float32',
                     f'--json={out}')
    row, = json.loads(out.read_text())['rows']
    assert 'oom' not in row and 'not divisible' in row['error']
    assert 'crashed: ' in run.stdout and 'out of memory' not in run.stdout
