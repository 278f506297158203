"""
prepare_data.py end to end on a small real corpus, offline and on CPU: documents round-trip
through the .bin files (read back with common.py's reading side), meta.json tells the truth about
them, runs are reproducible, and every broken input or data directory fails with one line that
says what to do.
"""
import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import prepare_data as P  # noqa: E402
from common import InputError  # noqa: E402

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


def _read_txt(path):
    return [doc.decode('utf-8') for doc in P.read_txt(str(path))]


def _prepare(corpus_path, out_dir, **kw):
    kw = {'vocab_size': 512, 'val_fraction': 0.05, 'num_threads': 2, **kw}
    return P.prepare(dataset=str(corpus_path), data_dir=str(out_dir), **kw)


def _open_split(data_dir, split):
    return common.open_split(str(data_dir), split, common.load_meta(str(data_dir)))


def _docs_of(data_dir, split, tok):
    """The documents of one split, decoded from the .bin via the doc offsets (eod stripped)."""
    tokens, starts = _open_split(data_dir, split)
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
    tok = common.load_tokenizer(str(data_dir))
    train, val = _docs_of(data_dir, 'train', tok), _docs_of(data_dir, 'val', tok)
    assert len(train) >= 1 and len(val) >= 1
    assert sorted(train + val) == sorted(docs)
    index = {d: i for i, d in enumerate(docs)}
    for split_docs in (train, val):  # each split keeps corpus order
        positions = [index[d] for d in split_docs]
        assert positions == sorted(positions)


def test_meta_matches_the_files(prepared):
    docs, _, data_dir = prepared
    meta = common.load_meta(str(data_dir))
    assert meta['format_version'] == 1 and meta['dtype'] == 'uint16'
    assert meta['vocab_size'] <= 512 and meta['tokenizer']['n_base'] + 5 == meta['vocab_size']
    assert meta['source']['docs'] == len(docs) == sum(meta['splits'][s]['docs'] for s in ('train', 'val'))
    special = meta['special_tokens']
    assert sorted(special.values()) == list(range(meta['vocab_size'] - 5, meta['vocab_size']))
    for split in ('train', 'val'):
        tokens, starts = _open_split(data_dir, split)
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
    tok = common.load_tokenizer(str(data_dir))
    text = 'before <|mask|> <|endofdoc|><|pad|><|cls|> <|sep|> after'
    ids = tok.encode(text)
    special_ids = [tok.eod_id, tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id]
    assert not set(ids) & set(special_ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, 'x', '']) == [ids, tok.encode('x'), []]
    assert special_ids == list(range(tok.vocab_size - 5, tok.vocab_size))
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
    assert common.load_meta(str(out))['source']['docs'] == 30
    assert [p.name for p in tmp_path.iterdir()] == ['d']  # no temporary directory left behind
    (out / 'notes.md').write_text('mine')
    with pytest.raises(InputError, match=r'--data_dir=.*d holds files prepare_data.py did not write \(notes.md\)'):
        _prepare(corpus_path, out, max_docs=20)
    assert (out / 'notes.md').read_text() == 'mine' and sorted(p.name for p in tmp_path.iterdir()) == ['d']


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_text('\n\nfirst line\nsecond line\n\n\n   \t\nsecond doc\n  indented\n\nthird   \n', encoding='utf-8')
    assert _read_txt(path) == ['first line\nsecond line', 'second doc\n  indented', 'third   ']


def test_split_keeps_at_least_one_document_on_each_side(tmp_path):
    path = _write_txt(tmp_path / 'three.txt', ['one doc here', 'another doc', 'the last doc'])
    for fraction in (1e-9, 1 - 1e-9):
        out = _prepare(path, tmp_path / f'out{fraction}', val_fraction=fraction, vocab_size=300)
        splits = common.load_meta(out)['splits']
        assert splits['train']['docs'] >= 1 and splits['val']['docs'] >= 1
        assert splits['train']['docs'] + splits['val']['docs'] == 3


