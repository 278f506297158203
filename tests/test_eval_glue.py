"""eval_glue.py: metrics against hand-computed values, every task's reader on files in the official
layouts, each head learning a tiny synthetic task, checkpoints of every stage, and the CLI end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import run_script

import eval_glue as G
import prepare_data
import runtime
from model import Classifier, ConceptConfig, ConceptDiffusion, ConceptMLM, pooled

# ----------------------------------------------------------------------------------------------
# a tiny prepared data directory and one checkpoint per stage, written as the train scripts do


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny models run fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('evaldata') / 'pydocs_tiny')
    prepare_data.prepare(dataset='pydocs', max_docs=500, vocab_size=600, out_dir=out)
    return out


def make_ckpt(path, data_dir, stage, decoder):
    meta = prepare_data.load_meta(data_dir)
    special = meta['special_tokens']
    args = dict(vocab_size=meta['vocab_size'], block_size=64, n_layer=2, n_head=2, n_embd=32, n_concepts=8,
                ffn_size=64, decoder=decoder, pad_id=special['pad'], mask_id=special['mask'],
                eod_id=special['eod'], cls_id=special['cls'], sep_id=special['sep'])
    torch.manual_seed(0)
    model = (ConceptDiffusion if stage == 'diffusion' else ConceptMLM)(ConceptConfig(**args))
    runtime.save_checkpoint(path, {'stage': stage, 'model': model.state_dict(), 'model_args': args,
                                   'tokenizer': meta['tokenizer'], 'special_tokens': special,
                                   'data_dir': os.path.abspath(data_dir), 'config': {}, 'iter_num': 0})
    return path


@pytest.fixture(scope='module')
def ckpts(tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    return {stage: make_ckpt(str(root / stage / 'ckpt.pt'), tok_dir, stage, decoder)
            for stage, decoder in [('mlm', 'perceiver'), ('tsdae', 'posonly'), ('diffusion', 'diffusion'),
                                   ('weighted', 'weighted')]}


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
    assert G.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert G.spearman([10, 20, 30], [1, 5, 100]) == pytest.approx(1.0)
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
    'paws': ('PAWS', ['id', 'sentence1', 'sentence2', 'label'], ['id', 'sentence1', 'sentence2', 'label'],
             lambda a, b, y, s: ['1', a, b, str(y)]),
}
SICK_HEAD = ['pair_ID', 'sentence_A', 'sentence_B', 'entailment_label', 'relatedness_score', 'entailment_AB',
             'entailment_BA', 'sentence_A_original', 'sentence_B_original', 'sentence_A_dataset',
             'sentence_B_dataset', 'SemEval_set']


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


def write_sick(root, examples, extra=()):
    """examples: (a, b, entailment word, relatedness, SemEval split)."""
    rows = [SICK_HEAD] + [[str(i), a, b, e, f'{r:.1f}', 'A_neutral_B', 'B_neutral_A', a, b, 'FLICKR', 'FLICKR', s]
                          for i, (a, b, e, r, s) in enumerate(examples)]
    write_lines(os.path.join(root, 'SICK', 'SICK.txt'), rows, extra)


LABELS_IN_FILE = {'mnli': ['entailment', 'neutral', 'contradiction'], 'qnli': ['entailment', 'not_entailment'],
                  'rte': ['entailment', 'not_entailment'], 'stsb': [0.0, 2.5, 5.0]}


@pytest.mark.parametrize('task', list(LAYOUTS))
def test_reader_of_each_glue_layout(task, tmp_path):
    labels = LABELS_IN_FILE.get(task, [0, 1, 1])
    good = [(f'He said "yes" {i}.', f'b {i}', labels[i % len(labels)]) for i in range(3)]
    broken = ['only\tthree\tcols' if LAYOUTS[task][1] is None else 'too\tfew',
              '\t'.join(LAYOUTS[task][3]('a', 'b', 'maybe', 'train'))]  # a label that is none
    for split in ['train'] + [stem for stem, _ in G.eval_sets(task).values()]:
        write_task(str(tmp_path), task, split, good, broken)
    data = G.load_task(task, str(tmp_path))
    expected_names = ['mnli_m', 'mnli_mm'] if task == 'mnli' else [task]
    assert list(data['evals']) == expected_names
    for split in [data['train'], *data['evals'].values()]:
        assert split['a'] == [a for a, _, _ in good]  # quotes stay literal text
        if task in ('cola', 'sst2'):
            assert split['b'] is None
        else:
            assert split['b'] == [b for _, b, _ in good]
        want = [LABELS_IN_FILE[task].index(y) if task in G.LABEL_NAMES else y for _, _, y in good]
        assert split['label'].tolist() == pytest.approx(want)
    assert all(n == 2 for n in data['skipped'].values()) and len(data['skipped']) == 1 + len(expected_names)


def test_reader_of_sick(tmp_path):
    examples = [('A man plays', 'A man is playing', 'ENTAILMENT', 4.5, 'TRAIN'),
                ('A dog runs', 'A cat sleeps', 'NEUTRAL', 1.2, 'TRAIN'),
                ('Nobody sings', 'A woman sings', 'CONTRADICTION', 3.0, 'TRIAL'),
                ('Kids play', 'Children play', 'ENTAILMENT', 4.9, 'TEST')]
    write_sick(str(tmp_path), examples, extra=['1\tshort\trow', '\t'.join(['9', 'a', 'b', 'UNSURE', 'x'] + ['z'] * 6
                                                                          + ['TRAIN'])])
    r = G.load_task('sick_r', str(tmp_path))
    e = G.load_task('sick_e', str(tmp_path))
    assert r['train']['a'] == ['A man plays', 'A dog runs'] and r['train']['b'] == ['A man is playing', 'A cat sleeps']
    assert r['train']['label'].tolist() == pytest.approx([4.5, 1.2])
    assert r['evals']['sick_r']['label'].tolist() == pytest.approx([3.0])  # TRIAL is the validation split
    assert e['train']['label'].tolist() == [0, 1] and e['evals']['sick_e']['label'].tolist() == [2]
    assert r['skipped'] == {'SICK.txt': 2} and e['skipped'] == {'SICK.txt': 2}


def test_files_narrower_than_the_task_reads_are_one_clear_error(tmp_path):
    """A header with fewer columns than the task reads: a DataError naming the file, not an IndexError."""
    os.makedirs(tmp_path / 'STS-B')
    for stem in ('train', 'dev'):
        (tmp_path / 'STS-B' / f'{stem}.tsv').write_text('sentence1\tsentence2\tscore\na\tb\t3.0\n')
    with pytest.raises(prepare_data.DataError, match=r'STS-B.train\.tsv has 3 tab-separated columns'):
        G.load_task('stsb', str(tmp_path))
    os.makedirs(tmp_path / 'SICK')
    (tmp_path / 'SICK' / 'SICK.txt').write_text('pair_ID\tsentence_A\tsentence_B\n1\ta\tTRAIN\n')
    with pytest.raises(prepare_data.DataError, match='SICK.txt has 3 tab-separated columns'):
        G.load_task('sick_r', str(tmp_path))


def test_missing_files_and_hub_failures_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(prepare_data.DataError, match='RTE.train.tsv not found'):
        G.load_task('rte', str(tmp_path))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(prepare_data.DataError, match='--data_dir'):
        G.load_task('mrpc', '')
    with pytest.raises(prepare_data.DataError, match='--data_dir'):
        G.load_task('sick_e', '')


def test_hub_columns_and_splits(monkeypatch):
    """The hub path, offline: a stand-in load_dataset returns what the hub's MNLI and SICK hold."""
    import datasets
    calls = []

    def fake(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path.endswith('sick') and 'revision' in kwargs:
            raise RuntimeError("Dataset scripts are no longer supported")  # the fallback is tried next
        if path == 'nyu-mll/glue':
            rows = {'premise': ['p1', 'p2', 'p3'], 'hypothesis': ['h1', 'h2', 'h3'], 'label': [2, 0, -1]}
            return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows)
                                         for s in ('train', 'validation_matched', 'validation_mismatched')})
        rows = {'sentence_A': ['a1', 'a2'], 'sentence_B': ['b1', 'b2'], 'label': [0, 1],
                'relatedness_score': [4.5, 1.0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ('train', 'validation')})
    monkeypatch.setattr(datasets, 'load_dataset', fake)
    mnli = G.load_task('mnli')
    assert calls[0] == ('nyu-mll/glue', 'mnli', {}) and list(mnli['evals']) == ['mnli_m', 'mnli_mm']
    assert mnli['train']['a'] == ['p1', 'p2'] and mnli['train']['b'] == ['h1', 'h2']
    assert mnli['train']['label'].tolist() == [2, 0] and mnli['skipped']['train'] == 1  # -1: no label
    sick = G.load_task('sick_r')
    assert sick['evals']['sick_r']['label'].tolist() == pytest.approx([4.5, 1.0])
    assert [c[2] for c in calls[1:]] == [{'revision': 'refs/convert/parquet'}, {}]


