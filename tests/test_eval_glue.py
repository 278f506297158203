"""eval_glue.py: metrics against hand-computed values, every task's reader on files in the official
layouts, each head learning a tiny synthetic task, checkpoints of every stage and both arms, results
that merge and are never lost, and the command line end to end."""
import json
import math
import sys
import os
import re

import numpy as np
import pytest
import torch

from conftest import run_script

import common
import eval_glue as G
from model import Classifier, ConceptConfig, ConceptDiffusion, ConceptMLM, pooled

# ----------------------------------------------------------------------------------------------
# one checkpoint per stage (and one of the standard arm) on the session's prepared data directory,
# written as the training scripts write them


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny models run fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ckpt(path, data_dir, stage, decoder, encoder='concept'):
    meta = common.load_meta(data_dir)
    special = meta['special_tokens']
    args = dict(vocab_size=meta['vocab_size'], block_size=64, n_layer=2, n_head=2, n_embd=32, n_concepts=8,
                ffn_size=64, decoder=decoder, encoder=encoder, pad_id=special['pad'], mask_id=special['mask'],
                eod_id=special['eod'], cls_id=special['cls'], sep_id=special['sep'])
    torch.manual_seed(0)
    model = (ConceptDiffusion if stage == 'diffusion' else ConceptMLM)(ConceptConfig(**args))
    common.save_checkpoint(path, {'stage': stage, 'model': model.state_dict(), 'model_args': args,
                                  'tokenizer': meta['tokenizer'], 'special_tokens': special,
                                  'data_dir': os.path.abspath(data_dir), 'config': {}, 'iter_num': 0})
    return path


