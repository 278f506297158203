"""
Turn a text corpus into the data directory that training memory-maps (common.py reads it):

    train.bin, val.bin              token ids, uint16 (uint32 past 65,536), each document ended by <|endofdoc|>
    train_docs.npy, val_docs.npy    int64 start of every document in its .bin
    tokenizer.tiktoken              the BPE ranks (--tokenizer=bpe only), in tiktoken's format
    meta.json                       how to read all of the above; written last

    python prepare_data.py                                  # offline: stdlib/torch/numpy docstrings
    python prepare_data.py --dataset=../shared/corpus/imdb  # a folder of .txt.xz files
    python prepare_data.py --dataset=minipile --tokenizer=gpt2  # the hub, a tiktoken vocabulary (online)

A local corpus is a UTF-8 .txt (blank lines between documents), .jsonl, .json or .parquet file, maybe
compressed (x.txt.xz), or a directory of them. It is streamed once to spool files: memory stays bounded.
"""
import ast
import base64
import bz2
import codecs
import gzip
import hashlib
import importlib.util
import inspect
import json
import lzma
import multiprocessing
import os
import re
import signal
import sys
import sysconfig
import time
import warnings
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice

import numpy as np
import rustbpe
from tqdm import tqdm

import common
from common import InputError

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

# GPT-4's split pattern with digit runs of at most 2 (as nanochat): fewer number tokens in a small vocab
_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# 'word| word': the split pattern always cuts there, so pieces cut there give the whole's ids and BPE counts
_CUT = re.compile(r'(?<=[A-Za-z]) (?=[A-Za-z])')
_RANKS_FILE = 'tokenizer.tiktoken'
_DATA_FILES = {'meta.json', _RANKS_FILE, 'train.bin', 'val.bin', 'train_docs.npy', 'val_docs.npy'}
_FORMATS = ('.txt', '.jsonl', '.json', '.parquet')
_COMPRESSED = {'.xz': (lzma.open, 'xz'), '.gz': (gzip.open, 'gzip'), '.bz2': (bz2.open, 'bzip2')}
_PYDOCS_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'testing'}
_PART_CHARS = 256_000  # text per unit of encoding work (at most 2·num_threads units wait in memory)