def test_jsonl_and_a_missing_column(tmp_path):
    rows = [{'id': i, 'body': f'Record number {i} says something different: {PARAGRAPHS[i % len(PARAGRAPHS)]}'}
            for i in range(40)] + [{'id': 99, 'body': None}]
    path = tmp_path / 'rows.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n', encoding='utf-8')
    out = _prepare(path, tmp_path / 'rows', text_column='body', vocab_size=400)
    tok = common.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(r['body'] for r in rows[:40])
    assert common.load_meta(out)['source']['text_column'] == 'body'
    with pytest.raises(InputError, match=r"no column 'text'.*body"):
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
    with pytest.raises(InputError, match='does not exist.*prepare_data.py'):
        common.load_meta(str(tmp_path / 'missing'))

    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    with open(broken / 'train.bin', 'r+b') as f:
        f.truncate(os.path.getsize(broken / 'train.bin') - 2)
    with pytest.raises(InputError, match=r'train\.bin.*truncated.*prepare_data\.py --dataset'):
        common.load_meta(str(broken))
    with pytest.raises(InputError, match='truncated'):
        common.open_split(str(broken), 'train', json.loads((broken / 'meta.json').read_text()))

    meta = json.loads((data_dir / 'meta.json').read_text())
    shutil.copy(data_dir / 'train.bin', broken / 'train.bin')
    (broken / 'meta.json').write_text(json.dumps({**meta, 'format_version': 99}))
    with pytest.raises(InputError, match='format_version 99'):
        common.load_meta(str(broken))

    (broken / 'meta.json').write_text(json.dumps(meta))
    os.remove(broken / 'val_docs.npy')
    with pytest.raises(InputError, match=r'val_docs\.npy is missing'):
        common.load_meta(str(broken))

    os.remove(broken / 'meta.json')
    with pytest.raises(InputError, match=r'no meta\.json.*python prepare_data\.py'):
        common.load_meta(str(broken))


def test_corrupt_doc_offsets_say_how_to_fix_them(prepared, tmp_path):
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
        with pytest.raises(InputError, match=fix):
            common.load_meta(str(broken))
        with pytest.raises(InputError, match=fix):  # the way training opens it
            common.TokenWindows(str(broken), 'train', block_size=16, batch_size=2)
        if bad is not swapped:  # the O(docs) order check is load_meta's alone
            with pytest.raises(InputError, match=fix):
                common.open_split(str(broken), 'train', meta)


def test_tokenizer_recipe_rebuilds_and_detects_a_different_ranks_file(prepared, tmp_path):
    _, _, data_dir = prepared
    meta = common.load_meta(str(data_dir))
    tok = common.tokenizer_from_recipe(meta['tokenizer'], str(data_dir), 'fix')
    assert tok.vocab_size == meta['vocab_size'] and tok.mask_id == meta['special_tokens']['mask']
    other = tmp_path / 'other'
    shutil.copytree(data_dir, other)
    with open(other / 'tokenizer.tiktoken', 'a') as f:
        f.write('eHl6 9999\n')
    with pytest.raises(InputError, match='sha256'):
        common.tokenizer_from_recipe(meta['tokenizer'], str(other), 'fix')


