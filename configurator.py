"""
nanoGPT-style overrides: a script defines its defaults as globals, then exec(open('configurator.py').read())
applies sys.argv left to right: a config file (config/h512l2.py: Python assignments, trusted as the script is)
or --key=value (ast.literal_eval; a bare word is a string). A mistake is one line: an unknown key names the
closest; a value takes its default's type (--learning_rate=1 a float, --compile=false a bool, --max_iters=1e4
an int; a None default takes anything); a file's key that only another train_*.py has is skipped with a note.
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
    """The defaults of the train_*.py scripts beside this one: their assignments above the configurator's exec."""
    keys = set()
    for path in _glob.glob(_os.path.join(_os.path.dirname(_os.path.abspath(script or '.')), 'train_*.py')):
        for node in _ast.parse(open(path, encoding='utf-8').read()).body:
            if any(getattr(n, 'value', None) == 'configurator.py' for n in _ast.walk(node)):
                break
            if isinstance(node, _ast.Assign):
                keys.update(t.id for t in node.targets if isinstance(t, _ast.Name))
    return keys


def _coerce(key, value, default, cli=False):
    """value (a config file's, or a command-line string parsed here) as the type of the script's default,
    or a one-line error."""
    raw = value if cli else None
    if cli:
        try:
            value = _ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare word such as --decoder=perceiver
    want, text = type(default), str(raw if cli else value)
    if default is None or want in (bool, str) and isinstance(value, want):
        return value
    if want is bool and text.strip().lower() in ('true', 'yes', '1', 'false', 'no', '0'):
        return text.strip().lower() in ('true', 'yes', '1')
    if type(value) in (int, float) and (want is float or want is int and (type(value) is int or value.is_integer())):
        return want(value)
    if want is str:
        return text
    if want in (tuple, list) and isinstance(value, (tuple, list)):
        return want(value)
    _fail(f"{key} expects {want.__name__} (default {default!r}), got {type(value).__name__} {value!r}")


def _file_values(path):
    """The settings a config file assigns, or a one-line error naming the file and line."""
    if not _os.path.isfile(path):
        _fail(f"config file '{path}' not found (config files live in config/, e.g. config/tiny.py)")
    try:
        tree = _ast.parse(open(path, encoding='utf-8-sig').read(), filename=path)  # -sig: drop an editor's BOM
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
              f"save the config file as UTF-8")
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
    return {k: v for k, v in values.items() if not k.startswith('_')}  # _names: the file's own helpers


def _apply(namespace, argv):
    plain = (int, float, bool, str, tuple, list, type(None))
    defaults = {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, plain)}
    for arg in argv:
        cli = arg.startswith('--')
        if cli and '=' not in arg:
            _fail(f"'{arg}' needs a value, e.g. {arg}=True")
        values = dict([arg[2:].split('=', 1)]) if cli else _file_values(arg)  # cli: {key: its string}
        others = _stage_keys(namespace.get('__file__')) if not cli and set(values) - set(defaults) else ()
        for key, value in values.items():
            if key in others and key not in defaults:
                _note(f"config: {key} = {value!r} is for another stage; skipped here")
            elif key not in defaults:
                close = _difflib.get_close_matches(key, sorted(defaults), n=1, cutoff=0.6)
                _fail(f"unknown config key '{key}' in {'the command line' if cli else arg}" +
                      (f" (did you mean '{close[0]}'?)" if close else ''))
            else:
                namespace[key] = _coerce(key, value, defaults[key], cli)
                _note(f"config: {key} = {namespace[key]!r}  ({'command line' if cli else arg})")


_apply(globals(), _sys.argv[1:])
