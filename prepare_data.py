"""
Turn a text corpus into a data directory that training can memory-map:

    train.bin, val.bin              token ids, headerless uint16 (uint32 if vocab_size > 65536);
                                    documents back to back, each followed by <|endofdoc|>
    train_docs.npy, val_docs.npy    int64 start offset of every document in its .bin
    tokenizer.tiktoken              the BPE ranks (--tokenizer=bpe only), tiktoken's file format
    meta.json                       what is needed to read all of the above; written last

    python prepare_data.py                                    # offline: stdlib/torch/numpy docstrings
    python prepare_data.py --dataset=minipile                 # Hugging Face hub (needs internet)
    python prepare_data.py --dataset=notes.txt --vocab_size=4096
    python prepare_data.py --dataset=pydocs --tokenizer=gpt2  # a tiktoken vocabulary (downloaded once)

Corpora: 'pydocs'; 'minipile' (= JeanKaddour/minipile) or any hub name 'owner/name' (column
text_column of split); or a local path: a .txt file (documents are separated by one or more blank
lines), a .jsonl file (one JSON object per line), a .json/.parquet file (column text_column), or a
directory of such files. Local text must be UTF-8: UTF-16 and binary files are refused, a BOM is
dropped, and bytes that are not UTF-8 are counted in a warning.

The split into train/val is by whole documents, decided per document from (seed, index), and every
output is a pure function of the inputs (two runs give byte-identical files). Memory stays bounded:
the corpus is read once and parked on disk (as length-prefixed UTF-8 in the temporary directory),
then BPE is trained from the train part and the encoding pass appends chunk after chunk to the .bin.
"""
import ast
import base64
import codecs
import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import tiktoken

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# ----------------------------------------------------------------------------------------------
# defaults (overridable by a config file and --key=value, see configurator.py)
dataset = 'pydocs'               # 'pydocs' | 'minipile' | a hub name 'owner/name' | a local file or directory
text_column = 'text'             # column holding the text (hub, .jsonl/.json, .parquet)
split = 'train'                  # hub split to read
tokenizer = 'bpe'                # 'bpe' (trained here on the train split) | a tiktoken encoding, e.g. 'gpt2'
vocab_size = 8192                # bpe only: total size, including the 5 special tokens
data_dir = ''                    # '' -> data/<dataset name>, e.g. data/pydocs (for a path: its stem)
val_fraction = 0.01              # share of documents in val (at least 1 in val, at least 1 in train)
seed = 1337                      # decides which documents go to val
max_docs = 0                     # 0 = all; else only the first max_docs documents (quick runs)
num_threads = 2                  # encoding threads (and pydocs parser processes)
bpe_max_chars = 1_000_000_000    # BPE is trained on (about) the first this many characters of the train split
hub_streaming = True             # stream hub datasets instead of downloading them whole first
# ----------------------------------------------------------------------------------------------

_FORMAT_VERSION = 1
# ids n_base .. n_base+4, right after the base vocabulary; keys are the names used in meta.json
_SPECIALS = {'eod': '<|endofdoc|>', 'pad': '<|pad|>', 'mask': '<|mask|>', 'cls': '<|cls|>', 'sep': '<|sep|>'}
# GPT-4's split pattern with digit runs of at most 2 (as nanochat): fewer number tokens in a small vocab
_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
_RANKS_FILE = 'tokenizer.tiktoken'
_SPLITS = ('train', 'val')
_DATA_FILES = {'meta.json', _RANKS_FILE} | {f'{s}.bin' for s in _SPLITS} | {f'{s}_docs.npy' for s in _SPLITS}
_LOCAL_SUFFIXES = ('.txt', '.jsonl', '.json', '.parquet')
_PYDOCS_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'testing'}
_PYDOCS_MIN_WORDS, _PYDOCS_MIN_CHARS = 4, 24  # "Return self." and friends are noise, not prose
_PART_CHARS = 256_000  # text per unit of encoding work (at most 2·num_threads units wait in memory)


class DataError(ValueError):
    """A data directory or corpus that cannot be used; the message says how to fix it."""


def _remedy(data_dir, dataset=None):
    """The command that (re)creates data_dir; dataset is meta's, else guessed from the name."""
    if dataset is None:
        guess = os.path.basename(os.path.normpath(data_dir))
        dataset = guess if guess in ('pydocs', 'minipile') else '<corpus>'
    return f"create it with: python prepare_data.py --dataset={dataset} --out_dir={data_dir}"


def _first_line(e, limit=200):
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + '...'


# ----------------------------------------------------------------------------------------------
# corpus readers: each yields the documents (str) in a deterministic order