def test_subset_and_truncation():
    split = G.make_split([str(i) for i in range(10)], None, [i % 2 for i in range(10)], 'sst2')
    small = G.subset(split, 4)
    assert len(small['a']) == 4 and small['a'] == sorted(small['a'], key=int)  # in file order
    assert small['label'].tolist() == [int(a) % 2 for a in small['a']]
    assert G.subset(split, 4)['a'] == small['a'] and G.subset(split, 0) is split  # fixed seed; 0 = all
    a, b = G.truncate_pair(list(range(10)), list(range(3)), 8)
    assert (len(a), len(b)) == (5, 3)
    a, b = G.truncate_pair(list(range(10)), list(range(10)), 7)
    assert (len(a), len(b)) == (4, 3)
    assert G.truncate_pair([1, 2], [3], 8) == ([1, 2], [3])


# ----------------------------------------------------------------------------------------------
# checkpoints of every stage load, and encode() gives padding-independent embeddings

@pytest.mark.parametrize('stage', ['mlm', 'tsdae', 'diffusion'])
def test_checkpoint_of_each_stage_loads_and_encodes(ckpts, stage):
    ckpt, tok = G.load_pretrained(ckpts[stage])
    model = G.fresh_model(ckpt)
    assert isinstance(model, ConceptDiffusion if stage == 'diffusion' else ConceptMLM)
    texts = ['Return the sum of an array.', 'A much longer sentence about tensors, files and sockets, ' * 3]
    emb = G.encode(texts, ckpts[stage])
    assert emb.shape == (2, 32) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    alone = G.encode(texts[:1], ckpts[stage])  # padded in a batch with a longer text, or not at all
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-4, atol=1e-5)
    assert G.load_encoder(ckpts[stage])[0] is G.load_encoder(ckpts[stage])[0]  # cached