@pytest.fixture(scope='module')
def ckpts(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    return {name: make_ckpt(str(root / name / 'ckpt.pt'), data_dir, stage, decoder, encoder)
            for name, stage, decoder, encoder in [
                ('mlm', 'mlm', 'perceiver', 'concept'), ('tsdae', 'tsdae', 'posonly', 'concept'),
                ('diffusion', 'diffusion', 'diffusion', 'concept'), ('standard', 'mlm', 'perceiver', 'standard')]}


def load(path):
    """(checkpoint dict, its tokenizer), as main() has them."""
    checkpoint = common.load_checkpoint(path)
    return checkpoint, common.checkpoint_tokenizer(checkpoint)


def main(**settings):
    """eval_glue.main in this process, with the defaults a test does not set."""
    G.main({**G.DEFAULTS, 'device': 'cpu', 'dtype': 'float32', 'progress': False, **settings})


# ----------------------------------------------------------------------------------------------
# metrics

def test_metrics_match_hand_computed_values():
    label = [1, 1, 0, 0, 1, 0]
    pred = [1, 0, 0, 1, 1, 0]                       # tp 2, fn 1, fp 1, tn 2
    assert G.accuracy(pred, label) == pytest.approx(4 / 6)
    assert G.f1(pred, label) == pytest.approx(2 / 3)  # 2·2 / (2·2 + 1 + 1)
    assert G.mcc(pred, label) == pytest.approx(1 / 3)  # (4 - 1) / sqrt(3·3·3·3)
    assert G.mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert G.mcc([1, 1, 1], [1, 0, 1]) == 0.0 and G.f1([0, 0], [1, 0]) == 0.0  # constant predictions
    # mean 2.5 and 5; Σdxdy = 11, Σdx² = 5, Σdy² = 26
    assert G.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert G.pearson([3, 3, 3], [1, 2, 3]) == 0.0
    # ties share their average rank: x -> [1, 2.5, 2.5, 4]; r = 4.5 / sqrt(4.5 · 5)
    assert G.rankdata([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    spearman = G.METRICS['spearman']
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([10, 20, 30], [1, 5, 100]) == pytest.approx(1.0)
    assert G.score(pred, label, ('f1', 'accuracy')) == pytest.approx({'f1': 200 / 3, 'accuracy': 400 / 6})
    # majority: the train split's most frequent label, scored on the eval labels
    assert G.majority(np.array([1, 1, 0]), np.array([1, 0, 0, 0]), 2, ('accuracy', 'f1')) == \
        pytest.approx({'accuracy': 25.0, 'f1': 40.0})
    assert G.majority(np.array([1.0, 3.0]), np.array([0.0, 5.0]), 1, ('pearson',)) == {'pearson': 0.0}


# ----------------------------------------------------------------------------------------------
# readers: each task's official layout (with a quote in the text, read literally), plus rows that
# must be skipped: a missing column and an unreadable label

MNLI_HEAD = ['index', 'promptID', 'pairID', 'genre', 'sentence1_binary_parse', 'sentence2_binary_parse',
             'sentence1_parse', 'sentence2_parse', 'sentence1', 'sentence2']
LAYOUTS = {  # task: (folder, header of train, of dev (None: none at all), row from (a, b, label, split))
    'cola': ('CoLA', None, None, lambda a, b, y, s: ['gj04', str(y), '' if y else '*', a]),
    'sst2': ('SST-2', ['sentence', 'label'], ['sentence', 'label'], lambda a, b, y, s: [a, str(y)]),
    'mrpc': ('MRPC', ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'],
             ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'], lambda a, b, y, s: [str(y), '11', '12', a, b]),
    'qqp': ('QQP', ['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
            ['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
            lambda a, b, y, s: ['7', '13', '14', a, b, str(y)]),
    'stsb': ('STS-B', ['index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2', 'sentence1',
                       'sentence2', 'score'],
             ['index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2', 'sentence1', 'sentence2',
              'score'],
             lambda a, b, y, s: ['0', 'main-captions', 'MSRvid', '2012test', '0001', 'none', 'none', a, b, str(y)]),
    'mnli': ('MNLI', MNLI_HEAD + ['label1', 'gold_label'],
             MNLI_HEAD + ['label1', 'label2', 'label3', 'label4', 'label5', 'gold_label'],
             lambda a, b, y, s: ['0', '31193', '31193n', 'government', '( a )', '( b )', '(ROOT a)', '(ROOT b)', a, b]
             + [y] * (2 if s == 'train' else 6)),
    'qnli': ('QNLI', ['index', 'question', 'sentence', 'label'], ['index', 'question', 'sentence', 'label'],
             lambda a, b, y, s: ['0', a, b, y]),
    'rte': ('RTE', ['index', 'sentence1', 'sentence2', 'label'], ['index', 'sentence1', 'sentence2', 'label'],
            lambda a, b, y, s: ['0', a, b, y]),
    'wnli': ('WNLI', ['index', 'sentence1', 'sentence2', 'label'], ['index', 'sentence1', 'sentence2', 'label'],
             lambda a, b, y, s: ['0', a, b, str(y)]),
    'imdb': ('IMDB', ['id', 'sentence', 'label'], ['id', 'sentence', 'label'], lambda a, b, y, s: ['12_7', a, str(y)]),
}


def write_lines(path, rows, extra=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        for row in rows:
            f.write('\t'.join(row) + '\n')
        for line in extra:
            f.write(line + '\n')


def write_task(root, task, split, examples, extra=()):
    """examples: (a, b, label) in the file's own label form; split 'train' or a dev file stem."""
    folder, train_head, dev_head, row = LAYOUTS[task]
    head = train_head if split == 'train' else dev_head
    rows = ([head] if head else []) + [row(a, b, y, split) for a, b, y in examples]
    write_lines(os.path.join(root, folder, f'{split}.tsv'), rows, extra)


LABELS_IN_FILE = {'mnli': ['entailment', 'neutral', 'contradiction'], 'qnli': ['entailment', 'not_entailment'],
                  'rte': ['entailment', 'not_entailment'], 'stsb': [0.0, 2.5, 5.0]}


def eval_stems(task):
    return [stem for stem, _ in (G.TASKS[task].evals or {task: ('dev', 'validation')}).values()]


@pytest.mark.parametrize('task', list(LAYOUTS))
def test_reader_of_each_layout(task, tmp_path):
    labels = LABELS_IN_FILE.get(task, [0, 1, 1])
    good = [(f'He said "yes" {i}.', f'b {i}', labels[i % len(labels)]) for i in range(3)]
    broken = ['only\tthree\tcols' if LAYOUTS[task][1] is None else 'too\tfew',
              '\t'.join(LAYOUTS[task][3]('a', 'b', 'maybe', 'train'))]  # a label that is none
    for split in ['train'] + eval_stems(task):
        write_task(str(tmp_path), task, split, good, broken)
    data = G.load_task(task, str(tmp_path))
    expected_names = ['mnli_m', 'mnli_mm'] if task == 'mnli' else [task]
    assert list(data['evals']) == expected_names
    for split in [data['train'], *data['evals'].values()]:
        assert split['a'] == [a for a, _, _ in good]  # quotes stay literal text
        if task in ('cola', 'sst2', 'imdb'):
            assert split['b'] is None
        else:
            assert split['b'] == [b for _, b, _ in good]
        want = [LABELS_IN_FILE[task].index(y) if isinstance(G.TASKS[task].labels, tuple) else y for _, _, y in good]
        assert split['label'].tolist() == pytest.approx(want)
    assert all(n == 2 for n in data['skipped'].values()) and len(data['skipped']) == 1 + len(expected_names)


def test_a_file_without_its_header_keeps_its_first_row(tmp_path, capsys):
    """Issue 35: the first data row was taken for the header and silently lost (40 rows read as 39)."""
    examples = [(f'a {i}', f'b {i}', 1.0 + i / 10) for i in range(40)]
    write_task(str(tmp_path), 'stsb', 'dev', examples[:5])
    write_lines(str(tmp_path / 'STS-B' / 'train.tsv'), [LAYOUTS['stsb'][3](a, b, y, 'train') for a, b, y in examples])
    data = G.load_task('stsb', str(tmp_path))
    assert len(data['train']['label']) == 40 and data['train']['a'][0] == 'a 0'
    assert 'train.tsv has no header line; its first row is read as data' in capsys.readouterr().out
    write_task(str(tmp_path), 'stsb', 'train', examples)  # with it: the same 40
    assert len(G.load_task('stsb', str(tmp_path))['train']['label']) == 40


def test_files_with_cr_only_line_endings_are_read(tmp_path):
    """Issue 35: a dev.tsv saved with CR line endings read as one line ("no usable examples")."""
    write_task(str(tmp_path), 'sst2', 'train', [('good', None, 1), ('bad', None, 0)])
    (tmp_path / 'SST-2' / 'dev.tsv').write_bytes(b'sentence\tlabel\rfine film\t1\rawful\t0\r')
    data = G.load_task('sst2', str(tmp_path))
    assert data['evals']['sst2']['a'] == ['fine film', 'awful'] and data['evals']['sst2']['label'].tolist() == [1, 0]
    (tmp_path / 'SST-2' / 'train.tsv').write_bytes(b'sentence\tlabel\r\nok\t1\r\nno\t0\r\n')  # CRLF, as before
    assert G.load_task('sst2', str(tmp_path))['train']['a'] == ['ok', 'no']


def test_files_narrower_than_the_task_reads_are_one_clear_error(tmp_path):
    """A header with fewer columns than the task reads: one line naming the file, not an IndexError."""
    os.makedirs(tmp_path / 'STS-B')
    for stem in ('train', 'dev'):
        (tmp_path / 'STS-B' / f'{stem}.tsv').write_text('sentence1\tsentence2\tscore\na\tb\t3.0\n')
    with pytest.raises(common.InputError, match=r'STS-B.train\.tsv has 3 tab-separated columns'):
        G.load_task('stsb', str(tmp_path))


def test_missing_files_and_hub_failures_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(common.InputError, match='RTE.train.tsv not found'):
        G.load_task('rte', str(tmp_path))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    for task in ('mrpc', 'imdb'):  # imdb is not on the hub at all
        with pytest.raises(common.InputError, match='--task_dir'):
            G.load_task(task, '')


def test_hub_columns_and_splits(monkeypatch):
    """The hub path, offline: a stand-in load_dataset returns what the hub's MNLI holds."""
    import datasets
    calls = []

    def fake(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        rows = {'premise': ['p1', 'p2', 'p3'], 'hypothesis': ['h1', 'h2', 'h3'], 'label': [2, 0, -1]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows)
                                     for s in ('train', 'validation_matched', 'validation_mismatched')})
    monkeypatch.setattr(datasets, 'load_dataset', fake)
    mnli = G.load_task('mnli')
    assert calls[0] == ('nyu-mll/glue', 'mnli', {}) and list(mnli['evals']) == ['mnli_m', 'mnli_mm']
    assert mnli['train']['a'] == ['p1', 'p2'] and mnli['train']['b'] == ['h1', 'h2']
    assert mnli['train']['label'].tolist() == [2, 0] and mnli['skipped']['train'] == 1  # -1: no label


class WordTokenizer:
    """A stand-in tokenizer: the text '7' is 7 tokens 0..6."""
    cls_id, sep_id, pad_id = 100, 101, 102

    def encode_batch(self, texts):
        return [list(range(int(t))) for t in texts]


def test_subset_truncation_and_the_task_length():
    split = G.make_split([str(i) for i in range(10)], None, [i % 2 for i in range(10)], 'sst2')
    small = G.subset(split, 4)
    assert len(small['a']) == 4 and small['a'] == sorted(small['a'], key=int)  # in file order
    assert small['label'].tolist() == [int(a) % 2 for a in small['a']]
    assert G.subset(split, 4)['a'] == small['a'] and G.subset(split, 0) is split  # fixed seed; 0 = all

    def joined(a, b, max_len):  # '[cls] a [sep] b': the longer text is cut first (BERT)
        x = G.tokenize(WordTokenizer(), {'a': [a], 'b': [b]}, True, max_len)['x'][0]
        return x.index(101) - 1, len(x) - x.index(101) - 1
    assert joined('10', '3', 10) == (5, 3) and joined('10', '10', 9) == (4, 3) and joined('2', '1', 10) == (2, 1)
    apart = G.tokenize(WordTokenizer(), {'a': ['10'], 'b': ['3']}, False, 4)
    assert apart['x'] == [[100, 0, 1, 2]] and apart['x_b'] == [[100, 0, 1, 2]]
    # imdb reads whole texts (positions are sinusoids: no cap at the model's training window)
    assert G.max_tokens(None, 128) == 128 and G.max_tokens(G.TASKS['imdb'].length, 8) == sys.maxsize


# ----------------------------------------------------------------------------------------------
# checkpoints of every stage load, and encode() gives padding-independent embeddings

@pytest.mark.parametrize('stage', ['mlm', 'tsdae', 'diffusion', 'standard'])
def test_checkpoint_of_each_stage_loads_and_encodes(ckpts, stage):
    model, _ = common.load_model(ckpts[stage])
    assert isinstance(model, ConceptDiffusion if stage == 'diffusion' else ConceptMLM)
    texts = ['Return the sum of an array.', 'A much longer sentence about tensors, files and sockets, ' * 3]
    emb = G.encode(texts, ckpts[stage])
    assert emb.shape == (2, 32) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    alone = G.encode(texts[:1], ckpts[stage])  # padded in a batch with a longer text, or not at all
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-4, atol=1e-5)
    cached = [m for m, _ in G._encoders.values()]
    G.encode('again', ckpts[stage])
    assert [m for m, _ in G._encoders.values()] == cached and len(cached) <= 2  # loaded once


def test_moved_tokenizer_directory_says_what_to_pass(ckpts, data_dir, tmp_path):
    checkpoint = torch.load(ckpts['mlm'], weights_only=True)
    checkpoint['data_dir'] = str(tmp_path / 'moved_away')
    path = str(tmp_path / 'ckpt.pt')
    common.save_checkpoint(path, checkpoint)
    with pytest.raises(common.InputError, match='--data_dir'):
        G.encode(['a sentence'], path)
    assert G.encode(['a sentence'], path, data_dir=data_dir).shape == (1, 32)


# ----------------------------------------------------------------------------------------------
# each head learns a synthetic task: the label is which keyword a sentence contains

FILLER = 'the module returns a value for each index of the array and the default object'.split()


def sentence(rng, keyword, n=6):
    words = list(rng.choice(FILLER, size=n))
    words.insert(int(rng.integers(0, n + 1)), keyword)
    return ' '.join(words)


def synthetic(n, seed, pair=False, regression=False):
    """(a, b, label): label 1 when the keyword is 'tensor', 0 for 'socket' (in b for pair tasks)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = int(rng.integers(0, 2))
        key = 'tensor' if y else 'socket'
        if pair:
            out.append((sentence(rng, 'file'), sentence(rng, key), y))
        else:
            out.append((sentence(rng, key), None, 4.0 * y + 0.5 if regression else y))
    return out


def synthetic_data(pair=False, regression=False, n_train=160, n_eval=64):
    task = 'stsb' if regression else ('mrpc' if pair else 'sst2')
    split = lambda ex: G.make_split([a for a, _, _ in ex], [b for _, b, _ in ex] if pair else None,  # noqa: E731
                                    [y for _, _, y in ex], task)
    return {'task': 'synthetic', 'metrics': G.TASKS[task].metrics if not pair else ('accuracy',),
            'n_labels': G.n_labels(task), 'epochs': 4, 'train': split(synthetic(n_train, 1, pair, regression)),
            'evals': {'synthetic': split(synthetic(n_eval, 2, pair, regression))}, 'skipped': {}}


FAST = dict(learning_rate=3e-3, head_learning_rate=0.0, batch_size=16, dropout=0.0, epochs=4, warmup_steps=4)


@pytest.mark.parametrize('stage,head,pair', [('mlm', 'pool', False), ('mlm', 'pair', True), ('mlm', 'decoder', False),
                                             ('tsdae', 'decoder', False),
                                             ('diffusion', 'decoder', False), ('standard', 'pool', True)])
def test_each_head_learns_a_synthetic_task(ckpts, stage, head, pair):
    checkpoint, tok = load(ckpts[stage])
    res = G.evaluate_task(checkpoint, tok, synthetic_data(pair), head, seeds=(0,), hp=FAST)['synthetic']
    assert res['accuracy'] > 80, res['per_seed']
    assert res['majority']['accuracy'] < 65 and res['n_train'] == 160 and res['n_eval'] == 64
    assert res['best_epoch']['accuracy'] >= res['accuracy'] and 1 <= res['best_epoch']['epoch'][0] <= 4
    losses = res['per_seed']['0']['train_loss']
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_regression_and_seeds(ckpts):
    checkpoint, tok = load(ckpts['mlm'])
    res = G.evaluate_task(checkpoint, tok, synthetic_data(regression=True, n_train=96, n_eval=48), 'pool',
                          seeds=(0, 1), hp={**FAST, 'epochs': 3})['synthetic']
    assert res['pearson'] > 50 and res['spearman'] > 50, res['per_seed']
    assert res['majority'] == {'pearson': 0.0, 'spearman': 0.0}
    assert res['std']['pearson'] > 0 and res['seeds'] == [0, 1] and len(res['best_epoch']['epoch']) == 2
    table = G.markdown_table({'synthetic': res})
    assert '| synthetic | pearson |' in table and ' ± ' in table


def test_cosine_head_needs_no_training(ckpts):
    """Pairs of identical sentences score 5, others 0: even an untrained encoder ranks them."""
    checkpoint, tok = load(ckpts['mlm'])
    rng = np.random.default_rng(0)
    ex = []
    for i in range(40):
        a = sentence(rng, 'tensor')
        ex.append((a, a if i % 2 else sentence(rng, 'socket'), 5.0 if i % 2 else 0.0))
    split = G.make_split([a for a, _, _ in ex], [b for _, b, _ in ex], [y for _, _, y in ex], 'stsb')
    data = {'task': 'stsb', 'metrics': ('pearson', 'spearman'), 'n_labels': 1, 'epochs': 5, 'train': split,
            'evals': {'stsb': split}, 'skipped': {}}
    res = G.evaluate_task(checkpoint, tok, data, 'cosine')['stsb']
    assert math.isfinite(res['spearman']) and res['spearman'] > 50 and res['n_train'] == 0
    with pytest.raises(common.InputError, match='cosine'):
        G.evaluate_task(checkpoint, tok, synthetic_data(), 'cosine')


def test_imdb_reads_whole_texts_where_the_sentence_tasks_stop_at_max_len(ckpts):
    """The label word at the end of a 40-word review: cut at max_len=4 it is gone (chance); imdb reads
    the whole review (up to the model's 64 positions) and the probe finds it."""
    checkpoint, tok = load(ckpts['mlm'])
    rng = np.random.default_rng(0)

    def reviews(n):
        ys = rng.integers(0, 2, size=n)
        return G.make_split([' '.join(rng.choice(FILLER, size=40)) + (' tensor' if y else ' socket') for y in ys],
                            None, ys, 'imdb')
    data = {'task': 'imdb', 'metrics': ('accuracy',), 'n_labels': 2, 'epochs': 1, 'train': reviews(120),
            'evals': {'imdb': reviews(60)}, 'skipped': {}}
    short = G.evaluate_task(checkpoint, tok, {**data, 'length': None}, 'probe', hp={'max_len': 4})['imdb']
    whole = G.evaluate_task(checkpoint, tok, {**data, 'length': G.TASKS['imdb'].length}, 'probe',
                            hp={'max_len': 4})['imdb']
    assert whole['accuracy'] > 80 and short['accuracy'] < 70, (whole['accuracy'], short['accuracy'])


# ----------------------------------------------------------------------------------------------
# the command line on a GLUE-layout directory

def test_cli_on_a_glue_layout_directory(ckpts, tmp_path):
    root = str(tmp_path / 'glue')
    for task in ('sst2', 'cola', 'mrpc', 'rte', 'stsb'):
        pair = task in ('mrpc', 'rte', 'stsb')
        for split, n, seed in (('train', 48, 1), ('dev', 24, 2)):
            ex = synthetic(n, seed, pair)
            if task == 'rte':
                ex = [(a, b, G.TASKS['rte'].labels[y]) for a, b, y in ex]
            if task == 'stsb':
                ex = [(a, b, 4.0 * y + 0.5) for a, b, y in ex]
            write_task(root, task, split, ex, extra=['malformed'])
    out = str(tmp_path / 'r.json')
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}',
                     '--tasks=stsb,mrpc,rte,sst2,cola', '--head=pool', f'--out={out}', '--device=cpu',
                     '--dtype=float32', '--epochs=1', '--progress=False')
    content = json.load(open(out))
    results = content['results']
    want = {'stsb': ['pearson', 'spearman'], 'mrpc': ['f1', 'accuracy'], 'rte': ['accuracy'],
            'sst2': ['accuracy'], 'cola': ['mcc']}
    assert list(results) == list(want)
    for task, metrics in want.items():
        r = results[task]
        for m in metrics:
            assert math.isfinite(r[m]) and m in r['majority']
        assert r['n_train'] == 48 and r['n_eval'] == 24 and r['seconds'] > 0
        assert sum(r['skipped'].values()) == 2  # the 'malformed' line of train.tsv and of dev.tsv
    assert content['run']['ckpt'] == os.path.abspath(ckpts['mlm']) and content['run']['head'] == 'pool'
    assert content['run']['epochs'] == 1 and content['run']['seeds'] == [42] and content['run']['dtype'] == 'float32'
    assert G.markdown_table(content) in run.stdout and '| cola | mcc |' in run.stdout
    cosine_out = str(tmp_path / 'c.json')
    run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}', '--tasks=stsb', '--head=cosine',
               f'--out={cosine_out}', '--device=cpu', '--dtype=float32')
    results = json.load(open(cosine_out))['results']
    assert list(results) == ['stsb'] and math.isfinite(results['stsb']['spearman'])
    bad = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}', '--tasks=mrpc',
                     '--head=cosine', check=False)
    assert bad.returncode != 0 and 'stsb only' in bad.stderr and 'Traceback' not in bad.stderr


