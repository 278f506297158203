"""tools/plot.py: run curves and bench speed as PNGs with one line per run / (model, stage); the concept
attention recomputed from the layer's weights equals what the layer attended with; the concept
page is self-contained and holds every concept and token; concept_geometry, the collapse
diagnostics of any checkpoint; clear one-line errors (a log with nothing to plot among them)."""
import json
import os
import runpy
import shutil
import sys
from html.parser import HTMLParser

import pytest
import torch

import common
from conftest import ROOT, TINY, run_script
from tools import plot

PNG = b'\x89PNG\r\n\x1a\n'


def run_plot(monkeypatch, *args):
    """tools/plot.py's command line, in this process (an error is the exception the user sees)."""
    monkeypatch.setattr(sys, 'argv', ['tools/plot.py', *args])
    runpy.run_path(os.path.join(ROOT, 'tools', 'plot.py'), run_name='__main__')


def write_log(run_dir, records):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'log.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)


def mlm_records(loss0, n=4):
    return [{'iter': 10 * i, 'tokens_seen': 1000 * i, 'train_loss': None if i == 0 else loss0 - i,
             'val_loss': loss0 - 0.5 * i, 'val_accuracy': 0.01 * i, 'erank': 2.0 + i} for i in range(n)]


def test_curves_overlay_one_line_per_run_in_every_panel(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / 'concept', mlm_records(9.0))
    write_log(tmp_path / 'standard', mlm_records(8.5, n=3))
    diffusion = [{**r, 'val_nll_bound': r['val_loss'] + 1} for r in mlm_records(9.5)]
    write_log(tmp_path / 'diffusion', diffusion)
    fig = plot.plot_curves([str(tmp_path / name) for name in ('concept', 'standard', 'diffusion')])
    loss, acc, erank = fig.axes[:3]
    assert [line.get_label() for line in loss.lines] == ['concept', 'standard', 'diffusion (val_nll_bound)']
    assert list(loss.lines[2].get_ydata()) == [r['val_nll_bound'] for r in diffusion]  # the bound, not the CE
    assert list(loss.lines[1].get_xdata()) == [0, 1000, 2000]  # against tokens seen
    assert [len(ax.lines) for ax in (acc, erank)] == [3, 3]
    run_plot(monkeypatch, f'--runs={tmp_path}/concept,{tmp_path}/standard', '--labels=concept arm,standard arm',
             f'--out={tmp_path}/curves.png')
    assert f'wrote {tmp_path}/curves.png' in capsys.readouterr().out
    data = (tmp_path / 'curves.png').read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    assert sorted(os.listdir(tmp_path)) == ['concept', 'curves.png', 'diffusion', 'standard']  # no temporary file


def bench_json(path):
    rows = []
    for model, speed in (('concept', 4000.0), ('standard', 8000.0)):
        for stage in ('mlm', 'diffusion'):
            for n in (64, 128, 256):
                rows.append({'model': model, 'stage': stage, 'seq_len': n, 'batch_size': 256 // n,
                             'train_tokens_per_s': speed / (n if model == 'standard' else 64),
                             'infer_tokens_per_s': 10 * speed / n, 'peak_mem_mb': 100.0, 'mfu': 0.1})
    rows.append({'model': 'standard', 'stage': 'mlm', 'seq_len': 512, 'batch_size': 1, 'oom': True})
    path.write_text(json.dumps({'machine': {'device_name': 'test cpu'}, 'peak_flops': {'float32': 1e11},
                                'rows': rows}))
    return rows


def test_bench_plot_is_log_log_with_one_line_per_model_and_stage(tmp_path, monkeypatch):
    rows = bench_json(tmp_path / 'bench.json')
    fig = plot.plot_bench(str(tmp_path / 'bench.json'))
    train, infer = fig.axes[:2]
    for ax in (train, infer):
        assert sorted(line.get_label() for line in ax.lines) == [
            'concept diffusion', 'concept mlm', 'standard diffusion', 'standard mlm']
        assert ax.get_xscale() == 'log' and ax.get_yscale() == 'log'
    std_mlm = next(line for line in train.lines if line.get_label() == 'standard mlm')
    assert list(std_mlm.get_xdata()) == [64, 128, 256]  # the out-of-memory row is no point
    assert list(std_mlm.get_ydata()) == [r['train_tokens_per_s'] for r in rows
                                         if r['model'] == 'standard' and r['stage'] == 'mlm' and 'oom' not in r]
    run_plot(monkeypatch, f'--bench={tmp_path}/bench.json', f'--out={tmp_path}/speed.png')
    assert (tmp_path / 'speed.png').read_bytes().startswith(PNG)