def test_moved_tokenizer_directory_says_what_to_pass(ckpts, tok_dir, tmp_path):
    ckpt = torch.load(ckpts['mlm'], weights_only=True)
    ckpt['data_dir'] = str(tmp_path / 'moved_away')
    path = str(tmp_path / 'ckpt.pt')
    runtime.save_checkpoint(path, ckpt)
    with pytest.raises(prepare_data.DataError, match='--data_dir_tok'):
        G.load_pretrained(path)
    assert G.load_pretrained(path, tok_dir)[1].vocab_size == 600


# ----------------------------------------------------------------------------------------------
# each head learns a synthetic task: the label is which keyword a sentence contains

FILLER = 'the module returns a value for each index of the array and the default object'.split()


def sentence(rng, keyword):
    words = list(rng.choice(FILLER, size=6))
    words.insert(int(rng.integers(0, 7)), keyword)
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
    metrics, n_labels, _ = G.TASKS[task]
    split = lambda ex: G.make_split([a for a, _, _ in ex], [b for _, b, _ in ex] if pair else None,  # noqa: E731
                                    [y for _, _, y in ex], task)
    return {'task': 'synthetic', 'metrics': metrics if not pair else ('accuracy',), 'n_labels': n_labels,
            'epochs': 4, 'train': split(synthetic(n_train, 1, pair, regression)),
            'evals': {'synthetic': split(synthetic(n_eval, 2, pair, regression))}, 'skipped': {}}


