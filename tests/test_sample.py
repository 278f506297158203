"""sample.py (text from a diffusion checkpoint, its speed, --out) and tools/sample_quality.py (the
quality report on what sample.py --out wrote)."""
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby

import numpy as np
import pytest
import torch

import common
from conftest import TINY, load_function, read_log, run_script

QUALITY = 'tools/sample_quality.py'


@pytest.fixture(scope='module')
def diffusion_run(data_dir, tmp_path_factory):
    """A short diffusion run per arm, trained on first use and shared by this module's tests."""
    runs = {}

    def run(arm='concept'):
        if arm not in runs:
            runs[arm] = str(tmp_path_factory.mktemp(f'diffusion_{arm}'))
            run_script('train_diffusion.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={runs[arm]}',
                       '--max_iters=20', '--eval_interval=10', '--bound_levels=2', f'--encoder={arm}')
        return runs[arm]
    return run


@pytest.mark.parametrize('arm', ['concept', 'standard'])
def test_samples_their_speed_and_their_quality_report(diffusion_run, data_dir, tmp_path, arm):
    run = diffusion_run(arm)
    out = run_script('sample.py', f'--ckpt={run}/ckpt.pt', '--prompt=Return the', '--length=24', '--steps=6',
                     '--num_samples=2', '--show_steps=True', f'--out={tmp_path}/s.json')
    chunks = out.stdout.split('-' * 80 + '\n')  # trajectory, then one chunk per sample (text may hold newlines)
    steps = re.findall(r'^step +\d+: (.*)$', chunks[0], flags=re.M)
    assert len(steps) == 7 and '_' in steps[0] and steps[-1].startswith('Return the')
    samples = [c.removesuffix('\n') for c in chunks[1:-1]]
    assert len(samples) == 2 and all(s.startswith('Return the') and '<|mask|>' not in s for s in samples)
    assert chunks[-1] == '' and re.search(r'^2 x 24 tokens in [\d.]+ s: [\d,]+ tokens/s \(cpu, 6 steps\)$',
                                          out.stderr, flags=re.M), out.stderr  # stdout: the samples only
    saved = json.load(open(tmp_path / 's.json'))
    assert saved['ckpt'] == f'{run}/ckpt.pt' and saved['settings']['length'] == 24
    assert [s['text'] for s in saved['samples']] == samples and all(len(s['ids']) == 24 for s in saved['samples'])

    report = run_script(QUALITY, f'--samples={tmp_path}/s.json').stdout
    # the samples beside real text and unigram samples, and the unigram level
    rows = re.findall(r'^(these 2 samples|\d+ validation documents\' starts|32 unigram samples) +(\d+) +([\d.]+) +([\d.]+) '
                      r'\((\d+) bigrams\)$', report, flags=re.M)
    assert [r[0] for r in rows] == ['these 2 samples', "32 validation documents' starts", '32 unigram samples']
    assert all(1 <= int(r[1]) <= 24 and 0 < float(r[2]) <= 1 and 0 <= float(r[3]) <= 1 for r in rows), report
    assert float(rows[1][3]) > float(rows[2][3])  # real text's bigrams occur in training more than salad's
    meta = common.load_meta(data_dir)
    train, _ = common.open_split(data_dir, 'train', meta)
    val, _ = common.open_split(data_dir, 'val', meta)
    _, unigram_ce = load_function(QUALITY, 'unigram', np=np)(train, val, 1024, list(meta['special_tokens'].values()))
    line = re.search(r"validation unigram cross-entropy: ([\d.]+) nats/token; this run's best val_nll_bound: "
                     r"([\d.]+), ([\d.]+) nats (under|above) it", report)
    assert line and float(line[1]) == pytest.approx(unigram_ce, abs=1e-3), report
    bound = min(r['val_nll_bound'] for r in read_log(run))
    assert float(line[2]) == pytest.approx(bound, abs=1e-3)
    assert float(line[3]) == pytest.approx(abs(unigram_ce - bound), abs=2e-3)
    assert line[4] == ('under' if bound < unigram_ce else 'above')
    control = re.search(r"NLL bound on (\d+) validation windows: ([\d.]+) from their own concepts, ([\d.]+) from "
                        r"another window's: the concepts carry (-?[\d.]+) nats/token", report)
    assert (control is not None) == (arm == 'concept'), report  # the standard arm has no concepts to swap
    if control:
        assert int(control[1]) >= 2 and float(control[2]) == pytest.approx(bound, abs=0.5)
        assert float(control[4]) == pytest.approx(float(control[3]) - float(control[2]), abs=2e-3)


