"""configurator.py: nanoGPT's semantics (files exec'd in order, --key=value via literal_eval, later
wins) without its traps (unknown keys, int vs float, bools, None defaults, '=' in values)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = open(os.path.join(ROOT, 'configurator.py')).read()


def run(argv, monkeypatch, script=os.path.join(ROOT, 'train_mlm.py'), **defaults):
    """Exec configurator.py in a fresh 'script globals' namespace, as a stage script does."""
    namespace = {'__file__': script, 'learning_rate': 6e-4, 'max_iters': 100, 'compile': True,
                 'decoder': 'perceiver', 'wandb_run_name': 'run', 'init_from': None, **defaults}
    monkeypatch.setattr(sys, 'argv', ['train_mlm.py', *argv])
    exec(SOURCE, namespace)
    return namespace


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_override_and_literal_parsing(monkeypatch):
    ns = run(['--max_iters=250', '--decoder=posonly', "--wandb_run_name='x y'"], monkeypatch)
    assert ns['max_iters'] == 250 and ns['decoder'] == 'posonly' and ns['wandb_run_name'] == 'x y'


def test_int_is_accepted_for_float_and_integral_float_for_int(monkeypatch):
    ns = run(['--learning_rate=1', '--max_iters=1e3'], monkeypatch)
    assert ns['learning_rate'] == 1.0 and isinstance(ns['learning_rate'], float)
    assert ns['max_iters'] == 1000 and isinstance(ns['max_iters'], int)


def test_non_integral_float_for_int_is_rejected(monkeypatch):
    with pytest.raises(SystemExit, match='max_iters expects int'):
        run(['--max_iters=2.5'], monkeypatch)


@pytest.mark.parametrize('text,expected', [('true', True), ('False', False), ('0', False), ('yes', True)])
def test_bool_words(monkeypatch, text, expected):
    assert run([f'--compile={text}'], monkeypatch)['compile'] is expected


def test_bad_bool_is_rejected(monkeypatch):
    with pytest.raises(SystemExit, match='compile expects bool'):
        run(['--compile=maybe'], monkeypatch)


def test_str_key_takes_numbers_as_text(monkeypatch):
    assert run(['--wandb_run_name=123'], monkeypatch)['wandb_run_name'] == '123'


def test_none_default_accepts_anything(monkeypatch):
    assert run(['--init_from=resume'], monkeypatch)['init_from'] == 'resume'
    assert run(['--init_from=3'], monkeypatch)['init_from'] == 3


def test_value_may_contain_equals(monkeypatch):
    assert run(['--wandb_run_name=lr=1e-3,bs=8'], monkeypatch)['wandb_run_name'] == 'lr=1e-3,bs=8'


def test_unknown_cli_key_suggests_closest(monkeypatch):
    with pytest.raises(SystemExit, match="unknown config key 'lerning_rate'.*did you mean 'learning_rate'"):
        run(['--lerning_rate=1e-3'], monkeypatch)


def test_flag_without_value_is_explained(monkeypatch):
    with pytest.raises(SystemExit, match='needs a value'):
        run(['--compile'], monkeypatch)


def test_config_file_then_cli_later_wins(monkeypatch, tmp_path):
    cfg = write(tmp_path, 'c.py', "max_iters = 7\nlearning_rate = 1e-3\n")
    ns = run([cfg, '--max_iters=9'], monkeypatch)
    assert ns['max_iters'] == 9 and ns['learning_rate'] == 1e-3
    ns = run(['--max_iters=9', cfg], monkeypatch)
    assert ns['max_iters'] == 7


def test_unknown_key_in_config_file(monkeypatch, tmp_path):
    cfg = write(tmp_path, 'c.py', "max_iter = 7\n")
    with pytest.raises(SystemExit, match="unknown config key 'max_iter' in .*c.py.*did you mean 'max_iters'"):
        run([cfg], monkeypatch)


def test_config_file_type_checked(monkeypatch, tmp_path):
    cfg = write(tmp_path, 'c.py', "compile = 'yes please'\n")
    with pytest.raises(SystemExit, match='compile expects bool'):
        run([cfg], monkeypatch)


def test_config_file_holds_assignments_only(monkeypatch, tmp_path):
    cfg = write(tmp_path, 'c.py', "import os\nmax_iters = 7\n")
    with pytest.raises(SystemExit, match='assignments only'):
        run([cfg], monkeypatch)


def test_missing_config_file(monkeypatch):
    with pytest.raises(SystemExit, match='not found'):
        run(['config/nope.py'], monkeypatch)


def test_other_stage_key_in_file_is_skipped_but_not_on_cli(monkeypatch, tmp_path, capsys):
    """A shared config file may set a key that only a sibling train_*.py defines."""
    (tmp_path / 'train_other.py').write_text("t_min = 0.3\n")
    cfg = write(tmp_path, 'c.py', "t_min = 0.2\nmax_iters = 5\n")
    script = str(tmp_path / 'train_this.py')
    ns = run([cfg], monkeypatch, script=script)
    assert ns['max_iters'] == 5 and 't_min' not in ns
    assert 'for another stage' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown config key 't_min'"):
        run(['--t_min=0.2'], monkeypatch, script=script)


def test_prints_only_on_rank_zero(monkeypatch, capsys):
    monkeypatch.setenv('RANK', '1')
    run(['--max_iters=3'], monkeypatch)
    assert capsys.readouterr().out == ''
    monkeypatch.setenv('RANK', '0')
    run(['--max_iters=3'], monkeypatch)
    assert 'max_iters = 3' in capsys.readouterr().out


@pytest.mark.parametrize('line,message', [('learning_rate = = 2', 'invalid Python'),
                                          ('learning_rate = foo', "NameError.*'foo'.*needs quotes")])
def test_config_file_python_errors_are_one_line(monkeypatch, tmp_path, line, message):
    """A syntax error or an undefined name in a config file is a one-line SystemExit naming the
    file and line (it used to be a raw SyntaxError / NameError traceback)."""
    cfg = write(tmp_path, 'c.py', f"max_iters = 7\n{line}\n")
    with pytest.raises(SystemExit, match=f"c.py:2: {message}") as e:
        run([cfg], monkeypatch)
    assert '\n' not in str(e.value)


def test_names_derived_after_the_configurator_are_not_stage_keys(monkeypatch, tmp_path):
    """Only a sibling's defaults (above its exec of configurator.py) are keys of another stage;
    a name it computes later (meta) is an unknown key, not silently skipped."""
    (tmp_path / 'train_other.py').write_text(
        "t_min = 0.3\nexec(open('configurator.py').read())\nmeta = 'data/' + data_dir\n")
    script = str(tmp_path / 'train_this.py')
    ns = run([write(tmp_path, 'a.py', "t_min = 0.2\n")], monkeypatch, script=script)
    assert 't_min' not in ns  # a default of the other stage: still skipped
    cfg = write(tmp_path, 'c.py', "meta = 'data/x'\n")
    with pytest.raises(SystemExit, match="unknown config key 'meta'"):
        run([cfg], monkeypatch, script=script)
    with pytest.raises(SystemExit, match="unknown config key 'meta'"):
        run([cfg], monkeypatch)  # the real train_*.py scripts, where meta is derived


def stage_defaults(path):
    """A stage script's defaults: the literal top-level assignments above its configurator exec."""
    import ast
    source = open(path).read()
    exec_line = next(i for i, line in enumerate(source.splitlines(), 1)
                     if line.startswith('exec(') and 'configurator.py' in line)
    defaults = {}
    for node in ast.parse(source).body:
        if node.lineno > exec_line:
            break
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return defaults