def glue_results(path, sst2, stsb, control=None):
    """An eval_glue.py results file with sst2 and stsb (scores, seed spread, baselines, a random-init control)."""
    results = {'sst2': {'accuracy': sst2, 'std': {'accuracy': 0.5}, 'bow': {'accuracy': 73.4},
                        'majority': {'accuracy': 50.9}},
               'stsb': {'pearson': stsb, 'spearman': stsb - 1, 'std': {'pearson': 0.2}, 'bow': {'pearson': 45.1},
                        'majority': {'pearson': 0.0}}}
    if control is not None:
        results['sst2']['random_init'] = {'accuracy': control}
    path.write_text(json.dumps({'run': {}, 'results': results}))
    return str(path)


def test_transfer_plot_has_one_line_per_arm_against_the_budget(tmp_path, monkeypatch):
    a, b = glue_results(tmp_path / 'a.json', 66.0, 70.0), glue_results(tmp_path / 'b.json', 70.5, 72.8, control=68.7)
    c = glue_results(tmp_path / 'c.json', 69.0, 71.0)
    fig = plot.plot_transfer(f"concept:20:{b},concept:5:{a},standard:20:{c}")
    by_task = {ax.get_title(): ax for ax in fig.axes}
    assert sorted(by_task) == ['sst2', 'stsb']
    sst2 = by_task['sst2']
    concept = next(bars for bars in sst2.containers if bars.get_label() == 'concept').lines[0]
    assert list(concept.get_xdata()) == [5, 20] and list(concept.get_ydata()) == [66.0, 70.5]  # sorted by budget
    assert {bars.get_label() for bars in sst2.containers} == {'concept', 'standard'}
    assert {line.get_label() for line in sst2.lines} >= {'bag of words', 'majority'}
    hollow = [col for col in sst2.collections if col.get_label() == 'concept, random init']
    assert hollow and hollow[0].get_offsets().tolist() == [[20.0, 68.7]]
    assert next(line for line in by_task['stsb'].lines if line.get_label() == 'bag of words').get_ydata()[0] == 45.1
    run_plot(monkeypatch, f'--transfer=concept:5:{a},concept:20:{b}', f'--out={tmp_path}/t.png')
    assert (tmp_path / 't.png').read_bytes().startswith(PNG)
    (tmp_path / 'no_bow.json').write_text(json.dumps({'results': {'sst2': {'accuracy': 70.0}}}))  # no baselines
    for bad, says in ((f'concept:{a}', 'each is <line>:<budget>:<results.json>'),
                      (f'concept:5:{tmp_path}/none.json', 'is not an eval_glue.py results file'),
                      (f'concept:5:{tmp_path}/no_bow.json', 'is not an eval_glue.py results file')):
        with pytest.raises(common.InputError, match=says):
            plot.plot_transfer(bad)


# ----------------------------------------------------------------------------------------------
# what each concept reads

def tiny_model(**overrides):
    from model import ConceptConfig, ConceptMLM
    torch.manual_seed(0)
    args = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16, n_concepts=4, ffn_size=32,
                pad_id=60, mask_id=61, eod_id=62, cls_id=63, sep_id=59, **overrides)
    model = ConceptMLM(ConceptConfig(**args)).eval()
    with torch.no_grad():  # a trained-looking model: the identity init makes some paths exactly zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model, args


