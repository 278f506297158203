"""
Command-line and config-file overrides, nanoGPT-style. A script defines its defaults as plain
module globals and then runs

    exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())

which walks sys.argv left to right (later arguments win):
    config/h512l2.py        a config file: Python assignments, executed in order
    --key=value             one override; the value is parsed with ast.literal_eval

A config file is Python and runs as code, exactly like the script it configures: trust it as
you would a script. The "assignments only" rule catches mistakes (a stray import, a typo'd
statement); it is not a sandbox, since the right-hand side of an assignment can call anything.

Unlike nanoGPT's configurator, every mistake is a one-line error rather than a silent new global
or a bare AssertionError: an unknown key (in a file or on the command line) names the closest
known key; types are checked against the default, with the conversions a person expects
(--learning_rate=1 is a float, --compile=false is a bool, --max_iters=1e4 is an int, a None
default takes anything, a value may contain '=').

Stage-specific keys: one config file per model size serves all three stages, so a file may set a
key that only another stage defines (say t_min, read by train_diffusion.py). Such a key is
skipped with a note when the running stage does not have it. The other stages' keys are read
from the train_*.py files beside this one (the top-level assignments above the line that execs
configurator.py, parsed, not imported: names computed later, such as data_dir, are not config keys).
On the command line only the running script's own keys are accepted.
"""
import ast as _ast
import builtins as _builtins
import difflib as _difflib
import glob as _glob
import os as _os
import sys as _sys
import traceback as _traceback


def _known_keys(namespace):
    """The overridable globals: public names bound to plain values (None included)."""
    plain = (int, float, bool, str, tuple, list, type(None))
    return {k for k, v in namespace.items() if not k.startswith('_') and isinstance(v, plain)}


def _sibling_stage_keys(script_path):
    """The config keys of the train_*.py scripts next to this file: their top-level assignments
    above the statement that execs configurator.py (the defaults block). Names assigned after it
    (data_dir, accum, meta, ...) are derived, not settable, so a config file setting one is an
    unknown key rather than a key "for another stage" that is silently skipped."""
    here = _os.path.dirname(_os.path.abspath(script_path)) if script_path else _os.getcwd()
    keys = set()
    for path in _glob.glob(_os.path.join(here, 'train_*.py')):
        with open(path, encoding='utf-8') as f:
            for node in _ast.parse(f.read()).body:
                if any(getattr(n, 'value', None) == 'configurator.py' for n in _ast.walk(node)):
                    break  # the exec of this file: the end of the defaults block
                if isinstance(node, _ast.Assign):
                    keys.update(t.id for t in node.targets if isinstance(t, _ast.Name))
    return keys


def _unknown_key_error(key, known, where):
    close = _difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return SystemExit(f"configurator: unknown config key '{key}' in {where}{hint}")


def _coerce(key, value, default, raw=None):
    """Return value converted to the type of default (the script's own default, never a value
    set earlier on the command line), or raise a one-line SystemExit."""
    want = type(default)
    if default is None:
        return value
    if want is bool:
        if isinstance(value, bool):
            return value
        text = str(raw if raw is not None else value).strip().lower()
        if text in ('true', 'yes', '1'):
            return True
        if text in ('false', 'no', '0'):
            return False
    elif want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif want is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is str:
        return value if isinstance(value, str) else str(raw if raw is not None else value)
    elif want in (tuple, list) and isinstance(value, (tuple, list)):
        return want(value)
    raise SystemExit(f"configurator: {key} expects {want.__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")


def _apply_config_file(path, namespace, defaults):
    if not _os.path.isfile(path):
        raise SystemExit(f"configurator: config file '{path}' not found "
                         f"(config files live in config/, e.g. config/tiny.py)")
    try:
        with open(path, encoding='utf-8-sig') as f:  # -sig: a BOM some editors write is not code
            source = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"configurator: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}); save the config file as UTF-8")
    try:
        tree = _ast.parse(source, filename=path)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes in the file
        where = f"{path}:{e.lineno}" if getattr(e, 'lineno', None) else path
        raise SystemExit(f"configurator: {where}: invalid Python ({getattr(e, 'msg', e)}); "
                         f"config files hold plain assignments such as n_layer = 2")
    for node in tree.body:
        is_docstring = isinstance(node, _ast.Expr) and isinstance(node.value, _ast.Constant)
        if not isinstance(node, (_ast.Assign, _ast.AnnAssign)) and not is_docstring:
            raise SystemExit(f"configurator: {path}:{node.lineno}: config files hold assignments only")
    values = {}
    try:
        exec(_builtins.compile(tree, path, "exec"), {}, values)  # `compile` may be a config key
    except Exception as e:  # e.g. n_layer = foo: one line naming the file and line, not a traceback
        lines = [t.lineno for t in _traceback.extract_tb(e.__traceback__) if t.filename == path]
        where = f"{path}:{lines[-1]}" if lines else path
        hint = (f" (a value is a literal or a name set earlier in the file; a string needs quotes: "
                f"'{e.name}')" if isinstance(e, NameError) else '')
        raise SystemExit(f"configurator: {where}: {type(e).__name__}: {e}{hint}")
    others = None
    for key, value in values.items():
        if key.startswith('_'):
            continue
        if key not in defaults:
            others = _sibling_stage_keys(namespace.get('__file__')) if others is None else others
            if key in others:
                _note(f"config: {key} = {value!r} is for another stage; skipped here")
                continue
            raise _unknown_key_error(key, defaults, path)
        namespace[key] = _coerce(key, value, defaults[key])
        _note(f"config: {key} = {namespace[key]!r}  ({path})")


def _apply_override(arg, namespace, defaults):
    if '=' not in arg:
        raise SystemExit(f"configurator: '{arg}' needs a value, e.g. {arg}=True")
    key, raw = arg[2:].split('=', 1)
    if key not in defaults:
        raise _unknown_key_error(key, defaults, 'the command line')
    try:
        value = _ast.literal_eval(raw)
    except (SyntaxError, ValueError):
        value = raw  # a bare word such as --decoder=perceiver is a string
    namespace[key] = _coerce(key, value, defaults[key], raw=raw)
    _note(f"config: {key} = {namespace[key]!r}  (command line)")


def _note(message):
    if _os.environ.get('RANK', '0') == '0':  # print once, on rank 0 of a torchrun job
        print(message)


def _apply_overrides(namespace, argv):
    """Apply config files and --key=value arguments from argv to namespace (a globals dict).
    Types are checked against the script's defaults, taken before any argument is applied."""
    defaults = {k: namespace[k] for k in _known_keys(namespace)}
    for arg in argv:
        if arg.startswith('--'):
            _apply_override(arg, namespace, defaults)
        else:
            _apply_config_file(arg, namespace, defaults)


_apply_overrides(globals(), _sys.argv[1:])