FAST = dict(learning_rate=3e-3, head_learning_rate=0.0, batch_size=16, dropout=0.0, epochs=4, warmup_steps=4)


@pytest.mark.parametrize('stage,head,pair', [('mlm', 'pool', False), ('mlm', 'pair', True), ('mlm', 'decoder', False),
                                             ('tsdae', 'decoder', False), ('weighted', 'decoder', False),
                                             ('diffusion', 'decoder', False)])
def test_each_head_learns_a_synthetic_task(ckpts, stage, head, pair):
    ckpt, tok = G.load_pretrained(ckpts[stage])
    res = G.evaluate_task(ckpt, tok, synthetic_data(pair), head, seeds=(0,), hp=FAST)['synthetic']
    assert res['accuracy'] > 80, res['per_seed']
    assert res['majority']['accuracy'] < 65 and res['n_train'] == 160 and res['n_eval'] == 64
    assert res['best_epoch']['accuracy'] >= res['accuracy'] and 1 <= res['best_epoch']['epoch'][0] <= 4
    losses = res['per_seed']['0']['train_loss']
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_regression_and_seeds(ckpts):
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    res = G.evaluate_task(ckpt, tok, synthetic_data(regression=True, n_train=96, n_eval=48), 'pool', seeds=(0, 1),
                          hp={**FAST, 'epochs': 3})['synthetic']
    assert res['pearson'] > 50 and res['spearman'] > 50, res['per_seed']
    assert res['majority'] == {'pearson': 0.0, 'spearman': 0.0}
    assert res['std']['pearson'] > 0 and res['seeds'] == [0, 1] and len(res['best_epoch']['epoch']) == 2
    table = G.markdown_table({'synthetic': res})
    assert '| synthetic | pearson |' in table and ' ± ' in table


def test_cosine_head_needs_no_training(ckpts):
    """Pairs of identical sentences score 5, others 0: even an untrained encoder ranks them."""
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    rng = np.random.default_rng(0)
    ex = []
    for i in range(40):
        a = sentence(rng, 'tensor')
        ex.append((a, a if i % 2 else sentence(rng, 'socket'), 5.0 if i % 2 else 0.0))
    split = G.make_split([a for a, _, _ in ex], [b for _, b, _ in ex], [y for _, _, y in ex], 'stsb')
    data = {'task': 'stsb', 'metrics': ('pearson', 'spearman'), 'n_labels': 1, 'epochs': 5, 'train': split,
            'evals': {'stsb': split}, 'skipped': {}}
    res = G.evaluate_task(ckpt, tok, data, 'cosine')['stsb']
    assert math.isfinite(res['spearman']) and res['spearman'] > 50 and res['n_train'] == 0
    with pytest.raises(ValueError, match='cosine'):
        G.evaluate_task(ckpt, tok, synthetic_data(), 'cosine')


# ----------------------------------------------------------------------------------------------
# the command line on a GLUE-layout directory