@pytest.mark.parametrize('variant', [{}, {'bixt': True}, {'recursive_iters': 3}])
def test_recomputed_attention_is_what_the_last_layer_read_with(variant):
    """The weights times the layer's own values, through its output projection, give exactly the
    update that layer added to the concepts (captured by a hook on its projection)."""
    model, _ = tiny_model(**variant)
    enc = model.encoder
    idx = torch.randint(59, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    layer = enc.layers[-1]
    proj = layer.c_proj if variant.get('bixt') else layer.cross_attn.c_proj
    got = {}
    values = {}
    handles = [proj.register_forward_hook(lambda m, a, out: got.update(out=out, inp=a[0]))]
    if variant.get('bixt'):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a: values.update(v=m._heads(m.t_ref_val(m.ln_t(a[1])))[1])))
    else:
        handles.append(layer.cross_attn.register_forward_pre_hook(lambda m, a: values.update(v=a[1][1])))
    with torch.no_grad():
        enc(idx, mask)
        weights = plot.concept_attention(model, idx, mask)  # (nh, C, N) of the first row
    for h in handles:
        h.remove()
    assert weights.shape == (2, 4, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4))
    v = values['v'][0]                                                      # (nh, N, hs)
    mixed = (weights @ v).transpose(0, 1).reshape(4, 16)                    # (C, H)
    assert torch.allclose(mixed, got['inp'][0], atol=1e-5)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 12), atol=1e-3)  # not trivially uniform


def test_padding_gets_no_attention():
    model, _ = tiny_model()
    idx = torch.randint(59, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 6:] = False
    weights = plot.concept_attention(model, idx, mask)
    assert (weights[..., 6:] == 0).all() and torch.allclose(weights.sum(-1), torch.ones(2, 4))