def test_sample_refuses_a_non_diffusion_checkpoint(data_dir, tmp_path):
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--max_iters=1',
               '--eval_interval=1')
    out = run_script('sample.py', f'--ckpt={tmp_path}/ckpt.pt', check=False)
    assert out.returncode == 1 and re.fullmatch(r'error: .* is a mlm checkpoint; sample.py needs one from '
                                                r'train_diffusion.py\n', out.stderr), out.stderr


def test_sample_refuses_out_of_range_settings_before_loading(tmp_path):
    bad = [('--num_samples=0', r'num_samples=0 must be >= 1'), ('--temperature=-1', r'temperature=-1.0 must be >= 0'),
           ('--steps=0', r'steps=0 must be >= 1'), ('--top_k=-1', r'top_k=-1 must be >= 0'),
           ('--temperature=1e309', r'temperature=inf is not a finite number'),
           ('--seed=1e30', r'seed=\d+ must be an integer from 0 to 2\*\*63 - 1'),
           ('--out=/proc/s.json', r'--out=/proc/s.json cannot be written .*')]
    with ThreadPoolExecutor(2) as pool:  # the checkpoint does not exist: the check must come first
        outs = list(pool.map(lambda b: run_script('sample.py', f'--ckpt={tmp_path}/none.pt', b[0], check=False), bad))
    for (arg, message), out in zip(bad, outs):
        assert out.returncode == 1 and re.fullmatch(f'error: {message}\n', out.stderr), (arg, out.stderr)


def test_sample_says_when_it_cuts_and_refuses_when_nothing_is_left_to_fill(diffusion_run):
    ck, fast = f'--ckpt={diffusion_run()}/ckpt.pt', ['--steps=1', '--num_samples=1']
    long = ' '.join(['Return the number of items in the list.'] * 30)  # far more than block_size=64 tokens
    device = [] if torch.cuda.is_available() else [('--device=cuda', r'error: .*no CUDA device.*--device=cpu.*')]
    errors = device + [
        ('--length=1', '--prompt=Return the number', r'error: the prompt is \d+ tokens and fills the whole length=1.*'),
        ('--text=No gap here.', r'error: --text has no ___.*'),
        ('--length=2', f'--text={long} ___', r'error: --text has no ___ within its first length=2 tokens.*'),
        (f'--prompt={long}', r'error: the prompt is \d+ tokens and fills the whole length=64.*')]
    notes = [(['--length=100'], "note: length=100 is past the model's training window of 64 tokens"),
             (['--length=8', f'--text=The ___ {long}'], 'note: --text is ')]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda a: run_script('sample.py', ck, *fast, *a, check=False),
                             [e[:-1] for e in errors] + [n[0] for n in notes]))
    for (*args, pattern), out in zip(errors, outs):
        assert out.returncode != 0 and re.fullmatch(pattern + r'\n', out.stderr), (args, out.stderr)
    for (args, note), out in zip(notes, outs[len(errors):]):
        assert out.returncode == 0, (args, out.stderr)
        notes_printed = [line for line in out.stderr.splitlines() if line.startswith('note:')]
        assert len(notes_printed) == 1 and notes_printed[0].startswith(note), (args, out.stderr)


def test_a_moved_data_directory_is_named_with_the_option_that_finds_it(diffusion_run, data_dir, tmp_path):
    """Issue 35: the error names --data_dir (not prepare_data, which cannot help); with it, sample.py
    and the quality report run."""
    checkpoint = torch.load(f'{diffusion_run()}/ckpt.pt', weights_only=True)
    torch.save({**checkpoint, 'data_dir': str(tmp_path / 'moved_away')}, tmp_path / 'ckpt.pt')
    args = [f'--ckpt={tmp_path}/ckpt.pt', '--steps=2', '--num_samples=1', '--length=16', f'--out={tmp_path}/s.json']
    out = run_script('sample.py', *args, check=False)
    assert out.returncode == 1 and re.fullmatch(r'error: .*tokenizer, is missing; .*moved, pass --data_dir=<where it is '
                                                r'now>.*\n', out.stderr), out.stderr
    run_script('sample.py', *args, f'--data_dir={data_dir}')
    assert 'validation unigram cross-entropy' in run_script(QUALITY, f'--samples={tmp_path}/s.json').stdout


