"""tools/score_text.py: the loss or NLL bound of any checkpoint on any text, at several context lengths,
on the same scored tokens with the same noise."""
import gzip
import json
import re

import pytest

from conftest import TINY, run_script

TOOL = 'tools/score_text.py'


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    out = {}
    for script, stage, extra in (('train_mlm.py', 'mlm', []), ('train_diffusion.py', 'diffusion', ['--bound_levels=2'])):
        out[stage] = str(tmp_path_factory.mktemp(stage))
        run_script(script, *TINY, f'--data_dir={data_dir}', f'--out_dir={out[stage]}', '--max_iters=20',
                   '--eval_interval=20', *extra)
    return out


@pytest.mark.parametrize('stage,what', [('mlm', 'masked-token loss'), ('diffusion', 'NLL bound')])
def test_each_context_scores_the_same_tokens(runs, data_dir, tmp_path, stage, what):
    res = run_script(TOOL, f'--ckpt={runs[stage]}/ckpt.pt', f'--data_dir={data_dir}', '--contexts=32,64,256',
                     '--n_spans=6', '--span_len=24', '--bound_levels=2', f'--out={tmp_path}/r.json')
    lines = re.findall(rf'context +([\d,]+): {what} ([\d.]+) nats/token on ([\d,]+) scored tokens', res.stdout)
    assert [int(c.replace(',', '')) for c, _, _ in lines] == [32, 64, 256]
    assert len({n for _, _, n in lines}) == 1 and int(lines[0][2].replace(',', '')) > 0  # the same tokens
    rows = json.load(open(f'{tmp_path}/r.json'))['rows']
    assert [r['context'] for r in rows] == [32, 64, 256] and all(0 < r['nats_per_token'] < 12 for r in rows)
    again = run_script(TOOL, f'--ckpt={runs[stage]}/ckpt.pt', f'--data_dir={data_dir}', '--contexts=256,32',
                       '--n_spans=6', '--span_len=24', '--bound_levels=2')
    swapped = re.findall(rf'{what} ([\d.]+)', again.stdout)
    assert swapped == [lines[2][1], lines[0][1]]  # a row does not depend on the others: fixed noise per span


def test_a_text_file_is_read_through_the_checkpoints_tokenizer(runs, tmp_path):
    book = '\n\n'.join(f"Return the number of items in list {i}, or raise an error." for i in range(300))
    with gzip.open(tmp_path / 'book.txt.gz', 'wt') as f:
        f.write(book)
    res = run_script(TOOL, f'--ckpt={runs["diffusion"]}/ckpt.pt', f'--text={tmp_path}/book.txt.gz', '--contexts=64',
                     '--n_spans=3', '--span_len=16', '--bound_levels=2')
    assert re.search(r'context +64: NLL bound [\d.]+ nats/token', res.stdout)
    assert 'book.txt.gz' in res.stdout


def test_the_defaults_score_a_checkpoint_of_short_windows(runs, data_dir):
    # the context defaults to the checkpoint's 64-token window, and the scored span to that context
    res = run_script(TOOL, f'--ckpt={runs["mlm"]}/ckpt.pt', f'--data_dir={data_dir}', '--n_spans=2')
    assert re.search(r'context +64: masked-token loss [\d.]+ nats/token', res.stdout)
    assert '2 spans of 64' in res.stdout


def test_bad_requests_are_one_line(runs, data_dir, tmp_path):
    ckpt = f'--ckpt={runs["mlm"]}/ckpt.pt'
    (tmp_path / 'short.txt').write_text('Only a few words here.\n')
    cases = [([], 'give the text to score'),
             ([f'--data_dir={data_dir}', '--contexts=8', '--span_len=16'], 'must hold the span_len=16'),
             ([f'--text={tmp_path}/short.txt', '--contexts=64', '--span_len=16'], 'fewer than the longest context of 64'),
             ([f'--data_dir={data_dir}', '--n_spans=0'], 'n_spans=0 must be >= 1'),
             ([f'--data_dir={data_dir}', '--span_len=-1'], 'span_len=-1 must be >= 0')]
    for args, message in cases:
        res = run_script(TOOL, ckpt, *args, check=False)
        assert res.returncode == 1 and message in res.stderr and 'Traceback' not in res.stderr, (args, res.stderr)