def read_pydocs(num_workers=2):
    """Module, class and function docstrings of the Python standard library, torch and numpy.

    About 9 MB of technical English that every machine with this repo's venv has, so the whole
    pipeline runs offline. Files are parsed with ast (never imported) in sorted order, on
    num_workers processes (parsing is the slow part); tiny docstrings and exact repeats are dropped."""
    paths = [os.path.join(root, rel) for root in _pydocs_roots() for rel in _python_files(root)]
    seen = set()
    if num_workers > 1 and sys.platform == 'linux':
        # fork, not spawn: spawn re-runs the caller's main script in each worker, which breaks any
        # script that calls prepare() without an `if __name__ == '__main__'` guard
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context('fork'))
        per_file = pool.map(_file_docstrings, paths, chunksize=16)
    else:
        pool, per_file = None, map(_file_docstrings, paths)
    try:
        for docs in per_file:
            for doc in docs:
                key = hashlib.blake2b(doc.encode('utf-8', 'replace'), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    yield doc
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # stopped early (max_docs): skip the files not yet parsed


def _file_docstrings(path):
    """The docstrings of one .py file worth keeping as documents; [] if it does not parse."""
    try:
        with open(path, 'rb') as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # SyntaxWarnings about escapes in old code
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
        return []
    return [doc for doc in _docstrings(tree)
            if len(doc) >= _PYDOCS_MIN_CHARS and len(doc.split()) >= _PYDOCS_MIN_WORDS]


def _pydocs_roots():
    import importlib.util
    roots = [sysconfig.get_paths()['stdlib']]
    for name in ('torch', 'numpy'):
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            roots.append(sorted(spec.submodule_search_locations)[0])
    return roots


def _python_files(root):
    """All .py files under root (relative paths, sorted), minus tests and nested site-packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _PYDOCS_SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        files.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith('.py'))
    return sorted(files)


def _docstrings(node):
    """Docstrings in source order. Visits statements only: several times faster than ast.walk."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc.strip()
    for field in ('body', 'handlers', 'orelse', 'finalbody'):
        for child in getattr(node, field, ()):
            if hasattr(child, 'body'):  # defs and compound statements (if/try/with/for...)
                yield from _docstrings(child)


def _check_text_file(path):
    """Refuse a file that is not UTF-8 text before reading it: UTF-16/32 (a byte-order mark, or NUL
    bytes) and binary files (NUL bytes) would otherwise become a few garbage documents."""
    with open(path, 'rb') as f:
        head = f.read(1 << 16)
    for bom, name in ((codecs.BOM_UTF32_LE, 'UTF-32'), (codecs.BOM_UTF32_BE, 'UTF-32'),
                      (codecs.BOM_UTF16_LE, 'UTF-16'), (codecs.BOM_UTF16_BE, 'UTF-16')):
        if head.startswith(bom):
            raise DataError(f"{path} is {name} text; convert it to UTF-8 first, e.g. "
                            f"iconv -f {name} -t UTF-8 {path} > utf8{os.path.splitext(path)[1]}")
    if b'\0' in head:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if max(even, odd) > len(head) // 8 and min(even, odd) < max(even, odd) // 8:  # every other byte NUL
            raise DataError(f"{path} looks like UTF-16 text without a byte-order mark; convert it to UTF-8 first, "
                            f"e.g. iconv -f UTF-16LE -t UTF-8 {path} > utf8{os.path.splitext(path)[1]}")
        raise DataError(f"{path} holds NUL bytes (the first at byte {head.index(0)}): a binary file, not text; "
                        f"give a UTF-8 text file")


def read_txt(path):
    """Documents of a UTF-8 text file: separated by one or more blank (whitespace-only) lines.

    A leading BOM is dropped; a line that is not valid UTF-8 is read with U+FFFD for its bad bytes
    and counted, and the count is reported at the end (a latin-1 file should be converted, not
    silently mangled)."""
    for doc in _read_txt_utf8(path):
        yield doc.decode('utf-8')


def _read_txt_utf8(path):
    """read_txt's documents as UTF-8 bytearrays, read line by line: memory is bounded by the
    longest document, held once as bytes (a str of it can take 4 bytes per character)."""
    _check_text_file(path)
    doc, bad_lines, first_bad = bytearray(), 0, None  # a bytearray grows in place: no list of lines
    with open(path, 'rb') as f:
        for number, line in enumerate(f, 1):
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if b'\0' in line:
                raise DataError(f"{path}:{number}: a NUL byte: binary data, not text; give a UTF-8 text file")
            try:
                line.decode('utf-8')
            except UnicodeDecodeError:
                line = line.decode('utf-8', 'replace').encode('utf-8')
                bad_lines += 1
                first_bad = first_bad or number
            if line.strip():
                doc += line
            elif doc:
                yield _without_trailing_newlines(doc)
                doc = bytearray()
    if doc:
        yield _without_trailing_newlines(doc)
    if bad_lines:
        print(f"warning: {path}: {bad_lines:,} of {number:,} lines are not valid UTF-8 (the first is line "
              f"{first_bad}); their bad bytes were read as U+FFFD. If the file is latin-1 or cp1252, convert it: "
              f"iconv -f latin1 -t UTF-8 {path} > utf8.txt", file=sys.stderr)


def _without_trailing_newlines(doc):
    """doc.rstrip(b'\\n') in place (a copy of a long document would double its memory)."""
    while doc.endswith(b'\n'):
        del doc[-1:]
    return doc


def _checked_text(text, where, text_column):
    """A document's text, or the one-line error for a column that holds something else."""
    if not isinstance(text, str):
        raise DataError(f"{where}: column '{text_column}' holds {type(text).__name__}, not text; "
                        f"set --text_column to the column with the text")
    return text


def read_jsonl(path, text_column):
    """The text_column of a JSON Lines file, one object per line, read with the json module so
    that a malformed line is reported by its number. Rows whose text is null or absent are skipped."""
    _check_text_file(path)
    have_column = False
    with open(path, 'rb') as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)  # bytes: a UTF-8 BOM is accepted, bad UTF-8 is a ValueError
            except ValueError as e:
                raise DataError(f"{path}:{number}: not a valid JSON line ({_first_line(e)}); fix or delete that line")
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, not an object with a "
                                f"'{text_column}' field")
            if text_column not in row and not have_column:
                raise DataError(f"{path}:{number}: no column '{text_column}'; available columns: "
                                f"{', '.join(row)} (choose one with --text_column=...)")
            have_column = True
            text = row.get(text_column)
            if text is None:
                continue
            yield _checked_text(text, f"{path}:{number}", text_column)