def test_cli_on_a_glue_layout_directory(ckpts, tmp_path):
    root = str(tmp_path / 'glue')
    for task in ('sst2', 'cola', 'mrpc', 'rte', 'stsb'):
        pair = task in ('mrpc', 'rte', 'stsb')
        for split, n, seed in (('train', 48, 1), ('dev', 24, 2)):
            ex = synthetic(n, seed, pair)
            if task == 'rte':
                ex = [(a, b, G.LABEL_NAMES['rte'][y]) for a, b, y in ex]
            if task == 'stsb':
                ex = [(a, b, 4.0 * y + 0.5) for a, b, y in ex]
            write_task(root, task, split, ex, extra=['malformed'])
    out = str(tmp_path / 'r.json')
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}',
                     '--tasks=stsb,mrpc,rte,sst2,cola', '--head=pool', f'--out={out}', '--device=cpu',
                     '--dtype=float32', '--epochs=1', '--progress=False')
    results = json.load(open(out))
    want = {'stsb': ['pearson', 'spearman'], 'mrpc': ['f1', 'accuracy'], 'rte': ['accuracy'],
            'sst2': ['accuracy'], 'cola': ['mcc']}
    assert list(results) == list(want)
    for task, metrics in want.items():
        r = results[task]
        for m in metrics:
            assert math.isfinite(r[m]) and m in r['majority']
        assert r['n_train'] == 48 and r['n_eval'] == 24 and r['seconds'] > 0
        assert sum(r['skipped'].values()) == 2  # the 'malformed' line of train.tsv and of dev.tsv
    assert '| mrpc | f1 |' in run.stdout and '| cola | mcc |' in run.stdout
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}', '--tasks=stsb',
                     '--head=cosine', f'--out={out}', '--device=cpu', '--dtype=float32')
    results = json.load(open(out))
    assert list(results) == ['stsb'] and math.isfinite(results['stsb']['spearman'])
    bad = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}', '--tasks=mrpc',
                     '--head=cosine', check=False)
    assert bad.returncode != 0 and 'stsb and sick_r only' in bad.stderr and 'Traceback' not in bad.stderr


# ----------------------------------------------------------------------------------------------
# bad settings and data: one clear error at startup, before any fine-tuning

GOOD_HP = {**G.HPARAMS}


@pytest.mark.parametrize('seeds,override,match', [
    ('a', {}, 'seeds'), ('1.5', {}, 'seeds'), ('', {}, 'seeds'), ('-1', {}, 'seeds'), ('42,42', {}, 'distinct'),
    ('42', {'epochs': -1}, 'epochs'), ('42', {'batch_size': 0}, 'batch_size'),
    ('42', {'eval_batch_size': 0}, 'eval_batch_size'), ('42', {'learning_rate': -1.0}, 'learning_rate'),
    ('42', {'dropout': 1.0}, 'dropout'), ('42', {'max_len': 1}, 'max_len'), ('42', {'max_len': 0}, 'max_len')])
def test_settings_out_of_range_are_one_clear_error(seeds, override, match):
    with pytest.raises(G.ConfigError, match=match):
        G.check_settings(seeds, {**GOOD_HP, **override}, 'pool', ['sst2'])


def test_negative_example_counts_are_one_clear_error():
    with pytest.raises(G.ConfigError, match='max_train_examples=-5 must be >= 0'):
        G.check_settings('1', GOOD_HP, 'probe', ['sst2'], max_train=-5)
    with pytest.raises(G.ConfigError, match='max_eval_examples'):
        G.check_settings('1', GOOD_HP, 'probe', ['sst2'], max_eval=-1)


def test_settings_in_range_pass_and_max_len_counts_the_joined_pair():
    assert G.check_settings('1, 2,3,', GOOD_HP, 'pool', ['sst2']) == [1, 2, 3]
    assert G.check_settings('0', {**GOOD_HP, 'epochs': 0, 'dropout': 0.0, 'max_len': 2}, 'pool', ['sst2']) == [0]
    assert G.check_settings('7', {**GOOD_HP, 'max_len': 3}, 'pair', ['rte']) == [7]  # a and b apart: 2 suffice
    with pytest.raises(G.ConfigError, match=r"\[sep\] b'.*max_len >= 4"):  # '[cls] a [sep]' would drop b
        G.check_settings('7', {**GOOD_HP, 'max_len': 3}, 'pool', ['sst2', 'rte'])


def test_max_len_too_short_for_encode_and_evaluate_task(ckpts):
    with pytest.raises(G.ConfigError, match='max_len'):
        G.encode(['a sentence'], ckpts['mlm'], max_len=1)
    with pytest.raises(G.ConfigError, match='max_len'):
        G.encode(['a sentence'], ckpts['mlm'], max_len=0)
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    with pytest.raises(G.ConfigError, match='max_len'):
        G.evaluate_task(ckpt, tok, synthetic_data(pair=True, n_train=8, n_eval=4), 'pool', hp={**FAST, 'max_len': 3})