def test_cli_probe_with_random_init_control(ckpts, tmp_path):
    root = str(tmp_path / 'glue')
    for task in ('sst2', 'stsb'):
        for split, n, seed in (('train', 40, 1), ('dev', 20, 2)):
            ex = synthetic(n, seed, task == 'stsb')
            write_task(root, task, split, [(a, b, 4.0 * y + 0.5) for a, b, y in ex] if task == 'stsb' else ex)
    out = str(tmp_path / 'p.json')
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}', '--tasks=sst2,stsb',
                     '--head=probe', '--control=random_init', '--seeds=1,2', f'--out={out}', '--device=cpu',
                     '--dtype=float32')
    results = json.load(open(out))['results']
    for task, m in (('sst2', 'accuracy'), ('stsb', 'pearson')):
        r = results[task]
        assert all(math.isfinite(x[m]) for x in (r, r['majority'], r['bow'], r['random_init']))
        assert r['random_init']['seeds'] == [1, 2] and r['head'] == 'probe'
    assert '| sst2 | accuracy | probe |' in run.stdout and 'maj' in run.stdout
    bad = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}', '--control=random',
                     check=False)
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr and "control='random': choose one of" in bad.stderr


# ----------------------------------------------------------------------------------------------
# bad settings and data: one clear line at startup, before anything is loaded or trained