def _read_table(path, text_column):
    """A .json/.parquet file through the datasets library (streamed: no cache copy); any error of
    the reader below it (pyarrow's ArrowInvalid, ...) becomes one line naming the file."""
    import datasets
    builder = 'parquet' if path.endswith('.parquet') else 'json'
    if builder == 'json':
        _check_text_file(path)
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split='train', streaming=True)
        yield from _texts_of(ds, text_column, path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader's own exceptions are many and undocumented
        raise DataError(f"{path}: not readable as {builder} ({type(e).__name__}: {_first_line(e)}); check the file, "
                        f"or convert it to .jsonl (one JSON object per line) or .txt")


def _read_hub(name, split, text_column, streaming):
    """A Hugging Face hub dataset. Offline this fails (after datasets' retries): say so in one line."""
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
        docs = _texts_of(ds, text_column, f"{name} (split {split})")
        first = next(docs, None)  # streaming datasets only connect on the first read
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - connection, auth, missing repo or split: same advice
        raise SystemExit(f"could not load the hub dataset '{name}' ({_first_line(e)}) and there is no local file of "
                         f"that name; offline? use --dataset=pydocs "
                         f"or a local .txt/.jsonl/.parquet file or directory, e.g. --dataset=corpus.txt")
    if first is not None:
        yield first
        yield from docs


def _texts_of(ds, text_column, what):
    """The text_column of a datasets Dataset or IterableDataset, batch by batch (fast)."""
    def missing(columns):
        return DataError(f"{what}: no column '{text_column}'; available columns: {', '.join(columns)} "
                         f"(choose one with --text_column=...)")
    if ds.column_names is not None and text_column not in ds.column_names:  # None: streaming, not known yet
        raise missing(ds.column_names)
    for batch in ds.iter(batch_size=1024):
        if text_column not in batch:
            raise missing(list(batch))
        for text in batch[text_column]:
            if text is None:
                continue
            yield _checked_text(text, what, text_column)


def _read_local(path, text_column):
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(d, f), path)
                       for d, _, fs in os.walk(path) for f in fs if f.endswith(_LOCAL_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no {'/'.join(_LOCAL_SUFFIXES)} files in this directory")
        for rel in files:
            yield from _read_local(os.path.join(path, rel), text_column)
    elif path.endswith('.txt'):
        yield from _read_txt_utf8(path)
    elif path.endswith('.jsonl'):
        yield from read_jsonl(path, text_column)
    elif path.endswith(_LOCAL_SUFFIXES):
        yield from _read_table(path, text_column)
    else:
        raise DataError(f"{path}: unknown file type; use {', '.join(_LOCAL_SUFFIXES)} or a directory of them")


def open_corpus(dataset, text_column='text', split='train', hub_streaming=True, num_workers=2):
    """(kind, name, documents iterator) for the dataset setting; name is the default out_dir's."""
    if dataset == 'pydocs':
        return 'pydocs', 'pydocs', read_pydocs(num_workers)
    if os.path.exists(dataset):
        stem = os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]
        return 'local', stem, _read_local(dataset, text_column)
    if dataset.endswith(_LOCAL_SUFFIXES) or dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1:
        raise DataError(f"{dataset}: no such file or directory")
    hub_name = 'JeanKaddour/minipile' if dataset == 'minipile' else dataset
    return 'hub', hub_name.split('/')[-1], _read_hub(hub_name, split, text_column, hub_streaming)