def test_out_must_be_a_writable_file_path(tmp_path):
    with pytest.raises(G.ConfigError, match='is a directory'):
        G.check_out(str(tmp_path))
    with pytest.raises(G.ConfigError, match='does not exist'):
        G.check_out(str(tmp_path / 'missing' / 'r.json'))
    G.check_out(str(tmp_path / 'r.json'))


def test_numeric_labels_in_a_word_labelled_file_name_the_expected_words(tmp_path):
    for split in ('train', 'dev'):
        write_task(str(tmp_path), 'rte', split, [('a', 'b', '0'), ('c', 'd', '1')])
    with pytest.raises(prepare_data.DataError, match='one of entailment, not_entailment'):
        G.load_task('rte', str(tmp_path))


@pytest.mark.parametrize('case', ['bad_seeds', 'missing_second_task', 'out_is_a_directory'])
def test_cli_fails_fast_before_any_fine_tuning(ckpts, tmp_path, case):
    root = str(tmp_path / 'glue')
    for split, seed in (('train', 1), ('dev', 2)):
        write_task(root, 'sst2', split, synthetic(16, seed))  # and no QQP folder
    extra, message = {'bad_seeds': (['--tasks=sst2', '--seeds=a'], 'seeds='),
                      'missing_second_task': (['--tasks=sst2,qqp', f'--out={tmp_path / "r.json"}'], 'QQP'),
                      'out_is_a_directory': (['--tasks=sst2', f'--out={tmp_path}'], 'is a directory')}[case]
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}', '--device=cpu',
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
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    data = synthetic_data(n_train=80, n_eval=40)
    res = G.evaluate_task(ckpt, tok, data, 'probe')['synthetic']
    shuffled = synthetic_data(n_train=80, n_eval=40)
    ev = shuffled['evals']['synthetic']
    ev['label'] = np.random.default_rng(0).permutation(ev['label'])
    res2 = G.evaluate_task(ckpt, tok, shuffled, 'probe')['synthetic']
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
    split = {'a': ['x y'], 'b': ['y z'], 'label': np.array([1])}
    X = G.bow_features(vec, split).to_dense()[0]
    a = G.sparse_rows(vec.rows(['x y']), 5).to_dense()[0]
    b = G.sparse_rows(vec.rows(['y z']), 5).to_dense()[0]
    torch.testing.assert_close(X, torch.cat([a, b, (a - b).abs(), a * b]))


def test_probe_and_bow_learn_a_synthetic_task_with_every_control(ckpts):
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    for pair in (False, True):
        res = G.evaluate_task(ckpt, tok, synthetic_data(pair), 'probe', seeds=(0, 1), control='random_init')['synthetic']
        assert res['bow']['accuracy'] > 90  # the label is a word: the bag of words must find it
        assert res['accuracy'] > 75, res
        assert res['seeds'] == [0] and res['std']['accuracy'] == 0.0  # a pretrained probe is deterministic
        rand = res['random_init']
        assert rand['seeds'] == [0, 1] and math.isfinite(rand['accuracy'])
        assert res['majority']['accuracy'] < 65 and res['head'] == 'probe' and res['control'] == 'random_init'
    res = G.evaluate_task(ckpt, tok, synthetic_data(regression=True), 'probe')['synthetic']
    assert res['pearson'] > 50 and res['bow']['pearson'] > 90 and 'random_init' not in res


def test_controls_are_marked_against_each_score():
    e = {'accuracy': 70.0, 'std': {'accuracy': 1.0}, 'majority': {'accuracy': 50.0}, 'bow': {'accuracy': 73.0},
         'random_init': {'accuracy': 69.5, 'std': {'accuracy': 0.2}, 'seeds': [1, 2]}, 'seeds': [1, 2], 'head': 'pool',
         'n_train': 10, 'n_eval': 5, 'seconds': 1.0}
    assert G.versus(e, 'accuracy') == '>maj <bow <rand'  # 0.5 above random init is within the 1.0 spread
    e['random_init']['accuracy'] = 68.0
    assert G.versus(e, 'accuracy') == '>maj <bow >rand'
    row = G.markdown_table({'sst2': e}).splitlines()[-1]
    assert '| 70.0 ± 1.0 |' in row and '| 73.0 |' in row and '| 68.0 ± 0.2 |' in row and '>maj <bow >rand' in row


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