@pytest.mark.parametrize('settings,match', [
    ({'seeds': 'a'}, 'seeds'), ({'seeds': '1.5'}, 'seeds'), ({'seeds': ''}, 'seeds'), ({'seeds': '-1'}, 'seeds'),
    ({'seeds': '42,42'}, 'distinct'), ({'seeds': str(2 ** 63)}, r'2\*\*63 - 1'), ({'epochs': -1}, 'epochs'),
    ({'batch_size': 0}, 'batch_size'), ({'eval_batch_size': 0}, 'eval_batch_size'),
    ({'learning_rate': -1.0}, 'learning_rate'), ({'learning_rate': float('inf')}, 'not a finite number'),
    ({'dropout': 1.0}, 'dropout'), ({'max_len': 1}, 'max_len'), ({'max_len': 0}, 'max_len'),
    ({'max_train_examples': -5}, 'max_train_examples=-5 must be >= 0'), ({'max_eval_examples': -1}, 'max_eval'),
    ({'head': 'mlp'}, "head='mlp'"),
    ({'tasks': 'sst2,glu'}, r'unknown task\(s\) glu'), ({'tasks': 'imdb'}, 'imdb is not read from the hub'),
    ({'head': 'pool', 'tasks': 'sst2,rte', 'max_len': 3}, r"\[sep\] b'.*max_len >= 4")])