@pytest.fixture
def concept_ckpt(data_dir, tmp_path):
    """A checkpoint written the way the stages write theirs (model, args, tokenizer recipe, data dir)."""
    from model import ConceptConfig, ConceptMLM
    meta = common.load_meta(data_dir)
    sp = meta['special_tokens']
    args = dict(vocab_size=meta['vocab_size'], block_size=24, n_layer=2, n_head=2, n_embd=16, n_concepts=5,
                ffn_size=32, pad_id=sp['pad'], mask_id=sp['mask'], eod_id=sp['eod'], cls_id=sp['cls'], sep_id=sp['sep'])
    torch.manual_seed(0)
    model = ConceptMLM(ConceptConfig(**args))

    def write(path, model_args):
        common.save_checkpoint(path, {'stage': 'mlm', 'model': model.state_dict(), 'model_args': model_args,
                                       'config': {}, 'iter_num': 0, 'best_val_loss': None,
                                       'tokenizer': meta['tokenizer'], 'special_tokens': sp, 'data_dir': data_dir})
        return path
    return write, args, common.load_tokenizer(data_dir)


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.heads, self.items, self.external, self.scripts, self._in = [], [], 0, [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'script':
            self.scripts += 1
        for key in ('src', 'href'):
            if key in attrs:
                self.external.append(attrs[key])
        if tag == 'tr':
            self.rows.append(0)
        elif tag == 'td':
            self.rows[-1] += 1
        elif tag == 'th' and attrs.get('class') == 't':
            self._in = 'head'
            self.heads.append('')
        elif tag == 'li':
            self.items += 1

    def handle_endtag(self, tag):
        if tag == 'th':
            self._in = None

    def handle_data(self, data):
        if self._in == 'head':
            self.heads[-1] += data


def test_the_concept_page_is_self_contained_and_holds_every_concept_and_token(concept_ckpt, tmp_path):
    write, args, tok = concept_ckpt
    ck = write(str(tmp_path / 'ckpt.pt'), args)
    text = 'Return the number of items in the list, or raise ValueError if it is empty. ' * 3
    out = run_script('tools/plot.py', '--concepts=True', f'--ckpt={ck}', f'--text={text}', f'--out={tmp_path}/c.html',
                     '--top_k=3', '--geometry=True', '--n_batches=2', '--batch_size=2')
    page = PageParser()
    page.feed((tmp_path / 'c.html').read_text(encoding='utf-8'))
    ids = ([tok.cls_id] + tok.encode(text))[:24]  # cut at block_size
    assert page.scripts == 0 and page.external == []
    assert page.rows == [0] + [24] * 5  # the header row, then one row of 24 cells per concept
    shown = [tok.decode([i]).replace(' ', '\u2423') for i in ids]
    assert page.heads == shown
    assert page.items == 5 and "cut at the model" in (tmp_path / 'c.html').read_text()
    assert '5 concepts x 24 tokens; mean attention entropy' in out.stdout and 'concept   0: ' in out.stdout
    assert 'uniform: ln 24 = 3.18' in out.stdout
    geometry = next(line for line in out.stdout.splitlines() if line.startswith('concept geometry over 2 x 2'))
    report = plot.concept_geometry(ck, n_batches=2, batch_size=2)
    assert geometry.endswith(', '.join(f"{k} {v:.4f}" for k, v in report.items()))


def test_the_concept_page_refuses_a_standard_encoder_in_one_line(concept_ckpt, tmp_path, monkeypatch):
    write, args, _ = concept_ckpt
    ck = write(str(tmp_path / 'std.pt'), {**args, 'encoder': 'standard'})
    with pytest.raises(common.InputError, match='standard-encoder checkpoint: it has no concepts') as e:
        run_plot(monkeypatch, '--concepts=True', f'--ckpt={ck}', '--text=hello', f'--out={tmp_path}/c.html')
    assert '\n' not in str(e.value) and not (tmp_path / 'c.html').exists()


def test_bad_inputs_are_one_line(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / 'run', mlm_records(9.0))
    write_log(tmp_path / 'train_only', [{'iter': i, 'train_loss': 9.0 - i, 'tokens_seen': 100 * i} for i in range(3)])
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty_log').mkdir()
    (tmp_path / 'empty_log' / 'log.jsonl').write_text('')
    (tmp_path / 'bad.json').write_text('{"rows": 3}')
    cases = [
        ([f'--runs={tmp_path}/empty', f'--out={tmp_path}/a.png'], 'no log.jsonl there'),
        ([f'--runs={tmp_path}/empty_log', f'--out={tmp_path}/a.png'], 'has no evaluation record'),
        # issue 35: a log with none of the plotted keys was "wrote a.png" with three empty panels
        ([f'--runs={tmp_path}/run,{tmp_path}/train_only', f'--out={tmp_path}/a.png'],
         'none of its 3 records has a plotted key (val_nll_bound, val_loss, val_accuracy, erank)'),
        ([f'--runs={tmp_path}/run', f'--out={tmp_path}/nodir/a.png'], 'does not exist'),
        ([f'--runs={tmp_path}/run', f'--out={tmp_path}'], 'is a directory'),
        ([f'--runs={tmp_path}/run', f'--out={tmp_path}/a.html'], 'should end in .png'),
        ([f'--runs={tmp_path}/run', '--labels=a,b', f'--out={tmp_path}/a.png'], 'one distinct label per run'),
        ([f'--runs={tmp_path}/run', f'--out={tmp_path}/a.png', '--top_k=0'], '--top_k=0 must be >= 1'),
        ([f'--bench={tmp_path}/bad.json', f'--out={tmp_path}/a.png'], 'is not a bench.py JSON'),
        ([f'--bench={tmp_path}/none.json', f'--out={tmp_path}/a.png'], 'not found'),
        (['--concepts=True', f'--out={tmp_path}/a.html'], 'need --ckpt'),
        (['--concepts=True', f'--ckpt={tmp_path}/x.pt', f'--out={tmp_path}/a.html'], 'non-empty --text'),
        ([f'--out={tmp_path}/a.png'], 'one of the four'),
        ([f'--runs={tmp_path}/run', '--geometry=True', f'--out={tmp_path}/a.png'], 'one of the four'),
        ([f'--runs={tmp_path}/run', '--device=cuda:7', f'--out={tmp_path}/a.png'], 'cuda:7'),
        ([str(tmp_path / 'run'), f'--out={tmp_path}/a.png'], f'give run directories as --runs={tmp_path}/run '),
    ]
    for args, message in cases:  # in this process: the exception's message is the line the user sees
        with pytest.raises(common.InputError) as e:
            run_plot(monkeypatch, *args)
        assert message in str(e.value) and str(e.value).startswith('error: ') and '\n' not in str(e.value), (args, e.value)
    for args, message in ((['--nonsense=1'], 'unknown config key'), (['--concepts'], 'needs a value')):  # the configurator's own one-line errors
        with pytest.raises(SystemExit, match=message):
            run_plot(monkeypatch, *args)
    assert 'wrote' not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ['bad.json', 'empty', 'empty_log', 'run', 'train_only']


# ----------------------------------------------------------------------------------------------
# concept_geometry: the collapse diagnostics of any checkpoint (moved here from runtime.py)

@pytest.fixture(scope='module')
def mlm_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('geometry') / 'run')
    run_script('train_mlm.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
               '--eval_interval=2')
    return out