@pytest.mark.parametrize('cfg', sorted(f for f in os.listdir(os.path.join(ROOT, 'config'))
                                        if f.endswith('.py')))
def test_shipped_config_files_are_valid_for_every_stage(monkeypatch, cfg):
    """config/*.py must load in every stage script, each key applied by the stages whose defaults
    have it and skipped by the others; every key must be some stage's default."""
    cfg_path = os.path.join(ROOT, 'config', cfg)
    file_values = {}
    exec(open(cfg_path).read(), {}, file_values)
    applied = set()
    for stage in ('train_mlm.py', 'train_tsdae.py', 'train_diffusion.py'):
        path = os.path.join(ROOT, stage)
        if not os.path.exists(path):
            continue
        defaults = stage_defaults(path)
        namespace = {'__file__': path, **defaults}
        monkeypatch.setattr(sys, 'argv', [stage, cfg_path])
        exec(SOURCE, namespace)
        for key, value in file_values.items():
            if key in defaults:
                assert namespace[key] == value, (stage, key)
                applied.add(key)
    assert set(file_values) <= applied, f"{cfg}: keys no stage defines: {set(file_values) - applied}"


def test_type_error_names_the_scripts_default_not_an_earlier_override(monkeypatch):
    """'(default N)' is the script's default even after --key=... set the key earlier on the line."""
    with pytest.raises(SystemExit, match=r'max_iters expects int \(default 100\)'):
        run(['--max_iters=5', '--max_iters=2.5'], monkeypatch)
    # a None default keeps taking anything, whatever an earlier argument set
    assert run(['--init_from=3', '--init_from=resume'], monkeypatch)['init_from'] == 'resume'


def test_config_file_that_is_not_utf8_is_one_line(monkeypatch, tmp_path):
    path = tmp_path / 'latin1.py'
    path.write_bytes("wandb_run_name = 'caf\u00e9'\n".encode('latin-1'))
    with pytest.raises(SystemExit, match=r'latin1\.py is not UTF-8 text.*save the config file as UTF-8') as e:
        run([str(path)], monkeypatch)
    assert '\n' not in str(e.value)


def test_config_file_with_a_utf8_bom_loads(monkeypatch, tmp_path):
    path = tmp_path / 'bom.py'
    path.write_bytes(b'\xef\xbb\xbfmax_iters = 7\n')
    assert run([str(path)], monkeypatch)['max_iters'] == 7