def test_settings_out_of_range_are_one_clear_error(settings, match):
    with pytest.raises(common.InputError, match=match):
        main(ckpt='/nonexistent/ckpt.pt', **settings)


def test_settings_in_range_reach_the_checkpoint(tmp_path):
    """Every check passed: the next line is about the (missing) checkpoint, not a setting."""
    for settings in ({'seeds': '1, 2,3,'}, {'seeds': str(2 ** 63 - 1), 'epochs': 0, 'dropout': 0.0, 'max_len': 2},
                     {'head': 'pair', 'tasks': 'rte', 'max_len': 3}, {'tasks': 'glue,all,sst2'}):
        with pytest.raises(common.InputError, match='checkpoint /nonexistent/ckpt.pt not found'):
            main(ckpt='/nonexistent/ckpt.pt', out=str(tmp_path / 'r.json'), **settings)


def test_the_task_folder_passed_as_data_dir_says_task_dir(tmp_path):
    """--data_dir named the task folder before it named the tokenizer's folder."""
    glue_dir(tmp_path, ('sst2',))
    with pytest.raises(common.InputError, match=f'--data_dir={tmp_path} holds task folders: pass it as --task_dir'):
        main(data_dir=str(tmp_path), tasks='sst2')


def test_a_seed_past_64_bits_is_one_line_on_the_command_line(ckpts):
    """Issue 35: torch.manual_seed raised 'Overflow when unpacking long long'."""
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', '--seeds=99999999999999999999', check=False)
    assert run.returncode == 1 and 'Traceback' not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: seeds='99999999999999999999' must be")


def test_decoder_head_on_a_standard_arm_checkpoint_is_refused(ckpts, tmp_path):
    """Issue 35: it ran an unweighted mean of token states and called it 'decoder'."""
    with pytest.raises(common.InputError, match="head=decoder reads a concept decoder.*encoder='standard'"):
        main(ckpt=ckpts['standard'], head='decoder', tasks='sst2', task_dir=str(tmp_path), out=str(tmp_path / 'r.json'))
    assert os.listdir(tmp_path) == []  # refused before any task was read or file written


def test_max_len_too_short_for_encode_and_evaluate_task(ckpts):
    for max_len in (1, 0):
        with pytest.raises(common.InputError, match='max_len'):
            G.encode(['a sentence'], ckpts['mlm'], max_len=max_len)
    checkpoint, tok = load(ckpts['mlm'])
    with pytest.raises(common.InputError, match='max_len'):
        G.evaluate_task(checkpoint, tok, synthetic_data(pair=True, n_train=8, n_eval=4), 'pool',
                        hp={**FAST, 'max_len': 3})


def test_numeric_labels_in_a_word_labelled_file_name_the_expected_words(tmp_path):
    for split in ('train', 'dev'):
        write_task(str(tmp_path), 'rte', split, [('a', 'b', '0'), ('c', 'd', '1')])
    with pytest.raises(common.InputError, match='one of entailment, not_entailment'):
        G.load_task('rte', str(tmp_path))


@pytest.mark.parametrize('case', ['bad_seeds', 'missing_second_task', 'out_is_a_directory'])
def test_cli_fails_fast_before_any_fine_tuning(ckpts, tmp_path, case):
    root = str(tmp_path / 'glue')
    for split, seed in (('train', 1), ('dev', 2)):
        write_task(root, 'sst2', split, synthetic(16, seed))  # and no QQP folder
    extra, message = {'bad_seeds': (['--tasks=sst2', '--seeds=a'], 'seeds='),
                      'missing_second_task': (['--tasks=sst2,qqp', f'--out={tmp_path / "r.json"}'], 'QQP'),
                      'out_is_a_directory': (['--tasks=sst2', f'--out={tmp_path}'], 'is a directory')}[case]
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--task_dir={root}', '--device=cpu',
                     '--dtype=float32', '--epochs=1', *extra, check=False)
    assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr
    assert message in run.stderr.strip().splitlines()[-1], run.stderr
    assert 'epoch 1/1' not in run.stdout and '| task |' not in run.stdout  # nothing was trained


# ----------------------------------------------------------------------------------------------
# the linear models of the probe and of the bag-of-words control

def test_ridge_is_the_closed_form_solution_in_primal_and_dual_dense_and_sparse():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5)) * (rng.random((30, 5)) < 0.5)  # half zeros, so the sparse form differs
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0 + 0.1 * rng.normal(size=30)
    lam = 0.3
    Xc, yc = X - X.mean(0), y - y.mean()
    w_ref = np.linalg.solve(Xc.T @ Xc / 30 + lam * np.eye(5), Xc.T @ yc / 30)
    b_ref = y.mean() - X.mean(0) @ w_ref
    dense = torch.tensor(X)
    sparse = dense.to_sparse().coalesce()
    for Xt in (dense, sparse):  # dense d <= n: the primal; sparse: the dual with the centring folded in
        w, b = G.fit_ridge(Xt, y, lam)
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-8)
        assert float(b) == pytest.approx(b_ref, rel=1e-6)
    wide = torch.tensor(np.hstack([X, X[:, :1] * 2]))[:4]  # d = 6 > n = 4: the dual, dense
    w, b = G.fit_ridge(wide, y[:4], lam)
    Wc = wide.numpy() - wide.numpy().mean(0)
    w_ref = np.linalg.solve(Wc.T @ Wc / 4 + lam * np.eye(6), Wc.T @ (y[:4] - y[:4].mean()) / 4)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-8)
    assert G.linear_predict((w, b), wide).shape == (4,)