def test_diagnostics_of_any_checkpoint(mlm_run, monkeypatch, capsys):
    """concept_geometry reports the collapse metrics for a trained checkpoint, also from the command line."""
    report = plot.concept_geometry(f'{mlm_run}/ckpt.pt', n_batches=2, batch_size=4)
    assert set(report) == {'erank', 'erank_batchmean', 'concept_cos_mean', 'concept_cos_max', 'participation_ratio'}
    assert 1.0 <= report['erank'] <= 8.0  # at most C = 8 concepts in the TINY shape
    run_plot(monkeypatch, '--geometry=True', f'--ckpt={mlm_run}/ckpt.pt', '--n_batches=2', '--batch_size=4')
    out = capsys.readouterr().out
    assert 'concept geometry over 2 x 4 validation windows' in out and f"erank {report['erank']:.4f}" in out
    assert 'wrote' not in out


def test_concept_geometry_refuses_foreign_files_in_one_line(data_dir, tmp_path):
    from model import ConceptConfig, ConceptMLM
    model = ConceptMLM(ConceptConfig(n_layer=1, n_head=2, n_embd=32, n_concepts=4, ffn_size=64, block_size=16,
                                     vocab_size=64, pad_id=60, mask_id=61, eod_id=62, cls_id=63, sep_id=59))
    files = {'bare state_dict': tmp_path / 'state_dict.pt', 'bare tensor': tmp_path / 'tensor.pt',
             'could not be read': tmp_path / 'notes.txt'}
    torch.save(model.state_dict(), files['bare state_dict'])
    torch.save(torch.zeros(3, 4), files['bare tensor'])
    files['could not be read'].write_text('not a checkpoint\n')
    for what, path in files.items():
        with pytest.raises(common.InputError) as e:
            plot.concept_geometry(str(path), data_dir)
        assert what in str(e.value) and '\n' not in str(e.value)


def test_concept_geometry_of_a_diverged_checkpoint_or_bad_arguments_is_one_line(mlm_run, tmp_path):
    ckpt = str(tmp_path / 'ckpt.pt')
    shutil.copy(f'{mlm_run}/ckpt.pt', ckpt)
    with pytest.raises(common.InputError, match='n_batches=0'):
        plot.concept_geometry(ckpt, n_batches=0)
    with pytest.raises(common.InputError, match='does not exist'):
        plot.concept_geometry(ckpt, data_dir=str(tmp_path / 'nowhere'))
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint['model']['lm_head.weight'][0, 0] = float('nan')
    torch.save(checkpoint, ckpt)
    with pytest.raises(common.InputError, match='non-finite weights'):
        plot.concept_geometry(ckpt, n_batches=1, batch_size=2)


def test_concept_geometry_says_it_does_not_apply_to_the_standard_arm(tmp_path):
    from model import ConceptConfig, ConceptMLM
    model = ConceptMLM(ConceptConfig(encoder='standard', vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                     n_concepts=8, ffn_size=64, pad_id=96, mask_id=95, eod_id=94))
    path = str(tmp_path / 'ckpt.pt')
    torch.save({'stage': 'mlm', 'model': model.state_dict(), 'model_args': vars(model.cfg), 'data_dir': str(tmp_path)},
               path)
    with pytest.raises(common.InputError, match='do not apply'):
        plot.concept_geometry(path)