def read_pydocs(num_workers=2):
    """Docstrings of the standard library, torch and numpy (about 9 MB of technical English on any machine
    with this repo's venv: works offline), parsed by ast on num_workers processes, repeats dropped."""
    specs = [importlib.util.find_spec(name) for name in ('torch', 'numpy')]  # found, not imported
    roots = [sysconfig.get_paths()['stdlib']] + [sorted(spec.submodule_search_locations)[0] for spec in specs
                                                 if spec is not None and spec.submodule_search_locations]
    paths = []
    for root in roots:  # sorted, without tests and vendored packages
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _PYDOCS_SKIP_DIRS]
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith('.py')]
        paths += sorted(files)
    pool, per_file, seen = None, map(file_docstrings, paths), set()
    if num_workers > 1 and sys.platform == 'linux':
        # fork: spawn would re-run a caller's script that lacks a __main__ guard; Ctrl-C is the main process's
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context('fork'),
                                   initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        per_file = pool.map(file_docstrings, paths, chunksize=16)
    try:
        for doc in (doc for docs in per_file for doc in docs):
            key = hashlib.blake2b(doc.encode('utf-8', 'replace'), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                yield doc
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # stopped early (max_docs): skip the files not yet parsed


def file_docstrings(path):
    """The docstrings of one .py file worth keeping (not "Return self."); [] if it does not parse."""
    try:
        with open(path, 'rb') as f, warnings.catch_warnings(action='ignore'):  # SyntaxWarnings in old code
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
        return []
    return [doc for doc in docstrings(tree) if len(doc) >= 24 and len(doc.split()) >= 4]


def docstrings(node):
    """Docstrings in source order; visits statements only (much faster than ast.walk)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield (ast.get_docstring(node, clean=True) or '').strip()  # '' is dropped with the tiny ones
    for field in ('body', 'handlers', 'orelse', 'finalbody'):
        for child in getattr(node, field, ()):
            if hasattr(child, 'body'):  # defs and compound statements
                yield from docstrings(child)


def file_format(path):
    """'.txt', '.jsonl', '.json' or '.parquet' by the name inside any compression (x.txt.xz is a .txt)."""
    stem, ext = os.path.splitext(path)
    ext = os.path.splitext(stem)[1] if ext in _COMPRESSED else ext
    return ext if ext in _FORMATS else None


def open_file(path, mode='rb', **text_options):
    """A file, decompressed on the fly if it is compressed."""
    return _COMPRESSED.get(os.path.splitext(path)[1], (open,))[0](path, mode, **text_options)


def check_text_file(path):
    """Refuse UTF-16/32 (a byte-order mark or NUL bytes) and binary files, which would read as garbage."""
    with open_file(path) as f:
        head = f.read(1 << 16)
    convert = f"convert it to UTF-8 first, e.g. iconv -f {{}} -t UTF-8 {path} > utf8{file_format(path)}"
    for bom, name in ((codecs.BOM_UTF32_LE, 'UTF-32'), (codecs.BOM_UTF32_BE, 'UTF-32'),
                      (codecs.BOM_UTF16_LE, 'UTF-16'), (codecs.BOM_UTF16_BE, 'UTF-16')):
        if head.startswith(bom):
            raise InputError(f"{path} is {name} text; {convert.format(name)}")
    if b'\0' in head:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if max(even, odd) > len(head) // 8 and min(even, odd) < max(even, odd) // 8:  # every other byte NUL
            raise InputError(f"{path} looks like UTF-16 text without a byte-order mark; {convert.format('UTF-16LE')}")
        raise InputError(f"{path} holds NUL bytes (the first at byte {head.index(0)}): a binary file, not text; "
                         f"give a UTF-8 text file")


def read_txt(path):
    """The documents (blank lines between them) of a UTF-8 text file, as UTF-8 bytearrays: a str may take 4
    bytes a character. Bad UTF-8 bytes become U+FFFD, with a warning: latin-1 is converted, not mangled."""
    check_text_file(path)
    doc, bad_lines, first_bad, number = bytearray(), 0, None, 0
    # surrogateescape keeps bad bytes as they are, to be replaced exactly as a bytes decode does
    with open_file(path, 'rt', encoding='utf-8-sig', errors='surrogateescape') as f:
        for number, line in enumerate(f, 1):
            if '\0' in line:
                raise InputError(f"{path}:{number}: a NUL byte: binary data, not text; give a UTF-8 text file")
            try:
                data = line.encode('utf-8')
            except UnicodeEncodeError:
                data = line.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace').encode('utf-8')
                bad_lines, first_bad = bad_lines + 1, first_bad or number
            if line.strip(' \t\n\r\x0b\x0c'):  # ASCII whitespace, as bytes.strip: a line of U+00A0 is text
                doc += (b'\n' if doc else b'') + data.rstrip(b'\n')
            elif doc:
                yield doc
                doc = bytearray()
    if doc:
        yield doc
    if bad_lines:
        print(f"warning: {path}: {bad_lines:,} of {number:,} lines are not valid UTF-8 (the first is line "
              f"{first_bad}); their bad bytes were read as U+FFFD. If the file is latin-1 or cp1252, convert it: "
              f"iconv -f latin1 -t UTF-8 {path} > utf8.txt", file=sys.stderr)


def checked_text(text, where, text_column):
    if not isinstance(text, str):
        raise InputError(f"{where}: column '{text_column}' holds {type(text).__name__}, not text; "
                         f"set --text_column to the column with the text")
    return text


def read_jsonl(path, text_column):
    """The text_column of a JSON Lines file, a malformed line named by its number; null texts are skipped."""
    check_text_file(path)
    have_column = False
    with open_file(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)  # bytes: a UTF-8 BOM is accepted, bad UTF-8 is a ValueError
            except ValueError as e:
                raise InputError(f"{path}:{number}: not a valid JSON line ({common.first_line(e)}); fix or "
                                 f"delete that line")
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: a JSON {type(row).__name__}, not an object with a "
                                 f"'{text_column}' field")
            if text_column not in row and not have_column:
                raise InputError(f"{path}:{number}: no column '{text_column}'; available columns: "
                                 f"{', '.join(row)} (choose one with --text_column=...)")
            have_column = True
            if row.get(text_column) is not None:
                yield checked_text(row[text_column], f"{path}:{number}", text_column)


def texts_of(ds, text_column, what):
    """The text_column of a datasets Dataset or IterableDataset, batch by batch (fast)."""
    for batch in ds.iter(batch_size=1024):
        if text_column not in batch:
            raise InputError(f"{what}: no column '{text_column}'; available columns: {', '.join(batch)} "
                             f"(choose one with --text_column=...)")
        yield from (checked_text(text, what, text_column) for text in batch[text_column] if text is not None)


def read_local(path, text_column):
    """The documents of a local file, or of every corpus file under a directory (sorted). .json and
    .parquet go through the datasets library (streamed); its many errors are one line, as a damaged file's."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if file_format(f))
        if not files:
            raise InputError(f"{path}: no {'/'.join(_FORMATS)} files (or {'/'.join(_COMPRESSED)} of them) in it")
        for file in files:
            yield from read_local(file, text_column)
        return
    kind = file_format(path)
    try:
        if kind in ('.txt', '.jsonl'):
            yield from read_txt(path) if kind == '.txt' else read_jsonl(path, text_column)
        elif kind:
            import datasets
            if kind == '.json':
                check_text_file(path)
            try:
                ds = datasets.load_dataset(kind[1:], data_files=os.path.abspath(path), split='train', streaming=True)
                yield from texts_of(ds, text_column, path)
            except Exception as e:  # noqa: BLE001 - the reader's own exceptions are many and undocumented
                raise InputError(f"{path}: not readable as {kind[1:]} ({type(e).__name__}: {common.first_line(e)}); "
                                 f"check the file, or convert it to .jsonl (one JSON object per line) or .txt")
        else:
            raise InputError(f"{path}: unknown file type; use {', '.join(_FORMATS)} (optionally compressed: "
                             f"{', '.join(_COMPRESSED)}) or a directory of them")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # a damaged file, plain or compressed
        tool = _COMPRESSED.get(os.path.splitext(path)[1], (None, None))[1]
        hint = f": the file is damaged or cut short (check it with {tool} -t {path})" if tool else ''
        raise InputError(f"{path} could not be read ({common.cause(e)}){hint}") from None


def local_texts(path, text_column='text'):
    """read_local's documents as str, for eval_glue's IMDB split and tools/score_text.py."""
    for doc in read_local(path, text_column):
        yield doc.decode('utf-8') if isinstance(doc, (bytes, bytearray)) else doc


def read_hub(name, split, text_column, streaming):
    """A Hugging Face hub dataset (a streamed one connects at its first read); offline: one line."""
    import datasets
    try:
        yield from texts_of(datasets.load_dataset(name, split=split, streaming=streaming), text_column,
                            f"{name} (split {split})")
    except Exception as e:  # noqa: BLE001 - connection, auth, missing repo or split: same advice
        raise InputError(f"could not load the hub dataset '{name}' ({common.first_line(e)}) and there is no local "
                         f"file of that name; offline? use --dataset=pydocs or a local .txt/.jsonl/.parquet file or "
                         f"directory, e.g. --dataset=corpus.txt")


def corpus_name(dataset):
    """data_dir's default is data/<name>: a local path's stem (x.txt.xz -> x), else the hub name's last part."""
    if dataset != 'pydocs' and os.path.exists(dataset):
        stem, ext = os.path.splitext(os.path.basename(os.path.normpath(dataset)))
        return os.path.splitext(stem)[0] if ext in _COMPRESSED else stem
    return {'minipile': 'JeanKaddour/minipile'}.get(dataset, dataset).split('/')[-1]


def spool_corpus(docs, tmp, val_fraction, seed):
    """Each non-empty document to its split's spool file (8-byte length, UTF-8), the split drawn by a hash of
    (seed, index): reproducible, no look-ahead. -> per-split docs and chars, the sha256 of the corpus."""
    sha, stats, last = hashlib.sha256(), {s: Counter(docs=0, chars=0) for s in common.SPLITS}, {}
    with open(os.path.join(tmp, 'train.spool'), 'w+b') as train, open(os.path.join(tmp, 'val.spool'), 'w+b') as val:
        files = {'train': train, 'val': val}
        for index, doc in enumerate(doc for doc in tqdm(docs, desc='reading corpus', unit=' docs', mininterval=1.0)
                                    if doc):
            if isinstance(doc, str):
                data, chars = doc.encode('utf-8', 'replace'), len(doc)  # 'replace': lone surrogates from JSON
            else:  # UTF-8 bytes (.txt): the characters are the bytes that continue none, counted in chunks
                view, step = np.frombuffer(doc, np.uint8), 1 << 22
                data, chars = doc, len(doc) - (0 if doc.isascii() else sum(
                    int(np.count_nonzero((view[a:a + step] & 0xC0) == 0x80)) for a in range(0, len(doc), step)))
            h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
            s = 'val' if int.from_bytes(h, 'little') < val_fraction * 2 ** 64 else 'train'
            last[s] = (files[s].tell(), chars)
            for part in (len(data).to_bytes(8, 'little'), data):
                sha.update(part)
                files[s].write(part)
            stats[s].update(docs=1, chars=chars)
        n_docs = stats['train']['docs'] + stats['val']['docs']
        if n_docs < 2:
            raise InputError(f"the corpus has {n_docs} non-empty document{'s' * (n_docs != 1)}; need at least 2 "
                             f"(one for train, one for val)")
        for src, dst in (('train', 'val'), ('val', 'train')):
            if stats[dst]['docs'] == 0:  # all landed in src: move src's last document (the corpus's last)
                offset, chars = last[src]
                files[src].seek(offset)
                files[dst].write(files[src].read())
                files[src].truncate(offset)
                stats[src].subtract(docs=1, chars=chars)
                stats[dst].update(docs=1, chars=chars)
    return stats, sha.hexdigest()


def spooled_texts(path, max_chars=None):
    """(text, ends_document) of a spool file's documents, up to the first that starts past max_chars
    characters. A book comes in pieces of at least _PART_CHARS characters cut at _CUT, never held whole."""
    chars = 0
    with open(path, 'rb') as f:
        while (header := f.read(8)) and (max_chars is None or chars < max_chars):
            left, text, decode = int.from_bytes(header, 'little'), '', codecs.getincrementaldecoder('utf-8')().decode
            while left:
                data = f.read(min(left, _PART_CHARS))
                left -= len(data)
                seen, text = len(text), text + decode(data, final=not left)
                cut = _CUT.search(text, max(_PART_CHARS, seen - 1))  # the new text, and the space before it
                while cut:
                    chars += cut.start()
                    yield text[:cut.start()], False
                    text = text[cut.start():]
                    cut = _CUT.search(text, _PART_CHARS)
            chars += len(text)
            yield text, True


def encode_split(tok, tmp, split, n_docs, dtype, executor, num_threads, bar):
    """One split's spool in tmp to its .bin and _docs.npy: parts of about _PART_CHARS characters encoded on
    the executor's threads, appended in order, a few in flight (bounded memory). -> the number of tokens."""
    eod = np.array([tok.eod_id], dtype=dtype)

    def encode_part(part):  # encode_to_numpy: no Python int per token, and the GIL released (threads run)
        return np.concatenate([ids for text, ends in part for ids in
                               (tok.enc.encode_to_numpy(text, disallowed_special=()).astype(dtype), eod[:ends])])

    n_tokens = start = 0
    path = os.path.join(tmp, split)
    # plain writes, not a memmap: on a full disk a write raises OSError, a memmap store is a SIGBUS
    with open(f'{path}.bin', 'wb') as out, open(f'{path}_docs.npy', 'wb') as docs_out:
        np.lib.format.write_array_header_1_0(docs_out, {'descr': '<i8', 'fortran_order': False, 'shape': (n_docs,)})

        def write(ids):  # a document starts after each <|endofdoc|> (the next one may end in a later part)
            nonlocal n_tokens, start
            out.write(ids.tobytes())
            ends = n_tokens + 1 + np.flatnonzero(ids == tok.eod_id)
            if len(ends):
                docs_out.write(np.append(start, ends[:-1]).astype('<i8').tobytes())
                start = int(ends[-1])
                bar.update(len(ends))
            n_tokens += len(ids)

        pending, part, chars = deque(), [], 0
        for text, ends in spooled_texts(f'{path}.spool'):
            part.append((text, ends))
            chars += len(text)
            if chars >= _PART_CHARS:
                pending.append(executor.submit(encode_part, part))
                part, chars = [], 0
                if len(pending) > 2 * num_threads:
                    write(pending.popleft().result())
        if part:
            pending.append(executor.submit(encode_part, part))
        while pending:
            write(pending.popleft().result())
    os.remove(f'{path}.spool')
    return n_tokens


def make_tokenizer(tokenizer, base, vocab_size, name, tmp, bpe_max_chars):
    """A BPE trained with rustbpe on tmp's train spool (its ranks saved there), or the tiktoken encoding
    base; either with the special tokens on top."""
    n_special = len(common.SPECIALS)
    if tokenizer == 'bpe':
        t0, trainer = time.time(), rustbpe.Tokenizer()
        texts = (text for text, _ in spooled_texts(os.path.join(tmp, 'train.spool'), int(bpe_max_chars)))
        trainer.train_from_iterator(texts, vocab_size - n_special, buffer_size=256, pattern=_SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        n_base = len(ranks)  # a small corpus may support fewer merges
        if n_base + n_special < vocab_size:
            print(f"note: the corpus only supports {n_base - 256} merges: vocab_size is {n_base + n_special}, "
                  f"not {vocab_size}")
        path = os.path.join(tmp, _RANKS_FILE)
        with open(path, 'w', encoding='ascii') as f:  # a line per token: base64 of its bytes, its rank
            f.writelines(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                         for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
        recipe = {'kind': 'bpe', 'name': f'{name}_bpe{n_base + n_special}', 'pattern': _SPLIT_PATTERN,
                  'file': _RANKS_FILE, 'file_sha256': common.sha256_file(path), 'n_base': n_base}
        enc = common.with_specials(recipe['name'], _SPLIT_PATTERN, ranks, {}, n_base)
        print(f"trained BPE: {n_base} base tokens + {n_special} special in {time.time() - t0:.1f}s")
    else:
        recipe = {'kind': 'tiktoken', 'name': tokenizer, 'pattern': base._pat_str, 'file': None, 'n_base': base.n_vocab}
        enc = common.with_specials(tokenizer, base._pat_str, base._mergeable_ranks, base._special_tokens, base.n_vocab)
    recipe['special_tokens'] = {t: enc.encode_single_token(t) for t in common.SPECIALS.values()}
    return common.Tokenizer(enc, recipe)


def check_replaceable(data_dir):
    """Only ever replace a directory that holds nothing but what this script writes."""
    foreign = sorted(set(os.listdir(data_dir)) - _DATA_FILES) if os.path.isdir(data_dir) else []
    if foreign:
        raise InputError(f"--data_dir={data_dir} holds files prepare_data.py did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose another --data_dir or empty it")


def prepare(dataset='pydocs', text_column='text', split='train', tokenizer='bpe', vocab_size=8192, data_dir='',
            val_fraction=0.01, seed=1337, max_docs=0, num_threads=2, bpe_max_chars=1_000_000_000,
            hub_streaming=True):
    """Write the data directory of a corpus -> its path. It is built beside data_dir and renamed into
    place: a failed or killed run never leaves one that looks valid, nor changes the old one."""
    t_start = time.time()
    common.check_settings({'seed': seed, 'val_fraction': val_fraction, 'bpe_max_chars': bpe_max_chars})
    for key, value, ok, want in (
            ('val_fraction', val_fraction, 0 < val_fraction < 1, 'between 0 and 1 (exclusive)'),
            ('num_threads', num_threads, num_threads >= 1, '>= 1'), ('max_docs', max_docs, max_docs >= 0, '>= 0'),
            ('bpe_max_chars', bpe_max_chars, bpe_max_chars >= 1, '>= 1'),
            ('vocab_size', vocab_size, tokenizer != 'bpe' or vocab_size >= 261,
             '>= 261 for a byte-level BPE (256 bytes + 5 special tokens)')):
        if not ok:
            raise InputError(f"{key}={value!r} must be {want}")
    base = None if tokenizer == 'bpe' else common.named_encoding(tokenizer)  # fail fast, before reading
    if dataset == 'pydocs':
        kind, source_docs = 'pydocs', read_pydocs(num_threads)
    elif os.path.exists(dataset):
        kind, source_docs = 'local', read_local(dataset, text_column)
    elif file_format(dataset) or dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1:
        raise InputError(f"{dataset}: no such file or directory")
    else:
        name = 'JeanKaddour/minipile' if dataset == 'minipile' else dataset
        kind, source_docs = 'hub', read_hub(name, split, text_column, hub_streaming)
    data_dir = data_dir or os.path.join('data', corpus_name(dataset))
    check_replaceable(data_dir)
    common.check_output(data_dir, '--data_dir', folder=True, replaced=True)
    meta, seconds = {}, {}

    def build(tmp):
        os.makedirs(tmp)
        stats, fingerprint = spool_corpus(islice(source_docs, max_docs or None), tmp, val_fraction, seed)
        n_docs, chars = stats['train']['docs'] + stats['val']['docs'], stats['train']['chars'] + stats['val']['chars']
        print(f"corpus: {n_docs:,} documents, {chars / 1e6:.1f}M characters ({stats['train']['docs']:,} train / "
              f"{stats['val']['docs']:,} val) in {time.time() - t_start:.1f}s")
        t0 = time.time()
        tok = make_tokenizer(tokenizer, base, vocab_size, corpus_name(dataset), tmp, bpe_max_chars)
        dtype = common.token_dtype(tok.vocab_size)
        seconds['tokenizer'], t0 = time.time() - t0, time.time()
        with ThreadPoolExecutor(num_threads) as executor, \
                tqdm(total=n_docs, desc='encoding', unit=' docs', mininterval=1.0) as bar:
            for s in common.SPLITS:
                stats[s]['tokens'] = encode_split(tok, tmp, s, stats[s]['docs'], dtype, executor, num_threads, bar)
        seconds['encoding'] = time.time() - t0
        source = {'dataset': dataset, 'kind': kind, 'docs': n_docs, 'chars': chars, 'fingerprint': fingerprint,
                  'max_docs': max_docs, **({'text_column': text_column} if kind != 'pydocs' else {}),
                  **({'split': split} if kind == 'hub' else {})}
        meta.update({'format_version': common.FORMAT_VERSION, 'tokenizer': tok.recipe, 'vocab_size': tok.vocab_size,
                     'special_tokens': {key: tok.enc.encode_single_token(t) for key, t in common.SPECIALS.items()},
                     'dtype': dtype.name, 'splits': {s: {k: stats[s][k] for k in ('tokens', 'docs', 'chars')}
                                                     for s in common.SPLITS},
                     'source': source, 'val_fraction': val_fraction, 'seed': seed,
                     'bpe_max_chars': int(bpe_max_chars) if tokenizer == 'bpe' else None})
        with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
            f.write(json.dumps(meta, indent=2) + '\n')
        check_replaceable(data_dir)  # once more: files may have landed there meanwhile

    try:
        common.atomic_write(data_dir, build)
    finally:
        source_docs.close()  # stops pydocs' parser processes when max_docs cut the reading short
    train, val = meta['splits']['train'], meta['splits']['val']
    print(f"wrote {data_dir}: vocab_size {meta['vocab_size']} ({meta['dtype']}); train {train['tokens']:,} tokens / "
          f"{train['docs']:,} docs, val {val['tokens']:,} tokens / {val['docs']:,} docs")
    print(f"time: {time.time() - t_start:.1f}s total, tokenizer {seconds['tokenizer']:.1f}s, encoding "
          f"{seconds['encoding']:.1f}s ({(train['tokens'] + val['tokens']) / max(seconds['encoding'], 1e-9) / 1e6:.2f}M"
          f" tokens/s on {num_threads} threads)")
    return data_dir


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    settings = {k: globals()[k] for k in inspect.signature(prepare).parameters}  # the defaults block above
    try:
        prepare(**settings)
    except KeyboardInterrupt:
        out = data_dir or os.path.join('data', corpus_name(dataset))
        common.interrupted(f"{out} is unchanged" if os.path.exists(out) else f"{out} was not created")