def test_logistic_regression_reaches_the_regularised_optimum():
    """At the L-BFGS solution the gradient of mean cross-entropy + (λ/2)|W|² is zero, dense or sparse."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 4))
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=60) > 0).astype(np.int64) + (X[:, 2] > 1.2)  # 3 classes
    for Xt in (torch.tensor(X), torch.tensor(X).to_sparse().coalesce()):
        fitted = G.fit_logistic(Xt, y, 3, 0.01)
        W, b = (t.double().requires_grad_(True) for t in fitted)
        loss = torch.nn.functional.cross_entropy(torch.tensor(X) @ W + b, torch.tensor(y)) + 0.005 * (W * W).sum()
        loss.backward()
        assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4
        assert G.accuracy(G.linear_predict(fitted, Xt), y) > 0.8


def test_probe_regularisation_is_chosen_on_a_holdout_of_train_never_on_dev(ckpts):
    """The dev labels are only ever scored: shuffling them changes the dev score, never λ."""
    checkpoint, tok = load(ckpts['mlm'])
    res = G.evaluate_task(checkpoint, tok, synthetic_data(n_train=80, n_eval=40), 'probe')['synthetic']
    shuffled = synthetic_data(n_train=80, n_eval=40)
    ev = shuffled['evals']['synthetic']
    ev['label'] = np.random.default_rng(0).permutation(ev['label'])
    res2 = G.evaluate_task(checkpoint, tok, shuffled, 'probe')['synthetic']
    assert res['probe_lambda'] == res2['probe_lambda'] and res['bow_lambda'] == res2['bow_lambda']
    assert res['accuracy'] != res2['accuracy']
    fit, hold = G.holdout_split(80)
    assert len(hold) == 16 and not set(fit) & set(hold) and len(fit) + len(hold) == 80
    assert G.holdout_split(80)[1].tolist() == hold.tolist()  # the same split every time


def test_tfidf_of_unigrams_and_bigrams_by_hand():
    vec = G.TfIdf(['the cat sat', 'the cat ran', 'a dog'])  # df: the 2, cat 2, 'the cat' 2; the rest 1
    assert sorted(vec.index) == ['cat', 'the', 'the cat']
    idf = math.log(4 / 3) + 1
    assert vec.idf['the'] == pytest.approx(idf)
    row = vec.rows(['The cat, the CAT!'])[0]  # the 2, cat 2, 'the cat' 2 ('cat the' is not kept)
    assert {vec.index['the']: 2, vec.index['cat']: 2, vec.index['the cat']: 2}.keys() == row.keys()
    assert all(v == pytest.approx(1 / math.sqrt(3)) for v in row.values())
    assert vec.rows(['unknown words'])[0] == {}


def test_bow_pair_features_are_a_b_absdiff_product():
    vec = G.TfIdf(['x y', 'x y', 'y z', 'y z'])  # x, y, z, 'x y', 'y z': V = 5
    X = G.bow_features(vec, {'a': ['x y'], 'b': ['y z'], 'label': np.array([1])}).to_dense()[0]
    a, b = (G.bow_features(vec, {'a': [t], 'b': None}).to_dense()[0] for t in ('x y', 'y z'))
    assert a.shape == (5,) and a.sum() > 0
    torch.testing.assert_close(X, torch.cat([a, b, (a - b).abs(), a * b]))


def test_probe_and_bow_learn_a_synthetic_task_with_every_control(ckpts):
    checkpoint, tok = load(ckpts['mlm'])
    for pair in (False, True):
        res = G.evaluate_task(checkpoint, tok, synthetic_data(pair), 'probe', seeds=(0, 1),
                              control='random_init')['synthetic']
        assert res['bow']['accuracy'] > 90  # the label is a word: the bag of words must find it
        assert res['accuracy'] > 75, res
        assert res['seeds'] == [0] and res['std']['accuracy'] == 0.0  # a pretrained probe is deterministic
        rand = res['random_init']
        assert rand['seeds'] == [0, 1] and math.isfinite(rand['accuracy'])
        last = [rand['per_seed'][s]['scores'][-1]['accuracy'] for s in ('0', '1')]  # kept, to combine split runs
        assert abs(sum(last) / 2 - rand['accuracy']) < 1e-3
        assert res['majority']['accuracy'] < 65 and res['head'] == 'probe' and res['control'] == 'random_init'
    res = G.evaluate_task(checkpoint, tok, synthetic_data(regression=True), 'probe')['synthetic']
    assert res['pearson'] > 50 and res['bow']['pearson'] > 90 and 'random_init' not in res


def test_controls_are_marked_against_each_score():
    e = {'accuracy': 70.0, 'std': {'accuracy': 1.0}, 'majority': {'accuracy': 50.0}, 'bow': {'accuracy': 73.0},
         'random_init': {'accuracy': 69.5, 'std': {'accuracy': 0.2}, 'seeds': [1, 2]}, 'seeds': [1, 2], 'head': 'pool',
         'n_train': 10, 'n_eval': 5, 'seconds': 1.0}
    assert G.versus(e, 'accuracy') == '>maj <bow <rand'  # 0.5 above random init is within the 1.0 spread
    e['random_init']['accuracy'] = 68.0
    assert G.versus(e, 'accuracy') == '>maj <bow >rand'
    row = G.markdown_table({'run': {}, 'results': {'sst2': e}}).splitlines()[-1]  # a results file's content
    assert '| 70.0 ± 1.0 |' in row and '| 73.0 |' in row and '| 68.0 ± 0.2 |' in row and '>maj <bow >rand' in row
    assert G.markdown_table({'sst2': e}) == G.markdown_table({'run': {}, 'results': {'sst2': e}})  # older files


# ----------------------------------------------------------------------------------------------
# one pooling function for both encoder arms; the random-init control; the head's learning rate

class TokenStateEncoder(torch.nn.Module):
    """A stand-in for the standard arm: encoder(idx, mask) returns token states (B, N, H)."""

    def forward(self, idx, mask):
        return torch.stack([idx.float(), 2 * idx.float()], dim=-1)  # (B, N, 2)


def test_pooling_ignores_padding_for_token_states_and_means_concepts():
    from types import SimpleNamespace
    standard = SimpleNamespace(cfg=SimpleNamespace(encoder='standard', n_embd=2), encoder=TokenStateEncoder())
    idx = torch.tensor([[1, 3, 99, 99], [2, 4, 6, 8]])
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    torch.testing.assert_close(pooled(standard, idx, mask), torch.tensor([[2.0, 4.0], [5.0, 10.0]]))
    concept = SimpleNamespace(cfg=SimpleNamespace(n_embd=2), encoder=TokenStateEncoder())  # no .encoder: concepts
    torch.testing.assert_close(pooled(concept, idx, mask), torch.tensor([[50.5, 101.0], [5.0, 10.0]]))
    scorer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        scorer.weight.fill_(10.0)
        scorer.bias.zero_()
        assert pooled(standard, idx, mask, scorer)[0, 0].item() == pytest.approx(3.0, abs=1e-3)  # 99s get none


class Captured:
    """The classifiers that fine-tuning builds, kept for a look inside."""

    def __init__(self, monkeypatch):
        self.clfs, original = [], Classifier.__init__

        def keep(clf, *args, **kwargs):
            original(clf, *args, **kwargs)
            self.clfs.append(clf)
        monkeypatch.setattr(Classifier, '__init__', keep)


def test_random_init_control_is_the_same_architecture_untrained(ckpts, monkeypatch):
    checkpoint, tok = load(ckpts['mlm'])
    checkpoint = {**checkpoint, 'model': {k: v + 1.0 if v.is_floating_point() else v
                                          for k, v in checkpoint['model'].items()}}  # "trained"
    captured = Captured(monkeypatch)
    for _ in range(2):
        G.evaluate_task(checkpoint, tok, synthetic_data(n_train=16, n_eval=8), 'pool', seeds=(3,),
                        hp={**FAST, 'epochs': 1, 'learning_rate': 1e-12, 'head_learning_rate': 1e-12},
                        control='random_init')
    trained, untrained, _, again = (clf.model.state_dict() for clf in captured.clfs)
    assert trained.keys() == untrained.keys() and type(captured.clfs[1].model) is type(captured.clfs[0].model)
    assert all(torch.equal(untrained[k], again[k]) for k in untrained)  # drawn from the seed
    assert not torch.equal(untrained['encoder.wte.weight'], trained['encoder.wte.weight'])
    torch.testing.assert_close(trained['encoder.wte.weight'], checkpoint['model']['encoder.wte.weight'])


def test_head_learning_rate_moves_the_head_while_the_encoder_barely_moves(ckpts, monkeypatch):
    checkpoint, tok = load(ckpts['mlm'])
    captured = Captured(monkeypatch)
    res = G.evaluate_task(checkpoint, tok, synthetic_data(n_train=64, n_eval=32), 'pool', seeds=(0,),
                          hp={**FAST, 'learning_rate': 1e-9, 'head_learning_rate': 3e-2})['synthetic']
    moved = max((captured.clfs[0].model.state_dict()[k] - v).abs().max().item() for k, v in checkpoint['model'].items())
    assert moved < 1e-5 and res['per_seed']['0']['train_loss'][-1] < res['per_seed']['0']['train_loss'][0]


# ----------------------------------------------------------------------------------------------
# results: written after every task, merged into a file of the same run, never lost

def glue_dir(root, tasks=('sst2', 'mrpc')):
    for task in tasks:
        for split, n, seed in (('train', 32, 1), ('dev', 16, 2)):
            write_task(str(root), task, split, synthetic(n, seed, task == 'mrpc'))
    return str(root)


def test_a_rerun_merges_into_the_results_of_the_same_run(ckpts, tmp_path, capsys):
    """Issue 35: rerunning the task an interrupted run missed replaced the file, losing the others."""
    root, out = glue_dir(tmp_path / 'glue'), str(tmp_path / 'r.json')
    main(ckpt=ckpts['mlm'], task_dir=root, tasks='sst2', head='probe', out=out)
    main(ckpt=ckpts['mlm'], task_dir=root, tasks='mrpc', head='probe', out=out)
    first = json.load(open(out))
    assert list(first['results']) == ['sst2', 'mrpc']
    main(ckpt=ckpts['mlm'], task_dir=root, tasks='sst2', head='probe', out=out)  # a task again: its entry only
    again = json.load(open(out))
    assert list(again['results']) == ['sst2', 'mrpc'] and again['results']['mrpc'] == first['results']['mrpc']
    assert again['results']['sst2']['accuracy'] == first['results']['sst2']['accuracy']
    assert '| mrpc | f1 | probe |' in capsys.readouterr().out.split('wrote')[-2]  # the table shows both


def test_the_default_out_keeps_runs_of_different_tasks(ckpts, tmp_path):
    ckpt = str(tmp_path / 'run' / 'ckpt.pt')
    common.save_checkpoint(ckpt, common.load_checkpoint(ckpts['mlm']))
    root = glue_dir(tmp_path / 'glue')
    for task in ('sst2', 'mrpc'):
        main(ckpt=ckpt, task_dir=root, tasks=task, head='probe')
    assert list(json.load(open(tmp_path / 'run' / 'glue_probe.json'))['results']) == ['sst2', 'mrpc']


@pytest.mark.parametrize('change,named', [({'max_len': 32}, 'max_len 128 there, 32 here'),
                                          ({'seeds': '1,2'}, 'seeds [42] there, [1, 2] here'),
                                          ({'ckpt': 'tsdae'}, 'ckpt'), ({'head': 'pool'}, "head 'probe' there")])
def test_results_of_another_run_are_refused_before_any_work(ckpts, tmp_path, change, named):
    root, out = glue_dir(tmp_path / 'glue'), str(tmp_path / 'r.json')
    main(ckpt=ckpts['mlm'], task_dir=root, tasks='sst2', head='probe', out=out)
    before = open(out).read()
    settings = {'ckpt': ckpts['mlm'], 'task_dir': root, 'tasks': 'mrpc', 'head': 'probe', 'out': out, **change}
    settings['ckpt'] = ckpts.get(settings['ckpt'], settings['ckpt'])
    with pytest.raises(common.InputError, match=f"holds the results of another run.*{re.escape(named)}.*another --out"):
        main(**settings)
    assert open(out).read() == before


@pytest.mark.parametrize('content,match', [('{"torn', 'JSONDecodeError'), ('[1, 2]', 'TypeError'),
                                           ('{"sst2": {"accuracy": 70, "majority": {}}}', "KeyError: 'run'")])
def test_a_file_that_is_not_this_runs_results_is_never_overwritten(ckpts, tmp_path, content, match):
    out = tmp_path / 'r.json'
    out.write_text(content)
    with pytest.raises(common.InputError, match=f'is not a results file that records its run .{match}'):
        main(ckpt=ckpts['mlm'], task_dir=glue_dir(tmp_path / 'glue'), tasks='sst2', head='probe', out=str(out))
    assert out.read_text() == content


@pytest.mark.parametrize('control', ['', 'random_init'])
def test_ctrl_c_says_in_one_line_what_is_kept(ckpts, tmp_path, monkeypatch, capsys, control):
    """Issue 35: Ctrl-C printed a KeyboardInterrupt traceback; the finished tasks were kept silently."""
    root, out = glue_dir(tmp_path / 'glue'), tmp_path / 'r.json'
    (tmp_path / 'r.json.tmp.999999999').write_text('{"torn')  # left by a run killed mid-write (no such process)
    real = G.frozen

    def interrupted_at_mrpc(checkpoint, data, head, seed, hp, device, autocast, random_init):
        if data['task'] == 'mrpc' and random_init == bool(control):  # in the random-init control, if it runs
            raise KeyboardInterrupt
        return real(checkpoint, data, head, seed, hp, device, autocast, random_init)
    monkeypatch.setattr(G, 'frozen', interrupted_at_mrpc)
    with pytest.raises(SystemExit) as e:
        main(ckpt=ckpts['mlm'], task_dir=root, tasks='sst2,mrpc', head='probe', control=control, out=str(out))
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted; sst2 kept in {out}"
    assert list(json.load(open(out))['results']) == ['sst2']
    assert sorted(os.listdir(tmp_path)) == ['glue', 'r.json']  # the stray temporary is gone, no new one
    out.unlink()
    with pytest.raises(SystemExit):
        main(ckpt=ckpts['mlm'], task_dir=root, tasks='mrpc', head='probe', control=control, out=str(out))
    assert capsys.readouterr().err.strip().endswith('interrupted; nothing was written') and not out.exists()


# ----------------------------------------------------------------------------------------------
# IMDB: a dev split carved once from its train.tsv, then read like the GLUE tasks

def write_imdb(path, n, seed=0, repeats=0):
    """n labelled reviews (the last `repeats` repeat earlier texts, as aclImdb does), IMDB's columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.integers(0, 2))
        text = rows[i - (n - repeats)][1] if i >= n - repeats else sentence(rng, 'tensor' if y else 'socket', 30)
        rows.append([f'{i}_{7 if y else 2}', text, str(y)])
    write_lines(str(path), [['id', 'sentence', 'label']] + rows)
    return rows