# ----------------------------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """A tiktoken Encoding (base vocabulary + our 5 special tokens): what training, eval and sampling
    use. Plain text is always encoded as ordinary text, so '<|mask|>' typed in a document is just
    characters, never the mask id."""

    def __init__(self, enc, recipe):
        self.enc = enc
        self.recipe = recipe
        self.vocab_size = enc.n_vocab
        ids = {key: enc.encode_single_token(tok) for key, tok in _SPECIALS.items()}
        self.eod_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id = (ids[k] for k in _SPECIALS)
        self.special_ids = list(ids.values())

    def __repr__(self):
        return f"Tokenizer({self.enc.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=2):
        """Ordinary encoding of many texts on num_threads threads (tiktoken releases the GIL)."""
        pieces = _thread_map(lambda part: [self.enc.encode_ordinary(t) for t in part], list(texts), num_threads)
        return [ids for piece in pieces for ids in piece]

    def decode(self, ids):
        """Text of a list / 1-D tensor / ndarray of ids; specials render as their names ('<|mask|>'),
        ids outside the vocabulary (no model here emits them; a caller may pass them) as '<|unk:ID|>'."""
        ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
        try:
            return self.enc.decode(ids)
        except (KeyError, OverflowError):
            pass
        out, run = [], []
        for i in ids:
            try:
                self.enc.decode_single_token_bytes(i)
                run.append(i)
            except (KeyError, OverflowError):
                out += [self.enc.decode(run), f'<|unk:{i}|>']
                run = []
        return ''.join(out) + self.enc.decode(run)


def _thread_map(fn, items, num_threads):
    """fn over ~4*num_threads contiguous slices of items, results in order. Slices rather than
    single items: one future per document costs more than encoding it."""
    n = max(1, min(len(items), 4 * num_threads))
    bounds = [len(items) * k // n for k in range(n + 1)]
    parts = [items[a:b] for a, b in zip(bounds, bounds[1:])]
    if num_threads <= 1:
        return [fn(p) for p in parts]
    with ThreadPoolExecutor(num_threads) as ex:
        return list(ex.map(fn, parts))


def _named_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - unknown name, or no network to download the vocabulary
        raise SystemExit(f"could not load the tiktoken encoding '{name}' ({type(e).__name__}: {_first_line(e)}); its "
                         f"vocabulary is downloaded on first use, which fails offline: use --tokenizer=bpe to "
                         f"train a tokenizer on the corpus instead")


def _with_specials(name, pattern, ranks, base_specials, n_base):
    specials = {**base_specials, **{tok: n_base + i for i, tok in enumerate(_SPECIALS.values())}}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def train_bpe(texts, n_base, pattern=_SPLIT_PATTERN):
    """Byte-level BPE with n_base tokens (256 bytes + merges) trained with rustbpe from an iterator
    of texts; returns the mergeable ranks {token bytes: id}. A small corpus may yield fewer merges."""
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, n_base, pattern=pattern)
    return {bytes(token): rank for token, rank in tok.get_mergeable_ranks()}


def save_ranks(ranks, path):
    """tiktoken's ranks file: one line per token, base64 of its bytes, a space, its rank."""
    with open(path, 'w', encoding='ascii') as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def load_ranks(path):
    """Inverse of save_ranks. (tiktoken.load.load_tiktoken_bpe would cache by path under /tmp,
    and so could return stale ranks after the data directory is prepared again.)"""
    ranks = {}
    with open(path, 'rb') as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenizer_from_recipe(recipe, data_dir=None):
    """Rebuild the Tokenizer from meta['tokenizer'] (which a checkpoint stores too). A bpe recipe
    needs the data directory holding its ranks file, whose sha256 must match the recipe's."""
    if recipe['kind'] == 'bpe':
        if data_dir is None:
            raise DataError("a bpe tokenizer needs the data directory that holds its ranks file")
        path = os.path.join(data_dir, recipe['file'])
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing; {_remedy(data_dir)}")
        if recipe.get('file_sha256') and _sha256_file(path) != recipe['file_sha256']:
            raise DataError(f"{path} is not the tokenizer this recipe was trained with (sha256 differs): "
                            f"was {data_dir} prepared again since? Use the data directory of the checkpoint")
        ranks, base_specials = load_ranks(path), {}
    elif recipe['kind'] == 'tiktoken':
        base = _named_encoding(recipe['name'])
        ranks, base_specials = base._mergeable_ranks, base._special_tokens  # tiktoken's documented extension path
        if base.n_vocab != recipe['n_base'] or base._pat_str != recipe['pattern']:
            raise DataError(f"tiktoken's '{recipe['name']}' differs from the one the data was prepared with "
                            f"({base.n_vocab} vs {recipe['n_base']} tokens); prepare the data again")
    else:
        raise DataError(f"unknown tokenizer kind {recipe['kind']!r} (a newer prepare_data.py?)")
    enc = _with_specials(recipe['name'], recipe['pattern'], ranks, base_specials, recipe['n_base'])
    want = recipe.get('special_tokens')
    if want is not None and want != {t: enc.encode_single_token(t) for t in want}:
        raise DataError(f"special token ids of the recipe do not match {recipe['name']}")
    return Tokenizer(enc, recipe)


def load_tokenizer(data_dir):
    """The Tokenizer of a prepared data directory."""
    return tokenizer_from_recipe(load_meta(data_dir)['tokenizer'], data_dir)


def token_dtype(vocab_size):
    """Smallest unsigned dtype that holds every id < vocab_size (uint16 up to 65536 tokens)."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# the data directory: reading and validation

def load_meta(data_dir):
    """meta.json of a prepared data directory, after checking that its files are all there and
    have the sizes meta.json promises. Raises DataError with the fix in the message."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; {_remedy(data_dir)}")
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} has no meta.json (not a prepared data directory, or preparing it did not "
                        f"finish); {_remedy(data_dir)}")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); {_remedy(data_dir)}")
    source = meta.get('source') if isinstance(meta, dict) else None
    remedy = _remedy(data_dir, source.get('dataset') if isinstance(source, dict) else None)
    if not isinstance(meta, dict) or meta.get('format_version') != _FORMAT_VERSION:
        version = meta.get('format_version') if isinstance(meta, dict) else None
        raise DataError(f"{data_dir} has format_version {version!r}, this code reads {_FORMAT_VERSION}; "
                        f"prepare it again: {remedy}")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path} is damaged: {problem}; {remedy}")
    for s in _SPLITS:
        _check_split(data_dir, meta, s, remedy, in_order=True)
        _check_token_ids(data_dir, meta, s, remedy)
    recipe = meta['tokenizer']
    if recipe.get('file') and not os.path.isfile(os.path.join(data_dir, recipe['file'])):
        raise DataError(f"{data_dir}: {recipe['file']} is missing; {remedy}")
    return meta