def test_random_init_control_is_the_same_architecture_untrained(ckpts):
    ckpt, _ = G.load_pretrained(ckpts['mlm'])
    ckpt = {**ckpt, 'model': {k: v + 1.0 if v.is_floating_point() else v for k, v in ckpt['model'].items()}}  # "trained"
    trained = G.fresh_model(ckpt)
    torch.manual_seed(3)
    a = G.fresh_model(ckpt, random_init=True)
    torch.manual_seed(3)
    b = G.fresh_model(ckpt, random_init=True)
    assert type(a) is type(trained) and a.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())  # seeded
    assert not torch.equal(a.encoder.wte.weight, trained.encoder.wte.weight)


def test_head_learning_rate_moves_the_head_while_the_encoder_barely_moves(ckpts):
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    data = synthetic_data(n_train=64, n_eval=32)
    captured = {}
    original = Classifier.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured['clf'] = self
    Classifier.__init__ = keep
    try:
        res = G.evaluate_task(ckpt, tok, data, 'pool', seeds=(0,),
                              hp={**FAST, 'learning_rate': 1e-9, 'head_learning_rate': 3e-2})['synthetic']
    finally:
        Classifier.__init__ = original
    clf = captured['clf']
    before = G.fresh_model(ckpt).state_dict()
    moved = max((clf.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved < 1e-5 and res['per_seed']['0']['train_loss'][-1] < res['per_seed']['0']['train_loss'][0]


@pytest.mark.parametrize('pair,regression', [(True, False), (False, True)])
def test_probe_head_init_folds_the_fitted_probe_into_the_output_layer(ckpts, pair, regression):
    """LP-FT: before any step, the classifier's outputs are the probe's on its standardised features."""
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    data = synthetic_data(pair, regression)
    enc = G.tokenize(tok, data['train'], False, 64)
    torch.manual_seed(0)
    clf = Classifier(G.fresh_model(ckpt, 0.0), 'pair', data['n_labels'], pair, 0.0)
    y = data['train']['label']
    y = (y - y.mean()) / y.std() if regression else y
    G.init_head_from_probe(clf, enc, y, data, G.HPARAMS)
    Z, = G.standardise(G.head_features(clf, enc, 64, 'cpu'))
    linear, _ = G.fit_probe(Z, y, data['n_labels'], data['metrics'])
    out = G.predict(clf, enc, 64, 'cpu')
    expected = G.linear_outputs(linear, Z).float().reshape(out.shape).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3)
    metric = data['metrics'][0]
    assert G.score(out[:, 0] if regression else out.argmax(-1), data['train']['label'], data['metrics'])[metric] > 90


def test_probe_head_init_scores_from_the_first_epoch_where_a_random_head_cannot(ckpts):
    ckpt, tok = G.load_pretrained(ckpts['mlm'])
    frozen = {**FAST, 'learning_rate': 1e-12, 'epochs': 1}  # fine-tuning moves nothing: only the init shows
    scores = {init: G.evaluate_task(ckpt, tok, synthetic_data(), 'pool', seeds=(0,),
                                    hp={**frozen, 'head_init': init})['synthetic']['accuracy']
              for init in ('random', 'probe')}
    assert scores['probe'] > 85 and scores['random'] < 75, scores
    with pytest.raises(G.ConfigError, match="head_init='lp' must be 'random'"):
        G.check_settings('1', {**GOOD_HP, 'head_init': 'lp'}, 'pair', ['sst2'])


# ----------------------------------------------------------------------------------------------
# results are written as each task finishes, atomically, and nothing is left behind

def test_an_interrupted_run_keeps_the_tasks_it_finished(ckpts, tmp_path):
    root = str(tmp_path / 'glue')
    for task in ('sst2', 'mrpc'):
        for split, n, seed in (('train', 32, 1), ('dev', 16, 2)):
            write_task(root, task, split, synthetic(n, seed, task == 'mrpc'))
    out = tmp_path / 'r.json'
    stray = tmp_path / 'r.json.tmp.999999999'  # left by a run killed mid-write (no such process)
    stray.write_text('{"torn')
    code = ("import sys, eval_glue as G\n"
            "real = G.evaluate_task\n"
            "def second_is_interrupted(ckpt, tok, data, *a, **k):\n"
            "    if data['task'] == 'mrpc':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(ckpt, tok, data, *a, **k)\n"
            "G.evaluate_task = second_is_interrupted\n"
            "G.main()\n")
    import subprocess
    import sys
    from conftest import ROOT
    run = subprocess.run([sys.executable, '-c', code, f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}',
                          '--tasks=sst2,mrpc', '--head=probe', f'--out={out}', '--device=cpu', '--dtype=float32'],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                         timeout=300)
    assert run.returncode != 0 and 'KeyboardInterrupt' in run.stderr
    results = json.load(open(out))
    assert list(results) == ['sst2'] and 'bow' in results['sst2'] and 'majority' in results['sst2']
    assert sorted(os.listdir(tmp_path)) == ['glue', 'r.json']  # the stray temporary is gone, no new one