def test_imdb_split_is_disjoint_fixed_and_made_once(tmp_path):
    rows = write_imdb(tmp_path / 'aclimdb' / 'train.tsv', 2500, repeats=40)
    run = run_script('eval_glue.py', f'--make_imdb_split={tmp_path}/aclimdb/train.tsv', f'--task_dir={tmp_path}/a')
    assert "keep dev.tsv's text out of pretraining" in run.stdout
    G.split_imdb(f'{tmp_path}/aclimdb/train.tsv', f'{tmp_path}/b')
    parts = {}
    for name in ('train', 'dev'):
        text = open(tmp_path / 'a' / 'IMDB' / f'{name}.tsv').read()
        assert text == open(tmp_path / 'b' / 'IMDB' / f'{name}.tsv').read()  # the same seed, the same split
        lines = text.splitlines()
        assert lines[0] == 'id\tsentence\tlabel'
        parts[name] = [line.split('\t') for line in lines[1:]]
    train, dev = parts['train'], parts['dev']
    assert 2000 <= len(dev) <= 2002 and len(train) + len(dev) == 2500 and sorted(train + dev) == sorted(rows)
    assert not {r[0] for r in train} & {r[0] for r in dev} and not {r[1] for r in train} & {r[1] for r in dev}
    again = run_script('eval_glue.py', f'--make_imdb_split={tmp_path}/aclimdb/train.tsv', f'--task_dir={tmp_path}/a',
                       check=False)
    assert again.returncode == 1 and 'exists: a split is made once' in again.stderr and 'Traceback' not in again.stderr
    with pytest.raises(common.InputError, match='has 2500 reviews, too few for a dev split of 5000'):
        G.split_imdb(f'{tmp_path}/aclimdb/train.tsv', f'{tmp_path}/c', n_dev=5000)
    with pytest.raises(common.InputError, match='pass --task_dir'):
        main(make_imdb_split=f'{tmp_path}/aclimdb/train.tsv')
    assert sorted(os.listdir(tmp_path)) == ['a', 'aclimdb', 'b']


