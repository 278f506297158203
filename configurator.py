"""
Command-line and config-file overrides, nanoGPT-style. A script defines its defaults as module
globals and then runs exec(open('configurator.py').read()), which walks sys.argv left to right
(later arguments win):
    config/h512l2.py     a config file: Python assignments, executed in order
    --key=value          one override, parsed with ast.literal_eval (a bare word is a string)

A config file is Python and runs as code, like the script it configures: trust it as you would a
script. The "assignments only" rule catches mistakes, it is not a sandbox. Command-line values
stay literals. Unlike nanoGPT's, every mistake is one line: an unknown key names the closest one;
types are checked against the default, with the conversions a person expects (--learning_rate=1 is
a float, --compile=false a bool, --max_iters=1e4 an int; a None default takes anything).
One config file serves all three stages, so a key that only another train_*.py defines (t_min in
train_mlm.py) is skipped with a note; on the command line only the script's own keys are accepted.
"""
import ast as _ast
import builtins as _builtins
import difflib as _difflib
import glob as _glob
import os as _os
import sys as _sys
import traceback as _traceback

from common import InputError as _InputError


def _fail(message):
    raise _InputError(f"configurator: {message}")


def _note(message):
    if _os.environ.get('RANK', '0') == '0':  # once, on rank 0 of a torchrun job
        print(message)


def _stage_keys(script):
    """The defaults of the train_*.py scripts beside this file: their top-level assignments above the
    line that execs configurator.py (names assigned later, such as meta, are derived, not settable)."""
    keys = set()
    for path in _glob.glob(_os.path.join(_os.path.dirname(_os.path.abspath(script or '.')), 'train_*.py')):
        for node in _ast.parse(open(path, encoding='utf-8').read()).body:
            if any(getattr(n, 'value', None) == 'configurator.py' for n in _ast.walk(node)):
                break
            if isinstance(node, _ast.Assign):
                keys.update(t.id for t in node.targets if isinstance(t, _ast.Name))
    return keys


def _unknown(key, known, where):
    close = _difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    _fail(f"unknown config key '{key}' in {where}" + (f" (did you mean '{close[0]}'?)" if close else ''))


def _coerce(key, value, default, raw=None):
    """value as the type of the script's default, or a one-line error."""
    want = type(default)
    if default is None:
        return value
    if want is bool:
        if isinstance(value, bool):
            return value
        text = str(raw if raw is not None else value).strip().lower()
        if text in ('true', 'yes', '1', 'false', 'no', '0'):
            return text in ('true', 'yes', '1')
    elif want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif want is int and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(value, int) or value.is_integer():
            return int(value)
    elif want is str:
        return value if isinstance(value, str) else str(raw if raw is not None else value)
    elif want in (tuple, list) and isinstance(value, (tuple, list)):
        return want(value)
    _fail(f"{key} expects {want.__name__} (default {default!r}), got {type(value).__name__} {value!r}")


def _apply_file(path, namespace, defaults):
    if not _os.path.isfile(path):
        _fail(f"config file '{path}' not found (config files live in config/, e.g. config/tiny.py)")
    try:
        source = open(path, encoding='utf-8-sig').read()  # -sig: a BOM some editors write is not code
        tree = _ast.parse(source, filename=path)
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the config file as UTF-8")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        where = f"{path}:{e.lineno}" if getattr(e, 'lineno', None) else path
        _fail(f"{where}: invalid Python ({getattr(e, 'msg', e)}); config files hold assignments such as n_layer = 2")
    for node in tree.body:
        if not isinstance(node, (_ast.Assign, _ast.AnnAssign)) and not (
                isinstance(node, _ast.Expr) and isinstance(node.value, _ast.Constant)):  # a docstring
            _fail(f"{path}:{node.lineno}: config files hold assignments only")
    values = {}
    try:
        exec(_builtins.compile(tree, path, 'exec'), {}, values)  # `compile` may be a config key
    except Exception as e:  # e.g. n_layer = foo: the file and line, not a traceback
        lines = [t.lineno for t in _traceback.extract_tb(e.__traceback__) if t.filename == path]
        hint = f" (a string needs quotes: '{e.name}')" if isinstance(e, NameError) else ''
        _fail(f"{path}:{lines[-1] if lines else '?'}: {type(e).__name__}: {e}{hint}")
    others = None
    for key, value in values.items():
        if key.startswith('_'):
            continue
        if key not in defaults:
            others = _stage_keys(namespace.get('__file__')) if others is None else others
            if key not in others:
                _unknown(key, defaults, path)
            _note(f"config: {key} = {value!r} is for another stage; skipped here")
            continue
        namespace[key] = _coerce(key, value, defaults[key])
        _note(f"config: {key} = {namespace[key]!r}  ({path})")


def _apply(namespace, argv):
    plain = (int, float, bool, str, tuple, list, type(None))
    defaults = {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, plain)}
    for arg in argv:
        if not arg.startswith('--'):
            _apply_file(arg, namespace, defaults)
            continue
        if '=' not in arg:
            _fail(f"'{arg}' needs a value, e.g. {arg}=True")
        key, raw = arg[2:].split('=', 1)
        if key not in defaults:
            _unknown(key, defaults, 'the command line')
        try:
            value = _ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare word such as --decoder=perceiver
        namespace[key] = _coerce(key, value, defaults[key], raw)
        _note(f"config: {key} = {namespace[key]!r}  (command line)")


_apply(globals(), _sys.argv[1:])
