"""
prepare_data.py end to end on a small real corpus, offline and on CPU: documents round-trip
through the .bin files, meta.json tells the truth about them, runs are reproducible, and every
broken input or data directory fails with a message that says what to do.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare_data as P  # noqa: E402

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC on July 21.\n"
    "Buzz Aldrin followed him about twenty minutes later.",
    "Café, naïve, façade, jalapeño: accents are bytes too. 日本語のテキストも少し。 Emoji: 🚀🔥.",
    "def add(a, b):\n    return a + b  # a tiny function, indented with four spaces",
    "A training corpus may contain the literal text <|mask|> or <|endofdoc|> and it must stay text.",
    "    Leading spaces, trailing spaces   \nand\ttabs\tinside a line are all kept exactly.",
    "Numbers like 3.14159, 2718281828 and -42 are split into short digit groups by the pattern.",
    "Don't, won't, we'll, they've, I'm, she'd: contractions get their own pieces.",
]


def _corpus_docs():
    """Hand-written paragraphs plus a few hundred real docstrings (blank lines squeezed, since a
    blank line separates documents in a .txt file)."""
    docs = list(PARAGRAPHS)
    for doc in islice(P.read_pydocs(num_workers=1), 400):
        doc = re.sub(r'\n\s*\n', '\n', doc)
        if doc not in docs:
            docs.append(doc)
    return docs


def _write_txt(path, docs):
    path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
    return path


def _prepare(corpus_path, out_dir, **kw):
    kw = {'vocab_size': 512, 'val_fraction': 0.05, 'num_threads': 2, **kw}
    return P.prepare(dataset=str(corpus_path), out_dir=str(out_dir), **kw)


def _docs_of(data_dir, split, tok):
    """The documents of one split, decoded from the .bin via the doc offsets (eod stripped)."""
    tokens, starts = P.open_split(str(data_dir), split)
    ends = list(starts[1:]) + [len(tokens)]
    docs = []
    for a, b in zip(starts, ends):
        assert tokens[b - 1] == tok.eod_id
        docs.append(tok.decode(tokens[a:b - 1]))
    return docs


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('prep')
    docs = _corpus_docs()
    corpus_path = _write_txt(root / 'corpus.txt', docs)
    data_dir = root / 'data'
    _prepare(corpus_path, data_dir)
    return docs, corpus_path, data_dir


def test_every_document_round_trips(prepared):
    docs, _, data_dir = prepared
    tok = P.load_tokenizer(str(data_dir))
    train, val = _docs_of(data_dir, 'train', tok), _docs_of(data_dir, 'val', tok)
    assert len(train) >= 1 and len(val) >= 1
    assert sorted(train + val) == sorted(docs)
    index = {d: i for i, d in enumerate(docs)}
    for split_docs in (train, val):  # each split keeps corpus order
        positions = [index[d] for d in split_docs]
        assert positions == sorted(positions)


def test_meta_matches_the_files(prepared):
    docs, _, data_dir = prepared
    meta = P.load_meta(str(data_dir))
    assert meta['format_version'] == 1 and meta['dtype'] == 'uint16'
    assert meta['vocab_size'] <= 512 and meta['tokenizer']['n_base'] + 5 == meta['vocab_size']
    assert meta['source']['docs'] == len(docs) == sum(meta['splits'][s]['docs'] for s in ('train', 'val'))
    special = meta['special_tokens']
    assert sorted(special.values()) == list(range(meta['vocab_size'] - 5, meta['vocab_size']))
    for split in ('train', 'val'):
        tokens, starts = P.open_split(str(data_dir), split)
        assert tokens.dtype == np.uint16 and starts.dtype == np.int64
        assert os.path.getsize(data_dir / f'{split}.bin') == 2 * meta['splits'][split]['tokens'] == 2 * len(tokens)
        assert len(starts) == meta['splits'][split]['docs']
        assert starts[0] == 0 and np.all(np.diff(starts) > 0)
        # the only special token in the data is eod, once per document, right before the next start
        assert int(tokens.max()) < meta['vocab_size']
        assert np.isin(tokens, list(special.values())).sum() == (tokens == special['eod']).sum() == len(starts)
        assert np.all(tokens[starts[1:] - 1] == special['eod'])


def test_literal_special_strings_stay_plain_text(prepared):
    _, _, data_dir = prepared
    tok = P.load_tokenizer(str(data_dir))
    text = 'before <|mask|> <|endofdoc|><|pad|><|cls|> <|sep|> after'
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, 'x', '']) == [ids, tok.encode('x'), []]
    assert tok.special_ids == [tok.eod_id, tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id]
    assert max(tok.special_ids) == tok.vocab_size - 1
    # special ids decode to their names, from lists, tensors and arrays alike
    mixed = [tok.cls_id] + tok.encode('hi') + [tok.mask_id, tok.eod_id]
    for ids in (mixed, torch.tensor(mixed), np.array(mixed, dtype=np.uint16)):
        assert tok.decode(ids) == '<|cls|>hi<|mask|><|endofdoc|>'
    assert tok.decode([tok.vocab_size + 3]) == f'<|unk:{tok.vocab_size + 3}|>'


def test_two_runs_are_byte_identical(prepared, tmp_path):
    _, corpus_path, data_dir = prepared
    _prepare(corpus_path, tmp_path / 'again')
    names = sorted(os.listdir(data_dir))
    assert names == sorted(os.listdir(tmp_path / 'again'))
    assert {'meta.json', 'tokenizer.tiktoken', 'train.bin', 'val.bin', 'train_docs.npy', 'val_docs.npy'} == set(names)
    for name in names:
        assert (data_dir / name).read_bytes() == (tmp_path / 'again' / name).read_bytes(), name


def test_rerun_replaces_a_data_dir_but_never_foreign_files(prepared, tmp_path):
    _, corpus_path, _ = prepared
    out = tmp_path / 'd'
    _prepare(corpus_path, out, max_docs=20)
    _prepare(corpus_path, out, max_docs=30)
    assert P.load_meta(str(out))['source']['docs'] == 30
    assert [p.name for p in tmp_path.iterdir()] == ['d']  # no temporary directory left behind
    (out / 'notes.md').write_text('mine')
    with pytest.raises(P.DataError, match='notes.md'):
        _prepare(corpus_path, out, max_docs=20)


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_text('\n\nfirst line\nsecond line\n\n\n   \t\nsecond doc\n  indented\n\nthird   \n', encoding='utf-8')
    assert list(P.read_txt(str(path))) == ['first line\nsecond line', 'second doc\n  indented', 'third   ']


def test_split_keeps_at_least_one_document_on_each_side(tmp_path):
    path = _write_txt(tmp_path / 'three.txt', ['one doc here', 'another doc', 'the last doc'])
    for fraction in (1e-9, 1 - 1e-9):
        out = _prepare(path, tmp_path / f'out{fraction}', val_fraction=fraction, vocab_size=300)
        splits = P.load_meta(out)['splits']
        assert splits['train']['docs'] >= 1 and splits['val']['docs'] >= 1
        assert splits['train']['docs'] + splits['val']['docs'] == 3


def test_jsonl_through_datasets_and_a_missing_column(tmp_path):
    rows = [{'id': i, 'body': f'Record number {i} says something different: {PARAGRAPHS[i % len(PARAGRAPHS)]}'}
            for i in range(40)] + [{'id': 99, 'body': None}]
    path = tmp_path / 'rows.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n', encoding='utf-8')
    out = _prepare(path, tmp_path / 'rows', text_column='body', vocab_size=400)
    tok = P.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(r['body'] for r in rows[:40])
    assert P.load_meta(out)['source']['text_column'] == 'body'
    with pytest.raises(P.DataError, match=r"no column 'text'.*body"):
        _prepare(path, tmp_path / 'nope')
    assert not (tmp_path / 'nope').exists()


def test_pydocs_finds_plenty_of_text_offline():
    chars = n = 0
    for doc in P.read_pydocs(num_workers=2):  # stop at 1 MB: the whole corpus is ~9 MB
        chars += len(doc)
        n += 1
        if chars > 1_000_000:
            break
    assert chars > 1_000_000 and n > 1000


def test_broken_data_dirs_say_how_to_fix_them(prepared, tmp_path):
    _, _, data_dir = prepared
    with pytest.raises(P.DataError, match='does not exist.*prepare_data.py'):
        P.load_meta(str(tmp_path / 'missing'))

    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    with open(broken / 'train.bin', 'r+b') as f:
        f.truncate(os.path.getsize(broken / 'train.bin') - 2)
    with pytest.raises(P.DataError, match=r'train\.bin.*truncated.*prepare_data\.py --dataset'):
        P.load_meta(str(broken))
    with pytest.raises(P.DataError, match='truncated'):
        P.open_split(str(broken), 'train', json.loads((broken / 'meta.json').read_text()))

    meta = json.loads((data_dir / 'meta.json').read_text())
    shutil.copy(data_dir / 'train.bin', broken / 'train.bin')
    (broken / 'meta.json').write_text(json.dumps({**meta, 'format_version': 99}))
    with pytest.raises(P.DataError, match='format_version 99'):
        P.load_meta(str(broken))

    (broken / 'meta.json').write_text(json.dumps(meta))
    os.remove(broken / 'val_docs.npy')
    with pytest.raises(P.DataError, match=r'val_docs\.npy is missing'):
        P.load_meta(str(broken))

    os.remove(broken / 'meta.json')
    with pytest.raises(P.DataError, match=r'no meta\.json.*python prepare_data\.py'):
        P.load_meta(str(broken))


def test_corrupt_doc_offsets_say_how_to_fix_them(prepared, tmp_path):
    import runtime
    _, _, data_dir = prepared
    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    meta = json.loads((broken / 'meta.json').read_text())
    path = broken / 'train_docs.npy'
    raw, good = path.read_bytes(), np.load(path)
    beyond, swapped = good.copy(), good.copy()
    beyond[-1] = meta['splits']['train']['tokens']
    swapped[[1, 2]] = swapped[[2, 1]]
    for bad in (np.random.default_rng(0).bytes(len(raw)), raw[:-8], good.astype(np.float64), good[:-1],
                good.reshape(1, -1), beyond, swapped):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            np.save(path, bad)
        fix = r'train_docs\.npy.*corrupt.*prepare_data\.py --dataset'
        with pytest.raises(P.DataError, match=fix):
            P.load_meta(str(broken))
        with pytest.raises(P.DataError, match=fix):  # the way training opens it
            runtime.TokenWindows(str(broken), 'train', block_size=16, batch_size=2)
        if bad is not swapped:  # the O(docs) order check is load_meta's alone
            with pytest.raises(P.DataError, match=fix):
                P.open_split(str(broken), 'train', meta)


def test_tokenizer_recipe_rebuilds_and_detects_a_different_ranks_file(prepared, tmp_path):
    _, _, data_dir = prepared
    meta = P.load_meta(str(data_dir))
    tok = P.tokenizer_from_recipe(meta['tokenizer'], str(data_dir))
    assert tok.vocab_size == meta['vocab_size'] and tok.mask_id == meta['special_tokens']['mask']
    other = tmp_path / 'other'
    shutil.copytree(data_dir, other)
    with open(other / 'tokenizer.tiktoken', 'a') as f:
        f.write('eHl6 9999\n')
    with pytest.raises(P.DataError, match='sha256'):
        P.tokenizer_from_recipe(meta['tokenizer'], str(other))


def test_empty_corpus_and_missing_file_are_clear_errors(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n\n   \n\n')
    with pytest.raises(P.DataError, match='0 non-empty documents'):
        _prepare(empty, tmp_path / 'out')
    with pytest.raises(P.DataError, match='no such file'):
        _prepare(tmp_path / 'nothing.txt', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_named_tiktoken_encoding_offline_points_to_bpe(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError(f'could not download {name}')
    monkeypatch.setattr(P.tiktoken, 'get_encoding', offline)
    path = _write_txt(tmp_path / 'c.txt', PARAGRAPHS)
    with pytest.raises(SystemExit, match='--tokenizer=bpe') as err:
        _prepare(path, tmp_path / 'out', tokenizer='gpt2')
    assert "'gpt2'" in str(err.value) and '\n' not in str(err.value)


def test_token_dtype():
    assert P.token_dtype(512) == np.uint16
    assert P.token_dtype(65536) == np.uint16  # ids go up to 65535
    assert P.token_dtype(65537) == np.uint32
    assert P.token_dtype(100_282) == np.uint32  # cl100k_base + 5 specials


def test_prepare_defaults_are_the_config_globals():
    import inspect
    for name, param in inspect.signature(P.prepare).parameters.items():
        assert getattr(P, name) == param.default, name


def test_command_line(tmp_path):
    """The real entry point, through configurator.py."""
    path = _write_txt(tmp_path / 'cli.txt', PARAGRAPHS * 3)
    out = tmp_path / 'cli_data'
    cmd = [sys.executable, str(ROOT / 'prepare_data.py'), f'--dataset={path}', f'--out_dir={out}', '--vocab_size=300']
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'tokens/s' in run.stdout
    meta = P.load_meta(str(out))
    assert meta['vocab_size'] <= 300 and meta['source']['docs'] == 3 * len(PARAGRAPHS)

    run = subprocess.run(cmd[:2] + [f'--dataset={tmp_path}/nope.txt'], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f'prepare_data.py: {tmp_path}/nope.txt: no such file or directory'


def test_unreachable_hub_dataset_points_to_offline_corpora(tmp_path, monkeypatch):
    import datasets

    def offline(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(SystemExit, match=r"'JeanKaddour/minipile'.*--dataset=pydocs") as err:
        P.prepare(dataset='minipile', out_dir=str(tmp_path / 'out'))
    assert '\n' not in str(err.value)
    assert not (tmp_path / 'out').exists() and list(tmp_path.iterdir()) == []


def test_named_encoding_path_with_a_local_stand_in(tmp_path, monkeypatch):
    """The --tokenizer=<tiktoken name> path, offline: a bytes-only encoding with its own special
    token stands in for 'gpt2'; ours go after it, and the recipe rebuilds it from the name."""
    byte_ranks = {bytes([i]): i for i in range(256)}
    base = P.tiktoken.Encoding('standin', pat_str=P._SPLIT_PATTERN, mergeable_ranks=byte_ranks,
                               special_tokens={'<|endoftext|>': 256})
    monkeypatch.setattr(P.tiktoken, 'get_encoding', lambda name: base)
    path = _write_txt(tmp_path / 'c.txt', PARAGRAPHS)
    out = _prepare(path, tmp_path / 'named', tokenizer='standin')
    meta = P.load_meta(out)
    assert meta['tokenizer']['kind'] == 'tiktoken' and meta['tokenizer']['file'] is None
    assert meta['tokenizer']['n_base'] == 257 and meta['vocab_size'] == 262
    assert meta['special_tokens'] == {'eod': 257, 'pad': 258, 'mask': 259, 'cls': 260, 'sep': 261}
    assert 'tokenizer.tiktoken' not in os.listdir(out)
    tok = P.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(PARAGRAPHS)
    assert tok.encode('<|endoftext|>') != [256]  # the base encoding's specials are plain text too