def test_empty_corpus_and_missing_file_are_clear_errors(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n\n   \n\n')
    with pytest.raises(InputError, match='0 non-empty documents'):
        _prepare(empty, tmp_path / 'out')
    with pytest.raises(InputError, match='no such file'):
        _prepare(tmp_path / 'nothing.txt', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_named_tiktoken_encoding_offline_points_to_bpe(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError(f'could not download {name}')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    path = _write_txt(tmp_path / 'c.txt', PARAGRAPHS)
    with pytest.raises(InputError, match='--tokenizer=bpe') as err:
        _prepare(path, tmp_path / 'out', tokenizer='gpt2')
    assert "'gpt2'" in str(err.value) and '\n' not in str(err.value)
    assert list(tmp_path.iterdir()) == [path]


def test_token_dtype():
    assert common.token_dtype(512) == np.uint16
    assert common.token_dtype(65536) == np.uint16  # ids go up to 65535
    assert common.token_dtype(65537) == np.uint32
    assert common.token_dtype(100_282) == np.uint32  # cl100k_base + 5 specials


def test_prepare_defaults_are_the_config_globals():
    import inspect
    for name, param in inspect.signature(P.prepare).parameters.items():
        assert getattr(P, name) == param.default, name


def test_command_line(tmp_path):
    """The real entry point, through configurator.py."""
    path = _write_txt(tmp_path / 'cli.txt', PARAGRAPHS * 3)
    out = tmp_path / 'cli_data'
    cmd = [sys.executable, str(ROOT / 'prepare_data.py'), f'--dataset={path}', f'--data_dir={out}', '--vocab_size=300']
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'tokens/s' in run.stdout
    meta = common.load_meta(str(out))
    assert meta['vocab_size'] <= 300 and meta['source']['docs'] == 3 * len(PARAGRAPHS)

    run = subprocess.run(cmd[:2] + [f'--dataset={tmp_path}/nope.txt'], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f'error: {tmp_path}/nope.txt: no such file or directory'


def test_unreachable_hub_dataset_points_to_offline_corpora(tmp_path, monkeypatch):
    import datasets

    def offline(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(InputError, match=r"'JeanKaddour/minipile'.*--dataset=pydocs") as err:
        P.prepare(dataset='minipile', data_dir=str(tmp_path / 'out'))
    assert '\n' not in str(err.value)
    assert not (tmp_path / 'out').exists() and list(tmp_path.iterdir()) == []


def test_named_encoding_path_with_a_local_stand_in(tmp_path, monkeypatch):
    """The --tokenizer=<tiktoken name> path, offline: a bytes-only encoding with its own special
    token stands in for 'gpt2'; ours go after it, and the recipe rebuilds it from the name."""
    byte_ranks = {bytes([i]): i for i in range(256)}
    base = tiktoken.Encoding('standin', pat_str=P._SPLIT_PATTERN, mergeable_ranks=byte_ranks,
                             special_tokens={'<|endoftext|>': 256})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: base)
    path = _write_txt(tmp_path / 'c.txt', PARAGRAPHS)
    out = _prepare(path, tmp_path / 'named', tokenizer='standin')
    meta = common.load_meta(out)
    assert meta['tokenizer']['kind'] == 'tiktoken' and meta['tokenizer']['file'] is None
    assert meta['tokenizer']['n_base'] == 257 and meta['vocab_size'] == 262
    assert meta['special_tokens'] == {'eod': 257, 'pad': 258, 'mask': 259, 'cls': 260, 'sep': 261}
    assert 'tokenizer.tiktoken' not in os.listdir(out)
    tok = common.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(PARAGRAPHS)
    assert tok.encode('<|endoftext|>') != [256]  # the base encoding's specials are plain text too


# ----------------------------------------------------------------------------------------------
# output paths, full disks, interrupted runs

class _FullDisk:
    """Stands in for open() inside prepare_data: files opened for writing share a byte budget,
    and the write that goes past it raises OSError(ENOSPC), as a full disk does."""

    def __init__(self, budget):
        self.budget, self.written = budget, 0

    def __call__(self, path, mode='r', *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if not any(c in mode for c in 'wa+'):
            return f
        disk = self

        class Writer:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                disk.written += len(data)
                if disk.written > disk.budget:
                    import errno
                    raise OSError(errno.ENOSPC, 'No space left on device')
                return f.write(data)
        return Writer()


def _total_written(corpus_path, out_dir, monkeypatch):
    counter = _FullDisk(float('inf'))
    monkeypatch.setattr(P, 'open', counter, raising=False)
    _prepare(corpus_path, out_dir, max_docs=300)
    monkeypatch.undo()
    return counter.written


@pytest.mark.parametrize('fraction', [0.05, 0.5, 0.98])
def test_full_disk_is_one_line_and_leaves_nothing(prepared, tmp_path, monkeypatch, fraction):
    """The disk fills while reading, encoding or writing meta.json: one line naming data_dir and
    the cause, no temporary directory, and an existing data directory there unchanged."""
    _, corpus_path, data_dir = prepared
    total = _total_written(corpus_path, tmp_path / 'probe', monkeypatch)
    shutil.rmtree(tmp_path / 'probe')
    out = tmp_path / 'out'
    shutil.copytree(data_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(P, 'open', _FullDisk(int(total * fraction)), raising=False)
    with pytest.raises(InputError, match=f"could not write {out}: No space left on device.*{out} is unchanged") as e:
        _prepare(corpus_path, out, max_docs=300)
    assert '\n' not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ['out']
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_file_size_limit_is_one_line_and_leaves_nothing(prepared, tmp_path):
    """A real `ulimit -f` in a subprocess (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource
    _, corpus_path, _ = prepared
    out = tmp_path / 'sub' / 'data'

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    cmd = [sys.executable, str(ROOT / 'prepare_data.py'), f'--dataset={corpus_path}', f'--data_dir={out}',
           '--vocab_size=300']
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120, preexec_fn=limit,
                         env={**os.environ, 'PYTHONDONTWRITEBYTECODE': '1', 'OMP_NUM_THREADS': '1'})
    assert run.returncode != 0
    assert 'Traceback' not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: could not write {out}: File too large \(errno EFBIG\); {out} was not written", last), last
    assert os.listdir(tmp_path / 'sub') == []


def test_unwritable_output_paths_fail_before_reading(prepared, tmp_path, monkeypatch):
    """A file where a directory must be, a read-only file system, a mount point (which a rename
    cannot replace): one line, before the corpus is read."""
    import errno
    _, corpus_path, _ = prepared

    def never(*args):
        raise AssertionError('the corpus was read before the output path was checked')
    monkeypatch.setattr(P, 'spool_corpus', never)
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(InputError, match=r"--data_dir=.*a_file/data is under .*a_file, a file, not a directory") as e:
        _prepare(corpus_path, tmp_path / 'a_file' / 'data')
    assert '\n' not in str(e.value)
    with pytest.raises(InputError, match=r"--data_dir=.*a_file is a file; give a directory"):
        _prepare(corpus_path, tmp_path / 'a_file')

    real_open = open

    def read_only(path, *args, **kwargs):  # tests run as root, which chmod does not stop
        if str(path).startswith(str(tmp_path / 'ro')):
            raise OSError(errno.EROFS, 'Read-only file system', str(path))
        return real_open(path, *args, **kwargs)
    (tmp_path / 'ro').mkdir()
    monkeypatch.setattr(common, 'open', read_only, raising=False)  # check_output's write probe
    with pytest.raises(InputError, match=r"--data_dir=.*ro/data cannot be written .*Read-only file system"):
        _prepare(corpus_path, tmp_path / 'ro' / 'data')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'ro'] and not os.listdir(tmp_path / 'ro')


def test_a_mount_point_is_refused_in_one_line(prepared, tmp_path, monkeypatch):
    """Issue 35: --data_dir=<a mount point> failed after all the work, with EBUSY from the final rename."""
    _, corpus_path, _ = prepared
    mount = tmp_path / 'mnt'
    mount.mkdir()
    monkeypatch.setattr(os.path, 'ismount', lambda path: os.path.abspath(path) == str(mount))
    with pytest.raises(InputError, match=rf"--data_dir={mount} is a mount point, which cannot be replaced; use a "
                                         rf"folder inside it, e.g. --data_dir={mount}/data") as e:
        _prepare(corpus_path, mount)
    assert '\n' not in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == ['mnt']


def test_a_killed_runs_temporary_is_removed_by_the_next_run(prepared, tmp_path):
    """kill -9 in the middle of a run leaves its temporary directory (<data_dir>.tmp.<pid>); the
    next run removes it, and leaves alone one that a live process holds."""
    _, corpus_path, _ = prepared
    out = tmp_path / 'd'
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import prepare_data as P\n"
              "P.rustbpe.Tokenizer = lambda: os.kill(os.getpid(), signal.SIGKILL)\n"
              "P.prepare(dataset=sys.argv[2], data_dir=sys.argv[3], vocab_size=300)\n")
    run = subprocess.run([sys.executable, '-c', script, str(ROOT), str(corpus_path), str(out)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert run.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith('d.tmp.') and (tmp_path / left[0] / 'train.spool').exists()
    dead = left[0].split('.')[-1]
    (tmp_path / f'd.tmp.{dead}.old').mkdir()  # a replaced data directory whose removal was cut short
    (tmp_path / f'd.tmp.{dead}.old' / 'train.bin').write_bytes(b'old')
    (tmp_path / 'd.tmp.1').mkdir()  # pid 1 is alive: a running writer's
    _prepare(corpus_path, out, max_docs=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d', 'd.tmp.1']


# ----------------------------------------------------------------------------------------------
# damaged data that passes the size checks

def test_damaged_meta_json_says_how_to_fix_it(prepared, tmp_path):
    _, _, data_dir = prepared
    meta = json.loads((data_dir / 'meta.json').read_text())
    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    fix = r'meta\.json is damaged: {}.*prepare_data\.py --dataset'
    cases = [({k: v for k, v in meta.items() if k != 'splits'}, "it has no 'splits'"),
             ({k: v for k, v in meta.items() if k != 'special_tokens'}, "it has no 'special_tokens'"),
             ({**meta, 'vocab_size': '512'}, "its 'vocab_size' is a str"),
             ({**meta, 'dtype': 'float32'}, "dtype 'float32'"),
             ({**meta, 'splits': {'train': meta['splits']['train']}}, "its splits has no 'val' entry"),
             ({**meta, 'special_tokens': {**meta['special_tokens'], 'mask': 10 ** 6}}, 'its special_tokens must map'),
             ({**meta, 'tokenizer': {'kind': 'bpe'}}, "its tokenizer recipe has no 'name'"),
             ({**meta, 'source': 'x'}, "its 'source' is a str")]
    for bad, message in cases:
        (broken / 'meta.json').write_text(json.dumps(bad))
        with pytest.raises(InputError, match=fix.format(message)) as e:
            common.load_meta(str(broken))
        assert '\n' not in str(e.value)


def test_an_empty_validation_split_says_how_to_fix_it(prepared, tmp_path):
    _, _, data_dir = prepared
    meta = json.loads((data_dir / 'meta.json').read_text())
    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    (broken / 'val.bin').write_bytes(b'')
    np.save(broken / 'val_docs.npy', np.zeros(0, dtype=np.int64))
    meta['splits']['val'] = {'tokens': 0, 'docs': 0, 'chars': 0}
    (broken / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r'val split is empty.*prepare_data\.py --dataset'):
        common.load_meta(str(broken))


def test_token_ids_beyond_the_vocabulary_are_caught_at_open(prepared, tmp_path):
    """A right-sized train.bin holding an id >= vocab_size fails when the data is opened, not as
    an IndexError in the embedding."""
    _, _, data_dir = prepared
    meta = common.load_meta(str(data_dir))
    broken = tmp_path / 'broken'
    shutil.copytree(data_dir, broken)
    tokens = np.memmap(broken / 'train.bin', dtype=np.uint16, mode='r+')
    tokens[12345 % len(tokens)] = meta['vocab_size'] + 7
    tokens.flush()
    del tokens
    fix = rf"train\.bin holds token id {meta['vocab_size'] + 7}, but the vocabulary has {meta['vocab_size']}.*prepare_data"
    with pytest.raises(InputError, match=fix):
        common.load_meta(str(broken))
    with pytest.raises(InputError, match=fix):
        common.TokenWindows(str(broken), 'train', block_size=16, batch_size=2)


def test_a_data_dir_prepared_again_under_a_running_job_is_not_called_corrupt(prepared, tmp_path):
    _, corpus_path, _ = prepared
    out = tmp_path / 'd'
    _prepare(corpus_path, out, max_docs=200)
    windows = common.TokenWindows(str(out), 'train', block_size=16, batch_size=2)
    windows.next_step()
    _prepare(corpus_path, out, max_docs=100)
    with pytest.raises(InputError, match='changed while this job ran') as e:
        windows.next_step()
    assert 'truncated' not in str(e.value) and 'prepare_data.py --dataset' not in str(e.value)


def test_a_data_dir_replaced_by_one_of_the_same_size_under_a_running_job_is_refused(prepared, tmp_path):
    """Sizes and offsets all agree, so only the file's identity and meta.json can tell: the job
    stops in one line instead of training on another corpus."""
    _, corpus_path, _ = prepared
    out = tmp_path / 'd'
    _prepare(corpus_path, out, max_docs=200)
    windows = common.TokenWindows(str(out), 'train', block_size=16, batch_size=2)
    windows.next_step()
    other = tmp_path / 'other'
    shutil.copytree(out, other)
    tokens = np.memmap(other / 'train.bin', dtype=np.uint16, mode='r+')
    tokens[:] = tokens[::-1].copy()  # another corpus of exactly the same size
    tokens.flush()
    del tokens
    meta = json.load(open(other / 'meta.json'))
    meta['source']['note'] = 'prepared again'
    json.dump(meta, open(other / 'meta.json', 'w'))
    os.rename(out, tmp_path / 'gone')
    os.rename(other, out)
    with pytest.raises(InputError, match='changed while this job ran'):
        windows.next_step()


def test_a_corpus_passed_to_training_says_prepare_it_first(tmp_path):
    corpus = _write_txt(tmp_path / 'notes.txt', PARAGRAPHS)
    with pytest.raises(InputError, match=rf'{corpus} is a corpus, not a prepared data directory; prepare it first: '
                                         rf'python prepare_data.py --dataset={corpus} \(it writes data/notes\)'):
        common.load_meta(str(corpus))
    (tmp_path / 'rows.jsonl').write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match='prepare it first'):
        common.load_meta(str(tmp_path))  # a directory of corpus files, no meta.json


# ----------------------------------------------------------------------------------------------
# input text that is not what it seems

def test_latin1_text_is_counted_in_a_warning(tmp_path, capfd):
    path = tmp_path / 'latin1.txt'
    path.write_bytes('\n\n'.join(PARAGRAPHS[:2] + ['Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.',
                                                   'Ol\u00e9!']).encode('latin-1'))
    docs = _read_txt(path)
    assert docs[:2] == PARAGRAPHS[:2] and docs[3] == 'Ol\ufffd!'
    err = capfd.readouterr().err
    assert re.search(r'latin1\.txt: 2 of 8 lines are not valid UTF-8 \(the first is line 6\).*iconv -f latin1', err)


def test_a_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / 'bom.txt'
    path.write_bytes(b'\xef\xbb\xbf' + '\n\n'.join(PARAGRAPHS[:3]).encode('utf-8'))
    assert _read_txt(path) == PARAGRAPHS[:3]
    rows = tmp_path / 'bom.jsonl'
    rows.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert list(P.read_jsonl(str(rows), 'text')) == ['first', 'second']


@pytest.mark.parametrize('kind', ['utf-16', 'utf-16-le', 'utf-32', 'binary', 'binary-later'])
def test_utf16_and_binary_files_are_refused(tmp_path, kind):
    text = '\n\n'.join(PARAGRAPHS)
    path = tmp_path / 'corpus.txt'
    data = {'utf-16': lambda: text.encode('utf-16'), 'utf-16-le': lambda: text.encode('utf-16-le'),
            'utf-32': lambda: text.encode('utf-32'),
            'binary': lambda: np.random.default_rng(0).bytes(300_000),
            'binary-later': lambda: text.encode() * 2000 + b'\n' + bytes(range(256))}[kind]()
    path.write_bytes(data)
    message = {'utf-16': 'is UTF-16 text; convert it to UTF-8', 'utf-16-le': 'looks like UTF-16 text',
               'utf-32': 'is UTF-32 text', 'binary': 'NUL bytes.*binary file, not text',
               'binary-later': r'corpus\.txt:\d+: a NUL byte: binary data'}[kind]
    with pytest.raises(InputError, match=message) as e:
        _prepare(path, tmp_path / 'out')
    assert '\n' not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['corpus.txt']


def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / 'rows.jsonl'
    lines = [json.dumps({'text': p}) for p in PARAGRAPHS]
    lines[2] = '{"text": "cut off in the mid'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(InputError, match=r'rows\.jsonl:3: not a valid JSON line.*fix or delete that line') as e:
        _prepare(path, tmp_path / 'out')
    assert '\n' not in str(e.value)
    path.write_text('\n'.join(lines[:2] + ['[1, 2]']) + '\n')
    with pytest.raises(InputError, match=r'rows\.jsonl:3: a JSON list, not an object'):
        _prepare(path, tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['rows.jsonl']


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads VmHWM from /proc (Linux)')
@pytest.mark.parametrize('suffix', ['.txt', '.txt.gz'])
def test_memory_stays_bounded_on_one_long_document(tmp_path, suffix):
    """One 8 MB document (a book, issue 33), plain or compressed: the peak RSS that preparing it
    adds stays within 3x its size (it is held once as bytes; read back and encoded in pieces).
    The list of Python ints of the whole document's ids used to take about 15x, one str of it 2x."""
    text = ' '.join(re.sub(r'\s+', ' ', p) for p in PARAGRAPHS[:2]) + ' Café — naïve.\n'
    text = text * (8_000_000 // len(text)) + '\nA short second document.\n'
    path = tmp_path / f'long{suffix}'
    (gzip.open if suffix.endswith('.gz') else open)(path, 'wt', encoding='utf-8').write(text)
    size = len(text.encode())
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) peak
    script = ("import re, sys; sys.path.insert(0, sys.argv[1]); import prepare_data as P, tqdm, rustbpe\n"
              "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
              "before = peak()\n"
              "P.prepare(dataset=sys.argv[2], data_dir=sys.argv[3], vocab_size=1024, num_threads=1)\n"
              "print('grew', peak() - before)\n")
    run = subprocess.run([sys.executable, '-c', script, str(ROOT), str(path), str(tmp_path / 'out')],
                         capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert run.returncode == 0, run.stderr
    grew = int(run.stdout.split('grew ')[-1])
    assert grew < 3 * size, f"peak RSS grew by {grew / size:.1f}x the document's size"
    tok = common.load_tokenizer(str(tmp_path / 'out'))
    docs = _docs_of(tmp_path / 'out', 'train', tok) + _docs_of(tmp_path / 'out', 'val', tok)
    assert max(docs, key=len) == text.split('\n\n')[0]


def test_a_long_document_is_encoded_in_pieces_that_give_the_ids_of_the_whole(tmp_path):
    """Issue 33: a book is read back from the spool and encoded in pieces cut where the split
    pattern cuts anyway, so its ids (and BPE's counts) are those of the whole text."""
    words = re.findall(r"\S+|\s+", ' '.join(PARAGRAPHS) + " Ünïcödé 'tis  2 spaces\r\nand\tmore   \n\n")
    rng = np.random.default_rng(0)
    book = ''.join(words[i] for i in rng.integers(len(words), size=600_000))  # ~3 MB, one document
    data = book.encode()
    spool = tmp_path / 'train.spool'
    spool.write_bytes(len(data).to_bytes(8, 'little') + data + (3).to_bytes(8, 'little') + b'end')
    pieces = list(P.spooled_texts(str(spool)))
    assert ''.join(text for text, _ in pieces[:-1]) == book and pieces[-1] == ('end', True)
    assert len(pieces) > 5 and [ends for _, ends in pieces[:-1]] == [False] * (len(pieces) - 2) + [True]
    assert max(len(text) for text, _ in pieces) < 2 * P._PART_CHARS
    enc = tiktoken.Encoding('bytes', pat_str=P._SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    import regex  # tiktoken's own dependency: the pattern's pre-tokens are what BPE training counts
    pretokens = regex.compile(P._SPLIT_PATTERN).findall
    assert [w for text, _ in pieces[:-1] for w in pretokens(text)] == pretokens(book)
    assert [i for text, _ in pieces[:-1] for i in enc.encode_ordinary(text)] == enc.encode_ordinary(book)


def test_json_through_datasets_and_a_malformed_file(tmp_path):
    """.json goes through the datasets library; whatever its reader raises is one line naming the file."""
    path = tmp_path / 'rows.json'
    path.write_text('\n'.join(json.dumps({'text': p}) for p in PARAGRAPHS) + '\n')
    out = _prepare(path, tmp_path / 'rows', vocab_size=300)
    tok = common.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(PARAGRAPHS)
    path.write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(InputError, match=r'rows\.json: not readable as json \(') as e:
        _prepare(path, tmp_path / 'bad')
    assert '\n' not in str(e.value) and not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('key,value,message', [
    ('num_threads', 0, 'must be >= 1'), ('max_docs', -1, 'must be >= 0'), ('bpe_max_chars', 0, 'must be >= 1'),
    ('val_fraction', 1.0, 'must be between 0 and 1'), ('val_fraction', float('nan'), 'is not a finite number'),
    ('vocab_size', 100, 'must be >= 261 for a byte-level BPE'), ('seed', -1, 'must be >= 0')])
def test_settings_out_of_range_are_one_line(tmp_path, key, value, message):
    path = _write_txt(tmp_path / 'c.txt', PARAGRAPHS)
    with pytest.raises(InputError, match=f'{key}={value!r} {message}'):
        _prepare(path, tmp_path / 'out', **{key: value})
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------------------------
# compressed corpora (issue 34), line endings and Ctrl-C (issue 35)

def test_compressed_files_and_a_folder_that_mixes_them(tmp_path):
    """.xz, .gz and .bz2 are read as the file inside them (x.txt.xz is a .txt): the same documents,
    so the same token files, as the plain corpus."""
    docs = PARAGRAPHS * 3
    plain, packed = tmp_path / 'plain', tmp_path / 'packed'
    for folder in (plain, packed):
        folder.mkdir()
    _write_txt(plain / 'a.txt', docs[:8])
    _write_txt(plain / 'b.txt', docs[8:14])
    (plain / 'c.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs[14:]))
    shutil.copy(plain / 'a.txt', packed / 'a.txt')  # plain beside compressed
    with open(plain / 'b.txt', 'rb') as f, lzma.open(packed / 'b.txt.xz', 'wb') as out:
        out.write(f.read())
    with open(plain / 'c.jsonl', 'rb') as f, gzip.open(packed / 'c.jsonl.gz', 'wb') as out:
        out.write(f.read())
    (packed / 'notes.md.gz').write_bytes(gzip.compress(b'not a corpus file: skipped, as notes.md would be'))
    a, b = _prepare(plain, tmp_path / 'a', vocab_size=300), _prepare(packed, tmp_path / 'b', vocab_size=300)
    for name in ('train.bin', 'val.bin', 'train_docs.npy', 'val_docs.npy', 'tokenizer.tiktoken'):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    assert common.load_meta(b)['source']['fingerprint'] == common.load_meta(a)['source']['fingerprint']
    one = tmp_path / 'one.txt.bz2'
    one.write_bytes(bz2.compress((plain / 'a.txt').read_bytes()))
    assert _read_txt(one) == docs[:8]
    assert P.corpus_name(str(one)) == 'one' and P.corpus_name(str(packed)) == 'packed'


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
@pytest.mark.parametrize('suffix', ['.xz', '.gz', '.bz2'])
def test_a_damaged_compressed_file_is_one_line(tmp_path, suffix, damage):
    compress = {'.xz': lzma.compress, '.gz': gzip.compress, '.bz2': bz2.compress}[suffix]
    data = compress(('\n\n'.join(PARAGRAPHS * 200)).encode())
    path = tmp_path / f'c.txt{suffix}'
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else data[:20] + bytes(200) + data[220:])
    with pytest.raises(InputError, match=rf'c\.txt\{suffix} could not be read .*damaged or cut short') as e:
        _prepare(path, tmp_path / 'out')
    assert '\n' not in str(e.value) and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize('newline', ['\r', '\r\n'])
def test_old_mac_and_windows_line_endings(tmp_path, newline):
    """Issue 35: a CR-only .txt was read as one document ("need at least 2"). Universal newlines:
    documents split at blank lines whatever the line endings, each line ending read as \\n."""
    docs = ['first line\nsecond line', 'second doc\n  indented', 'third']
    path = tmp_path / 'mac.txt'
    path.write_bytes(('\n\n'.join(docs) + '\n').replace('\n', newline).encode())
    out = _prepare(path, tmp_path / 'out', vocab_size=300, val_fraction=0.3)
    tok = common.load_tokenizer(out)
    assert sorted(_docs_of(out, 'train', tok) + _docs_of(out, 'val', tok)) == sorted(docs)
    assert _read_txt(path) == docs


@pytest.mark.parametrize('existing', [False, True])
def test_ctrl_c_is_one_line_and_leaves_nothing(prepared, tmp_path, existing):
    """Issue 35: Ctrl-C printed a KeyboardInterrupt traceback. Now one line says the data directory
    is unchanged (or was not created), the exit status is 130, and no temporary is left."""
    _, corpus_path, data_dir = prepared
    out = tmp_path / 'd'
    if existing:
        shutil.copytree(data_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    script = ("import os, runpy, signal, sys; sys.argv = sys.argv[1:]\n"
              "sys.path.insert(0, os.path.dirname(sys.argv[0])); import rustbpe\n"
              "rustbpe.Tokenizer = lambda: os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after reading\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    run = subprocess.run([sys.executable, '-c', script, str(ROOT / 'prepare_data.py'), f'--dataset={corpus_path}',
                          f'--data_dir={out}', '--vocab_size=300'], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert run.returncode == 130 and 'Traceback' not in run.stderr, run.stderr
    state = 'is unchanged' if existing else 'was not created'
    assert run.stderr.strip().splitlines()[-1] == f"interrupted; {out} {state}"
    assert [p.name for p in tmp_path.iterdir()] == (['d'] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_while_pydocs_parses_is_one_line(tmp_path):
    """A real Ctrl-C reaches the whole process group, the parser processes too: they ignore it, so
    the only output is the main process's one line."""
    err = tmp_path / 'stderr'
    with open(err, 'w') as f:
        run = subprocess.Popen([sys.executable, str(ROOT / 'prepare_data.py'), f'--data_dir={tmp_path / "d"}'],
                               stdout=subprocess.DEVNULL, stderr=f, cwd=tmp_path, start_new_session=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
        try:
            for _ in range(600):  # until the parsers run
                if re.search(r'reading corpus: [1-9]', err.read_text()) or run.poll() is not None:
                    break
                time.sleep(0.1)
            os.killpg(run.pid, signal.SIGINT)
            run.wait(timeout=60)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    text = err.read_text()
    assert run.returncode == 130 and 'Traceback' not in text, text
    assert text.strip().splitlines()[-1] == f"interrupted; {tmp_path / 'd'} was not created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ['stderr']