def _meta_problem(meta):
    """What a meta.json of the current format lacks or has malformed (a str), or None: every
    reader indexes these keys, so a damaged one is caught here rather than as a KeyError later."""
    types = {'tokenizer': dict, 'vocab_size': int, 'special_tokens': dict, 'dtype': str, 'splits': dict,
             'source': dict}
    for key, kind in types.items():
        if key not in meta:
            return f"it has no '{key}'"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"its '{key}' is a {type(meta[key]).__name__}, not a {kind.__name__}"
    if meta['dtype'] not in ('uint16', 'uint32') or meta['dtype'] != token_dtype(meta['vocab_size']).name:
        return f"dtype {meta['dtype']!r} does not fit vocab_size {meta['vocab_size']}"
    specials = meta['special_tokens']
    if set(specials) != set(_SPECIALS) or not all(type(v) is int and 0 <= v < meta['vocab_size']
                                                  for v in specials.values()):
        return f"its special_tokens must map {', '.join(_SPECIALS)} to ids below vocab_size"
    missing = [k for k in ('kind', 'name', 'pattern', 'n_base') if k not in meta['tokenizer']]
    if missing:
        return f"its tokenizer recipe has no {', '.join(repr(k) for k in missing)}"
    for split in _SPLITS:
        info = meta['splits'].get(split)
        if not isinstance(info, dict) or not all(type(info.get(k)) is int and info[k] >= 0 for k in ('tokens', 'docs')):
            return f"its splits has no '{split}' entry with 'tokens' and 'docs' counts"
        if info['docs'] == 0 or info['tokens'] < info['docs']:  # every document ends in <|endofdoc|>
            return f"its {split} split is empty ({info['docs']} documents, {info['tokens']} tokens)"
    return None


_ids_checked = set()  # (path, inode, size, mtime, ctime) of .bin files whose ids were found in range, this process