def test_sample_quality_refuses_what_it_cannot_read_in_one_line(diffusion_run, tmp_path):
    (tmp_path / 'torn.json').write_text('{"ckpt": ')
    saved = {'ckpt': f'{diffusion_run()}/ckpt.pt', 'samples': [{'ids': [1, 2], 'text': ''}],
             'settings': {'seed': 1, 'length': 2, 'device': 'cpu', 'data_dir': str(tmp_path / 'gone')}}
    (tmp_path / 'elsewhere.json').write_text(json.dumps(saved))
    for args, message in (([f'--samples={tmp_path}/none.json'], 'is not a samples file (No such file'),
                          ([f'--samples={tmp_path}/torn.json'], 'is not a samples file'),
                          ([f'--samples={tmp_path}/elsewhere.json', '--control_windows=-1'], 'control_windows=-1 must'),
                          ([f'--samples={tmp_path}/elsewhere.json'], 'tokenizer, is missing')):
        out = run_script(QUALITY, *args, check=False)
        assert out.returncode == 1 and re.fullmatch(r'error: .*\n', out.stderr) and message in out.stderr, (args, out.stderr)


def quality(name):
    return load_function(QUALITY, name, np=np, re=re, groupby=groupby, WORDS=re.compile(r"\w+"))


def test_sample_quality_measures_count_repeats_distinct_tokens_and_seen_bigrams():
    class WordTokenizer:  # one id per word; id 3 ends a document
        vocab = ['alpha ', 'beta ', 'gamma ', '<|endofdoc|>']

        def decode(self, ids):
            return ''.join(self.vocab[i] for i in np.asarray(ids).tolist())

    # two documents: "alpha beta gamma" and "gamma alpha"; "gamma gamma" spans the boundary
    bigrams = quality('training_bigrams')(WordTokenizer(), np.array([0, 1, 2, 3, 2, 0, 3]), 3)

    def row(ids, texts=()):  # -> (longest run, distinct share, bigrams seen, bigrams)
        line = quality('quality_row')('x', ids, list(texts), bigrams)
        longest, distinct, seen, total = re.fullmatch(r'x +(\d+) +([\d.]+) +([\d.]+) \((\d+) bigrams\)', line).groups()
        return int(longest), float(distinct), round(float(seen) * int(total)), int(total)

    assert row([[5, 5, 5, 1, 5, 5]])[0] == 3 and row([[1, 2, 3]])[0] == 1 and row([[7] * 9], )[0] == 9
    assert row([[1, 2], [3, 3, 3, 3, 9]])[0] == 4 and row([[]])[0] == 0  # the longest over all samples
    assert row([[1, 2, 2, 2]])[1] == 0.5 and row([[4, 5, 6]])[1] == 1.0 and row([[1, 2, 2, 2], [4, 5, 6]])[1] == 0.75
    seen = lambda text: row([[0]], [text])[2:]  # noqa: E731
    assert seen('alpha beta, gamma.') == (2, 2) and seen('gamma alpha') == (1, 1)
    assert seen('gamma gamma') == (0, 1)                     # not across documents,
    assert seen('gamma endofdoc gamma') == (0, 2)            # nor with the end-of-document token's name
    assert seen('beta alpha') == (0, 1) and seen('alpha delta beta') == (0, 2) and seen('alpha') == (0, 0)
    assert row([[0]], ['alpha beta', 'beta alpha'])[2:] == (1, 2)  # over all texts


def test_unigram_cross_entropy_is_the_smoothed_training_frequencies_on_val():
    unigram = quality('unigram')
    special = [4]  # vocabulary 0..4, id 4 special: it is neither counted nor scored
    val = np.array([0, 3, 4, 1], dtype=np.uint16)
    counts, ce = unigram(np.array([0, 0, 0, 1, 4, 4, 2, 0], dtype=np.uint16), val, 5, special)
    assert counts.tolist() == [4, 1, 1, 0, 0]
    # add-one over the 4 ordinary ids: p = (5, 2, 2, 1) / 10
    assert ce == pytest.approx(-(math.log(0.5) + math.log(0.1) + math.log(0.2)) / 3)
    # the same numbers whatever the chunking of the count (a split longer than one chunk)
    long = np.tile(np.array([0, 1, 2, 4], dtype=np.uint16), (1 << 22) + 1)
    assert unigram(long, val, 5, special)[0].tolist() == [(1 << 22) + 1] * 3 + [0, 0]