def test_imdb_split_keeps_a_pretraining_corpus_out_of_dev(tmp_path):
    """--imdb_exclude: a review that is also a document of the pretraining corpus stays in train."""
    import lzma
    rows = write_imdb(tmp_path / 'train.tsv', 3300)
    corpus = [r[1] for r in rows[::3]]  # a third of the reviews, unlabelled, in an .xz corpus
    with lzma.open(tmp_path / 'unsup.txt.xz', 'wt') as f:
        f.write('\n\n'.join(corpus + ['another review entirely']))
    run = run_script('eval_glue.py', f'--make_imdb_split={tmp_path}/train.tsv', f'--task_dir={tmp_path}/s',
                     f'--imdb_exclude={tmp_path}/unsup.txt.xz')
    assert f'{len(set(corpus))} reviews of {tmp_path}/unsup.txt.xz kept out of dev' in run.stdout
    dev = [line.split('\t')[1] for line in open(tmp_path / 's' / 'IMDB' / 'dev.tsv').read().splitlines()[1:]]
    assert len(dev) == 2000 and not set(dev) & set(corpus)


def test_imdb_is_read_and_scored_like_the_glue_tasks(ckpts, tmp_path, capsys):
    write_imdb(tmp_path / 'train.tsv', 120, seed=1)
    G.split_imdb(str(tmp_path / 'train.tsv'), str(tmp_path / 'data'), n_dev=30)
    data = G.load_task('imdb', str(tmp_path / 'data'))
    assert data['length'] == math.inf and len(data['train']['label']) == 90 and data['train']['b'] is None
    main(ckpt=ckpts['mlm'], task_dir=str(tmp_path / 'data'), tasks='imdb', head='probe', out=str(tmp_path / 'i.json'))
    assert 'texts read whole' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'i.json'))['results']['imdb']['accuracy'] > 60


@pytest.mark.parametrize('head,arm', [('pool', 'mlm'), ('pair', 'mlm'), ('decoder', 'mlm'), ('pool', 'standard')])
def test_imdb_runs_with_every_head_of_both_arms(ckpts, tmp_path, head, arm):
    """Issue 33: IMDB read whole, fine-tuned through each head (the decoder head is the concept arm's)."""
    write_imdb(tmp_path / 'train.tsv', 60, seed=2)
    G.split_imdb(str(tmp_path / 'train.tsv'), str(tmp_path / 'data'), n_dev=20)
    out = tmp_path / 'r.json'
    main(ckpt=ckpts[arm], task_dir=str(tmp_path / 'data'), tasks='imdb', head=head, seeds='1', epochs=1, out=str(out))
    result = json.load(open(out))['results']['imdb']
    assert result['head'] == head and result['n_train'] == 40 and 0 <= result['accuracy'] <= 100
    assert {'majority', 'bow'} <= set(result)


def test_imdb_has_no_zero_shot_similarity(ckpts, tmp_path):
    write_imdb(tmp_path / 'train.tsv', 40, seed=3)
    G.split_imdb(str(tmp_path / 'train.tsv'), str(tmp_path / 'data'), n_dev=10)
    with pytest.raises(common.InputError, match='cosine'):
        main(ckpt=ckpts['mlm'], task_dir=str(tmp_path / 'data'), tasks='imdb', head='cosine', out=str(tmp_path / 'c.json'))