def _check_token_ids(data_dir, meta, split, remedy, chunk=1 << 24):
    """Every token id of a split below vocab_size: a right-sized .bin can still hold garbage, which
    would fail deep inside the embedding. One chunked pass over the memmap, once per file version
    and process."""
    bin_path = os.path.join(data_dir, f'{split}.bin')
    st = os.stat(bin_path)
    key = (os.path.realpath(bin_path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _ids_checked:
        return
    n = meta['splits'][split]['tokens']
    tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r', shape=(n,))
    top = max(int(tokens[a:a + chunk].max()) for a in range(0, n, chunk))
    del tokens
    if top >= meta['vocab_size']:
        raise DataError(f"{bin_path} holds token id {top}, but the vocabulary has {meta['vocab_size']} ids: "
                        f"corrupt; {remedy}")
    _ids_checked.add(key)


def _check_split(data_dir, meta, split, remedy, in_order=False):
    """Check a split's files against meta.json; return its memory-mapped document offsets. The
    O(docs) check that they never decrease runs only with in_order (once, in load_meta), as
    open_split runs every training step."""
    info = meta['splits'][split]
    bin_path = os.path.join(data_dir, f'{split}.bin')
    docs_path = os.path.join(data_dir, f'{split}_docs.npy')
    if not os.path.isfile(bin_path):
        raise DataError(f"{bin_path} is missing; {remedy}")
    want = info['tokens'] * np.dtype(meta['dtype']).itemsize
    have = os.path.getsize(bin_path)
    if have != want:
        raise DataError(f"{bin_path} has {have} bytes but meta.json says {info['tokens']} {meta['dtype']} tokens "
                        f"({want} bytes): truncated or corrupt; {remedy}")
    if not os.path.isfile(docs_path):
        raise DataError(f"{docs_path} is missing; {remedy}")
    try:
        starts = np.load(docs_path, mmap_mode='r')
    except (OSError, ValueError, EOFError):  # garbage: 'pickled data'; truncated: 'mmap length'
        raise DataError(f"{docs_path} is not a readable .npy array: truncated or corrupt; {remedy}")
    if starts.ndim != 1 or starts.dtype.kind not in 'iu' or len(starts) != info['docs']:
        raise DataError(f"{docs_path} holds {starts.dtype} of shape {starts.shape}, but meta.json says "
                        f"{info['docs']} int64 document offsets: corrupt; {remedy}")
    if len(starts) and (starts[0] != 0 or starts[-1] >= info['tokens']
                        or in_order and (starts[1:] < starts[:-1]).any()):
        raise DataError(f"{docs_path}: the document offsets do not rise from 0 to below the {info['tokens']} "
                        f"tokens of {split}.bin: corrupt; {remedy}")
    return starts


def _meta_on_disk(data_dir):
    try:
        with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_versions_seen = {}  # .bin path -> (inode, mtime) of the file this process last read for it


def _changed_under_job(data_dir):
    return DataError(f"{data_dir} changed while this job ran (prepared again or removed: its meta.json "
                     f"is not the one the job started with), so the job's data is gone; start the job "
                     f"again on the new data, or prepare the old corpus into another --out_dir")


def open_split(data_dir, split, meta=None):
    """(tokens, doc_starts) of one split: a read-only np.memmap of the token ids and the int64 start
    offset of each document (also memory-mapped, so re-opening per batch is cheap). With the job's
    meta, a split whose file was replaced since the last open (even by one of the same size) is
    checked against it, so a job never trains on another corpus unnoticed."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, not {split!r}")
    if meta is None:
        meta = load_meta(data_dir)
    try:
        doc_starts = _check_split(data_dir, meta, split, _remedy(data_dir, meta['source'].get('dataset')))
    except DataError:
        if _meta_on_disk(data_dir) != meta:  # not damage: the directory was replaced (or removed)
            raise _changed_under_job(data_dir) from None
        raise
    bin_path = os.path.join(data_dir, f'{split}.bin')
    st = os.stat(bin_path)
    version, seen = (st.st_ino, st.st_mtime_ns), _versions_seen.get(bin_path)
    if seen is not None and seen != version and _meta_on_disk(data_dir) != meta:
        raise _changed_under_job(data_dir)
    _versions_seen[bin_path] = version
    tokens = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r',
                       shape=(meta['splits'][split]['tokens'],))
    return tokens, doc_starts


# ----------------------------------------------------------------------------------------------
# preparing a data directory

def _in_val(seed, index, val_fraction):
    """A coin flip per (seed, document index): reproducible, and needs no look-ahead (streaming)."""
    h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') < val_fraction * 2 ** 64


def _spool_corpus(docs, tmp, val_fraction, seed):
    """Reading pass: write every non-empty document to its split's spool file (8-byte length, UTF-8).
    Returns per-split doc and char counts, and the sha256 of all documents in corpus order."""
    from tqdm import tqdm
    sha = hashlib.sha256()
    stats = {s: {'docs': 0, 'chars': 0} for s in _SPLITS}
    last = {}  # split -> (offset, chars) of its last record, to move one if a split stays empty
    files = {s: open(os.path.join(tmp, f'{s}.spool'), 'w+b') for s in _SPLITS}
    try:
        index = 0
        for doc in tqdm(docs, desc='reading corpus', unit=' docs', mininterval=1.0):
            if not doc:
                continue
            if isinstance(doc, str):
                data, chars = doc.encode('utf-8', 'replace'), len(doc)  # 'replace': lone surrogates from JSON
            else:  # UTF-8 bytes or bytearray (local .txt files)
                data, chars = doc, _utf8_chars(doc)
            header = len(data).to_bytes(8, 'little')
            sha.update(header)
            sha.update(data)
            s = 'val' if _in_val(seed, index, val_fraction) else 'train'
            last[s] = (files[s].tell(), chars)
            files[s].write(header)
            files[s].write(data)
            stats[s]['docs'] += 1
            stats[s]['chars'] += chars
            index += 1
        if index < 2:
            raise DataError(f"the corpus has {index} non-empty document{'s' * (index != 1)}; need at least 2 "
                            f"(one for train, one for val)")
        for src, dst in (('train', 'val'), ('val', 'train')):
            if stats[dst]['docs'] == 0:  # all landed in src: move src's last document (the corpus's last)
                offset, chars = last[src]
                files[src].seek(offset)
                files[dst].write(files[src].read())
                files[src].truncate(offset)
                stats[src]['docs'] -= 1
                stats[src]['chars'] -= chars
                stats[dst]['docs'] += 1
                stats[dst]['chars'] += chars
    finally:
        for f in files.values():
            f.close()
    return stats, sha.hexdigest()


def _utf8_chars(data, chunk=1 << 22):
    """The number of characters in valid UTF-8 bytes: all bytes but the continuation bytes
    (counted in chunks, so a long document needs no temporary of its size)."""
    if data.isascii():
        return len(data)
    view = np.frombuffer(data, np.uint8)
    continuation = sum(int(np.count_nonzero((view[a:a + chunk] & 0xC0) == 0x80)) for a in range(0, len(view), chunk))
    return len(data) - continuation


def _spooled_docs(path, max_chars=None):
    """Documents back from a spool file, optionally stopping after max_chars characters."""
    chars = 0
    with open(path, 'rb') as f:
        while (header := f.read(8)) and (max_chars is None or chars < max_chars):
            doc = f.read(int.from_bytes(header, 'little')).decode('utf-8')
            chars += len(doc)
            yield doc


def _parts(docs, part_chars):
    """Group documents into lists of about part_chars characters: one unit of thread work."""
    part, chars = [], 0
    for doc in docs:
        part.append(doc)
        chars += len(doc)
        if chars >= part_chars:
            yield part
            part, chars = [], 0
    if part:
        yield part


def _encode_split(tok, spool, bin_path, docs_path, n_docs, dtype, executor, num_threads, bar):
    """Encoding pass for one split: parts of the corpus are encoded on the executor's threads and
    appended to the .bin in order, with a few parts in flight, so memory stays bounded and the
    threads never wait for each other. Returns the number of tokens written."""
    eod = np.array([tok.eod_id], dtype=dtype)

    def encode_part(part):
        pieces = []
        for doc in part:
            # encode_ordinary's ids as a uint32 array: no list of Python ints (an object per token);
            # releases the GIL, so the threads run in parallel
            pieces.append(tok.enc.encode_to_numpy(doc, disallowed_special=()).astype(dtype))
            pieces.append(eod)
        lengths = np.array([len(ids) + 1 for ids in pieces[0::2]], dtype=np.int64)
        return np.concatenate(pieces), lengths

    n_tokens = i = 0
    # plain writes, not a memmap: on a full disk a write raises OSError, a memmap store is a SIGBUS
    with open(bin_path, 'wb') as out, open(docs_path, 'wb') as docs_out:
        np.lib.format.write_array_header_1_0(docs_out, {'descr': '<i8', 'fortran_order': False, 'shape': (n_docs,)})

        def write(result):
            nonlocal n_tokens, i
            ids, lengths = result
            out.write(ids.tobytes())
            docs_out.write((n_tokens + np.cumsum(lengths) - lengths).astype('<i8').tobytes())
            n_tokens += len(ids)
            i += len(lengths)
            bar.update(len(lengths))

        pending = deque()
        for part in _parts(_spooled_docs(spool), _PART_CHARS):
            pending.append(executor.submit(encode_part, part))
            if len(pending) > 2 * num_threads:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())
    assert i == n_docs, (i, n_docs)
    return n_tokens


def _default_out_dir(name):
    return os.path.join('data', name)


def _check_replaceable(out_dir):
    """Only ever replace a directory that holds nothing but what this script writes."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise DataError(f"out_dir {out_dir} exists and is not a directory; choose another --out_dir")
        foreign = sorted(set(os.listdir(out_dir)) - _DATA_FILES)
        if foreign:
            raise DataError(f"out_dir {out_dir} holds files prepare_data.py did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose another --out_dir or empty it")


# errno -> what to do, for a write that fails (on the first write into the work directory, or later)
_WRITE_FAILURES = {
    errno.ENOSPC: 'the disk is full: free space there or choose another --out_dir',
    errno.EDQUOT: 'the disk quota is used up: free space there or choose another --out_dir',
    errno.EFBIG: 'a file-size limit was reached (ulimit -f): raise it or choose another --out_dir',
    errno.EROFS: 'choose another --out_dir, on a writable file system',
}
_PATH_FAILURES = {  # only while creating the work directory: later they could be about reading the corpus
    errno.EACCES: 'no permission to write there: choose another --out_dir',
    errno.EPERM: 'no permission to write there: choose another --out_dir',
    errno.EEXIST: 'a part of the path is a file, not a directory: choose another --out_dir',
    errno.ENOTDIR: 'a part of the path is a file, not a directory: choose another --out_dir',
}


def _write_error(out_dir, e, advice):
    where = f" ({e.filename})" if e.filename else ''
    state = 'is unchanged' if os.path.exists(out_dir) else 'was not created'
    return DataError(f"cannot write {out_dir}{where}: {e.strerror or e}; {advice}. {out_dir} {state} and "
                     f"no temporary files are left")


def _work_dir_pattern(base):
    return re.compile(rf'\.{re.escape(base)}\.tmp\d+(\.old)?')


def _remove_abandoned_work_dirs(parent, base):
    """Remove the work directories that interrupted runs (any pid) left beside out_dir. A running
    prepare holds a lock on its own (see _lock), so it is never taken for abandoned."""
    if fcntl is None:
        return  # no flock (Windows): a live run could not be told from a dead one
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not _work_dir_pattern(base).fullmatch(name) or not os.path.isdir(path):
            continue
        if not name.endswith('.old'):  # a .old is always garbage: the data directory a run replaced
            try:
                fd = _lock(path)
            except BlockingIOError:
                continue  # a live run's
        else:
            fd = None
        print(f"removing {path}, left by an interrupted run")
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _lock(path):
    """An exclusive flock on directory path, held until the returned fd is closed (or the process
    dies, however it dies). Raises BlockingIOError if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_work_dir(out_dir):
    """The temporary sibling directory of out_dir that prepare() builds in, created and locked
    before any corpus is read, so an output path that cannot be written fails at once.
    Returns (path, lock fd or None)."""
    _check_replaceable(out_dir)
    parent, base = os.path.split(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f'.{base}.tmp{os.getpid()}')
    lock = None
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_abandoned_work_dirs(parent, base)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        lock = _lock(tmp) if fcntl is not None else None
        with open(os.path.join(tmp, 'probe'), 'wb') as f:  # a directory can be creatable, its files not
            f.write(b'x')
        os.remove(os.path.join(tmp, 'probe'))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        advice = _WRITE_FAILURES.get(e.errno) or _PATH_FAILURES.get(e.errno)
        if advice is None:
            raise
        raise _write_error(out_dir, e, advice) from None
    return tmp, lock


def _make_tokenizer(tokenizer, base_enc, vocab_size, name, tmp, bpe_max_chars):
    """The Tokenizer for prepare(): a BPE trained on tmp/train.spool (ranks saved to tmp), or the
    named tiktoken encoding base_enc; both with the special tokens on top."""
    n_special = len(_SPECIALS)
    if tokenizer == 'bpe':
        t0 = time.time()
        ranks = train_bpe(_spooled_docs(os.path.join(tmp, 'train.spool'), int(bpe_max_chars)), vocab_size - n_special)
        n_base = len(ranks)
        if n_base + n_special < vocab_size:
            print(f"note: the corpus only supports {n_base - 256} merges: vocab_size is {n_base + n_special}, "
                  f"not {vocab_size}")
        save_ranks(ranks, os.path.join(tmp, _RANKS_FILE))
        recipe = {'kind': 'bpe', 'name': f'{name}_bpe{n_base + n_special}', 'pattern': _SPLIT_PATTERN,
                  'file': _RANKS_FILE, 'file_sha256': _sha256_file(os.path.join(tmp, _RANKS_FILE)), 'n_base': n_base}
        enc = _with_specials(recipe['name'], _SPLIT_PATTERN, ranks, {}, n_base)
        print(f"trained BPE: {n_base} base tokens + {n_special} special in {time.time() - t0:.1f}s")
    else:
        recipe = {'kind': 'tiktoken', 'name': tokenizer, 'pattern': base_enc._pat_str, 'file': None,
                  'n_base': base_enc.n_vocab}
        enc = _with_specials(tokenizer, base_enc._pat_str, base_enc._mergeable_ranks, base_enc._special_tokens,
                             base_enc.n_vocab)
    recipe['special_tokens'] = {t: enc.encode_single_token(t) for t in _SPECIALS.values()}
    return Tokenizer(enc, recipe)


def prepare(dataset='pydocs', text_column='text', split='train', tokenizer='bpe', vocab_size=8192, data_dir='',
            val_fraction=0.01, seed=1337, max_docs=0, num_threads=2, bpe_max_chars=1_000_000_000,
            hub_streaming=True):
    """Write the data directory for a corpus (see the module docstring); returns its path.

    Everything is built in a temporary sibling directory that is renamed into place at the end
    (meta.json last), so an interrupted run never leaves a directory that looks valid."""
    t_start = time.time()
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    for key, value, low in (('num_threads', num_threads, 1), ('max_docs', max_docs, 0), ('bpe_max_chars', bpe_max_chars, 1)):
        if not value >= low:
            raise DataError(f"{key}={value!r} must be >= {low}")
    n_special = len(_SPECIALS)
    if tokenizer == 'bpe' and vocab_size < 256 + n_special:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE: need at least "
                        f"{256 + n_special} (256 bytes + {n_special} special tokens)")
    base_enc = None if tokenizer == 'bpe' else _named_encoding(tokenizer)  # fail fast, before reading
    kind, name, source_docs = open_corpus(dataset, text_column, split, hub_streaming, num_threads)
    out_dir = data_dir or _default_out_dir(name)
    tmp, lock = _make_work_dir(out_dir)
    try:
        # 1. read the corpus once, splitting it into train/val spools
        try:
            docs = islice(source_docs, max_docs) if max_docs > 0 else source_docs
            stats, fingerprint = _spool_corpus(docs, tmp, val_fraction, seed)
        finally:
            source_docs.close()  # stops pydocs' parser processes when max_docs cut the reading short
        total_chars = sum(s['chars'] for s in stats.values())
        print(f"corpus: {stats['train']['docs'] + stats['val']['docs']:,} documents, {total_chars / 1e6:.1f}M "
              f"characters ({stats['train']['docs']:,} train / {stats['val']['docs']:,} val) "
              f"in {time.time() - t_start:.1f}s")

        # 2. the tokenizer
        t0 = time.time()
        tok = _make_tokenizer(tokenizer, base_enc, vocab_size, name, tmp, bpe_max_chars)
        dtype = token_dtype(tok.vocab_size)
        t_tok = time.time() - t0

        # 3. encode both splits into .bin + doc offsets
        from tqdm import tqdm
        t0 = time.time()
        n_docs = stats['train']['docs'] + stats['val']['docs']
        with ThreadPoolExecutor(num_threads) as executor, \
                tqdm(total=n_docs, desc='encoding', unit=' docs', mininterval=1.0) as bar:
            for s in _SPLITS:
                stats[s]['tokens'] = _encode_split(
                    tok, os.path.join(tmp, f'{s}.spool'), os.path.join(tmp, f'{s}.bin'),
                    os.path.join(tmp, f'{s}_docs.npy'), stats[s]['docs'], dtype, executor, num_threads, bar)
                os.remove(os.path.join(tmp, f'{s}.spool'))
        t_encode = time.time() - t0

        # 4. meta.json last, then move the finished directory into place
        source = {'dataset': dataset, 'kind': kind, 'docs': n_docs, 'chars': total_chars,
                  'fingerprint': fingerprint, 'max_docs': max_docs}
        if kind != 'pydocs':
            source['text_column'] = text_column
        if kind == 'hub':
            source['split'] = split
        meta = {
            'format_version': _FORMAT_VERSION,
            'tokenizer': tok.recipe,
            'vocab_size': tok.vocab_size,
            'special_tokens': {key: tok.enc.encode_single_token(t) for key, t in _SPECIALS.items()},
            'dtype': dtype.name,
            'splits': {s: {'tokens': stats[s]['tokens'], 'docs': stats[s]['docs'], 'chars': stats[s]['chars']}
                       for s in _SPLITS},
            'source': source,
            'val_fraction': val_fraction,
            'seed': seed,
            'bpe_max_chars': int(bpe_max_chars) if tokenizer == 'bpe' else None,
        }
        with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=2)
            f.write('\n')
        _install(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + '.old', ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
            raise _write_error(out_dir, e, _WRITE_FAILURES[e.errno]) from None
        raise
    finally:
        if lock is not None:
            os.close(lock)

    n_tokens = stats['train']['tokens'] + stats['val']['tokens']
    print(f"wrote {out_dir}: vocab_size {tok.vocab_size} ({dtype.name}); "
          f"train {stats['train']['tokens']:,} tokens / {stats['train']['docs']:,} docs, "
          f"val {stats['val']['tokens']:,} tokens / {stats['val']['docs']:,} docs")
    print(f"time: {time.time() - t_start:.1f}s total, tokenizer {t_tok:.1f}s, encoding {t_encode:.1f}s "
          f"({n_tokens / max(t_encode, 1e-9) / 1e6:.2f}M tokens/s on {num_threads} threads)")
    return out_dir


def _install(tmp, out_dir):
    """Swap the finished temporary directory in for out_dir (an old data directory is removed)."""
    _check_replaceable(out_dir)
    if os.path.exists(out_dir):
        old = tmp + '.old'
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)  # the old data back, as the error message promises
            raise
        shutil.rmtree(old, ignore_errors=True)  # a later run removes what is left (see _remove_abandoned_work_dirs)
    else:
        os.rename(tmp, out_dir)


# ----------------------------------------------------------------------------------------------

if __name__ == '__main__':
    config_keys = list(inspect.signature(prepare).parameters)  # the config globals above
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    try:
        prepare(**config)
    except DataError as e:
        sys.exit(f"prepare_data.py: {e}")