def test_a_failed_results_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / 'r.json')
    G.write_results(path, {'a': 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(G.json, 'dump', full_disk)
    with pytest.raises(prepare_data.DataError, match='No space left on device.*--out'):
        G.write_results(path, {'a': 2})
    assert os.listdir(tmp_path) == ['r.json'] and json.load(open(path)) == {'a': 1}  # the old file intact


def test_cli_probe_with_random_init_control(ckpts, tmp_path):
    root = str(tmp_path / 'glue')
    for task in ('sst2', 'stsb'):
        for split, n, seed in (('train', 40, 1), ('dev', 20, 2)):
            ex = synthetic(n, seed, task == 'stsb')
            write_task(root, task, split, [(a, b, 4.0 * y + 0.5) for a, b, y in ex] if task == 'stsb' else ex)
    out = str(tmp_path / 'p.json')
    run = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}', '--tasks=sst2,stsb',
                     '--head=probe', '--control=random_init', '--seeds=1,2', f'--out={out}', '--device=cpu',
                     '--dtype=float32')
    results = json.load(open(out))
    for task, m in (('sst2', 'accuracy'), ('stsb', 'pearson')):
        r = results[task]
        assert all(math.isfinite(x[m]) for x in (r, r['majority'], r['bow'], r['random_init']))
        assert r['random_init']['seeds'] == [1, 2] and r['head'] == 'probe'
    assert '| sst2 | accuracy | probe |' in run.stdout and 'maj' in run.stdout
    bad = run_script('eval_glue.py', f'--ckpt={ckpts["mlm"]}', f'--data_dir={root}', '--control=random',
                     check=False)
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr and "unknown control 'random'" in bad.stderr


def test_encode_refuses_what_is_not_text_in_one_line(ckpts):
    with pytest.raises(G.ConfigError, match='list of strings, got a int'):
        G.encode(['fine', 3], ckpts['mlm'])
    with pytest.raises(G.ConfigError, match='batch_size'):
        G.encode(['fine'], ckpts['mlm'], batch_size=0)


def test_a_tsv_that_is_not_utf8_is_read_with_a_note(tmp_path, capsys):
    os.makedirs(tmp_path / 'SST-2')
    for stem in ('train', 'dev'):
        (tmp_path / 'SST-2' / f'{stem}.tsv').write_bytes('\ufeffsentence\tlabel\ncaf\u00e9 ok\t1\nbad\t0\n'.encode('utf-8')
                                                         if stem == 'train' else
                                                         'sentence\tlabel\ncaf\u00e9 ok\t1\n'.encode('latin-1'))
    data = G.load_task('sst2', str(tmp_path))
    assert data['train']['a'] == ['caf\u00e9 ok', 'bad'] and data['skipped'] == {'train.tsv': 0, 'dev.tsv': 0}
    assert 'dev.tsv is not UTF-8: 1 undecodable bytes' in capsys.readouterr().out
