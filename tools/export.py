"""
Share a trained model: turn any stage's checkpoint into a directory in the Hugging Face Hub layout,
and read such a directory (or a hub repo id) back, so that everything that takes --ckpt takes it.

    python export.py --ckpt=out/tiny_mlm/ckpt.pt --out_dir=hub/tiny_mlm
    python export.py --ckpt=out/tiny_mlm/ckpt.pt --out_dir=hub/tiny_mlm --push_to_hub=user/tiny-mlm
    python sample.py --ckpt=hub/tiny_diffusion          # or eval_glue.py --ckpt=..., encode(texts, 'hub/...')

The directory holds
    model.safetensors     the weights only (no optimizer; no torch.compile '_orig_mod.' prefixes;
                          a tied lm_head is stored once and named in the file's metadata)
    config.json           model settings (encoder arm included), stage, vocab size, special ids,
                          tokenizer recipe, training config
    tokenizer.tiktoken    the BPE ranks file the recipe names (absent for a named tiktoken vocabulary)
    README.md             a model card: what it is, how it was trained, final validation metrics
                          from log.jsonl and any eval_glue.py results beside the checkpoint

load_exported() returns the same dict a ckpt.pt holds (minus the training state), with data_dir
pointing at the directory itself, which is where the tokenizer file now lives.
"""
import json
import math
import os
import re
import shutil
import sys

import torch

import prepare_data
from model import ConceptConfig, ConfigError

FORMAT = 'concept-encoder'
FORMAT_VERSION = 1
WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
SPECIALS = ('eod', 'pad', 'mask', 'cls', 'sep')
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')  # owner/name, as the hub spells repo ids


# ----------------------------------------------------------------------------------------------
# reading an exported directory or a hub repo

def is_hub_id(path):
    """'owner/name' that is not a path on this machine (and not a missing ckpt.pt)."""
    return not os.path.exists(path) and bool(HUB_ID.match(path)) and not path.endswith(('.pt', '.pth'))


def _model_args(args, where):
    """model_args for this model.py: the encoder arm is recorded in every export ('concept' for
    checkpoints older than the key); a model.py without the key only builds the concept arm."""
    args = dict(args)
    if 'encoder' not in ConceptConfig.__dataclass_fields__:
        if args.pop('encoder', 'concept') != 'concept':
            raise SystemExit(f"{where} holds a '{args.get('encoder')}' encoder, which this model.py cannot build; "
                             f"update the code (git pull)")
    return args


def load_exported(path, map_location='cpu'):
    """An exported directory, or a hub repo id (downloaded through huggingface_hub into its cache),
    -> the dict runtime.load_checkpoint returns: stage, model (state dict), model_args, config,
    iter_num, best_val_loss, tokenizer, special_tokens, data_dir (= the directory)."""
    if not os.path.isdir(path):
        path = download(path)
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise SystemExit(f"{path} is a directory without {CONFIG}: give a ckpt.pt or a directory written by "
                         f"export.py")
    try:
        with open(config_path, encoding='utf-8') as f:
            card = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{config_path} is unreadable ({e}); export the checkpoint again")
    if card.get('format') != FORMAT or card.get('format_version') != FORMAT_VERSION:
        raise SystemExit(f"{config_path} is not a concept-encoder export of format {FORMAT_VERSION} "
                         f"(format {card.get('format')!r}, version {card.get('format_version')!r}); "
                         f"export the checkpoint again with this code")
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise SystemExit(f"{weights} is missing; export the checkpoint again")
    try:
        state = load_file(weights, device=str(map_location))
        with safe_open(weights, 'pt') as f:
            tied = json.loads((f.metadata() or {}).get('tied', '{}'))
    except (SafetensorError, OSError, ValueError) as e:
        raise SystemExit(f"{weights} could not be read ({type(e).__name__}: {e}); it may be corrupt")
    for alias, name in tied.items():
        state[alias] = state[name]
    return {'stage': card['stage'], 'model': state, 'model_args': _model_args(card['model_args'], path),
            'config': card.get('training_config', {}), 'iter_num': card.get('iter_num'),
            'best_val_loss': card.get('best_val_loss'), 'tokenizer': card['tokenizer'],
            'special_tokens': card['special_tokens'], 'data_dir': os.path.abspath(path),
            'trained_on': card.get('trained_on')}


def download(repo_id):
    """A hub repo's files, through huggingface_hub's cache (a repo already there loads offline)."""
    if not is_hub_id(repo_id):
        raise SystemExit(f"checkpoint {repo_id} not found: give a ckpt.pt, a directory written by export.py "
                         f"or a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=repo_id)
    except Exception as e:  # noqa: BLE001 - no network, no such repo, no access: one answer for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise SystemExit(f"{repo_id} is not a local path, and downloading it from the hub failed "
                         f"({type(e).__name__}: {first}); check the name, your network or HF_TOKEN")


# ----------------------------------------------------------------------------------------------
# writing one

def weights_for_safetensors(state):
    """state dict -> ({name: contiguous tensor} with each shared storage once, {alias: stored name}).
    safetensors refuses tensors that share memory (the tied lm_head and token embedding)."""
    tensors, tied, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, tied


def read_log(run_dir):
    """The evaluations of log.jsonl beside a checkpoint ([] when there is none)."""
    path = os.path.join(run_dir, 'log.jsonl')
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: the card reports the evaluations before it
                continue
    return records


def eval_results(run_dir):
    """{file name: eval_glue.py results} for the JSON files beside a checkpoint that hold them."""
    found = {}
    for name in sorted(os.listdir(run_dir)):
        if not name.endswith('.json') or name in ('run.json', CONFIG):
            continue
        try:
            with open(os.path.join(run_dir, name), encoding='utf-8') as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data and all(isinstance(v, dict) and 'majority' in v for v in data.values()):
            found[name] = data
    return found


VAL_KEYS = ('val_loss', 'val_accuracy', 'val_recon_accuracy', 'val_nll_bound', 'val_ppl_bound', 'erank')


def _metrics_table(first, last):
    rows = ['| metric | untrained (iter 0) | final (iter {}) |'.format(last['iter']), '|---|---:|---:|']
    for k in VAL_KEYS:
        if last.get(k) is not None:
            before = first.get(k) if first is not None and first['iter'] == 0 else None
            rows.append(f"| {k} | {'-' if before is None else f'{before:.4f}'} | {last[k]:.4f} |")
    return '\n'.join(rows)


def model_card(ckpt, model_args, log, results, name, n_elements):
    """README.md of the export: what it is, how it was trained, what it scored and against what."""
    stage, cfg = ckpt.get('stage', '?'), ckpt.get('config') or {}
    arm = model_args.get('encoder', 'concept')
    C, H, N = model_args['n_concepts'], model_args['n_embd'], model_args['block_size']
    what = (f"a standard bidirectional transformer encoder (the baseline arm), {model_args['n_layer']} layers, "
            f"hidden size {H}" if arm == 'standard' else
            f"a concept encoder: up to {N} tokens are read by {C} learned concept vectors of size {H} through "
            f"cross-attention ({model_args['n_layer']} layers, cost O(C·N) per layer)")
    lines = ['---', 'library_name: pytorch', f'tags: [concept-encoder, {stage}, {arm}]', '---', f'# {name}', '',
             f"A checkpoint of the {stage} stage of concept-encoder: {what}. Decoder: "
             f"`{model_args.get('decoder')}`. {n_elements:,} weights (a tied lm_head counted once).", '',
             '## Use', '', 'With the concept-encoder code (this is not a `transformers` model):', '', '```python',
             'from eval_glue import encode',
             f"emb = encode(['a sentence'], '{name}')   # (1, {H}) mean of the concepts",
             '```', '']
    if stage == 'diffusion':
        lines += ['```bash', f'python sample.py --ckpt={name} --prompt="Return the"', '```', '']
    tok = ckpt['tokenizer']
    data = os.path.basename(str(ckpt.get('trained_on') or ckpt.get('data_dir', '?')))
    lines += ['## Training', '',
              f"- stage `{stage}`, {ckpt.get('iter_num')} iterations"
              + (f", {log[-1]['tokens_seen']:,} tokens seen" if log and 'tokens_seen' in log[-1] else ''),
              f"- data: `{data}`; tokenizer `{tok.get('name')}` "
              f"({tok.get('kind')}), vocabulary {model_args['vocab_size']} including 5 special tokens",
              f"- batch {cfg.get('batch_size')} x accumulation {cfg.get('gradient_accumulation_steps')} x "
              f"{cfg.get('block_size')} tokens, learning rate {cfg.get('learning_rate')} → {cfg.get('min_lr')}, "
              f"dtype {cfg.get('dtype')}; the whole config is `training_config` in config.json", '']
    if log:
        uniform = math.log(model_args['vocab_size'])
        lines += ['## Validation (from log.jsonl)', '', _metrics_table(log[0], log[-1]), '',
                  f"For scale: a uniform guess over the vocabulary scores a loss of ln({model_args['vocab_size']}) "
                  f"= {uniform:.4f} nats; the untrained column is the same model before its first step.", '']
    import eval_glue
    for fname, res in results.items():
        try:
            table = eval_glue.markdown_table(res)
        except (KeyError, TypeError, ValueError):
            continue
        lines += [f'## Evaluation (`{fname}`, eval_glue.py)', '', table, '',
                  'Scores in percent; majority is the majority-class (or constant) baseline of each task.', '']
    return '\n'.join(lines)


def check_out_dir(out_dir):
    """out_dir may be new, empty, or an earlier export (replaced whole); anything else is refused."""
    if os.path.isfile(out_dir):
        raise ConfigError(f"--out_dir={out_dir} is a file; give a directory name, e.g. hub/tiny_mlm")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, CONFIG)):
        raise ConfigError(f"--out_dir={out_dir} exists and is not an export (no {CONFIG}); choose another "
                          f"directory or remove it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out_dir={out_dir}: {parent} is not writable; choose another directory")


def export(ckpt_path, out_dir, data_dir='', name=''):
    """Write the export of ckpt_path to out_dir, atomically: into a temporary directory beside it,
    which then replaces out_dir, so a failure leaves out_dir as it was. name: what the model card
    calls it (the hub repo id when it is to be pushed; by default out_dir). Returns out_dir."""
    import runtime
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    check_out_dir(out_dir)
    ckpt = runtime.load_checkpoint(ckpt_path)
    model_args = {'encoder': 'concept', **ckpt['model_args']}
    recipe = ckpt['tokenizer']
    tok_dir = data_dir or ckpt.get('data_dir')
    try:  # the ranks file must be found and be the one the model was trained with, before anything is written
        if recipe.get('file'):
            prepare_data.tokenizer_from_recipe(recipe, tok_dir)
    except prepare_data.DataError as e:
        raise SystemExit(f"{e} (the tokenizer of {ckpt_path}; if its data directory moved, pass "
                         f"--data_dir=<that directory>)")
    tensors, tied = weights_for_safetensors(ckpt['model'])
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    log = read_log(run_dir)
    card = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'stage': ckpt.get('stage'),
            'encoder': model_args['encoder'], 'vocab_size': model_args['vocab_size'],
            'special_tokens': ckpt.get('special_tokens') or {k: model_args[f'{k}_id'] for k in SPECIALS},
            'tokenizer': recipe, 'model_args': model_args,
            'iter_num': ckpt.get('iter_num'), 'best_val_loss': ckpt.get('best_val_loss'),
            'tokens_seen': log[-1].get('tokens_seen') if log else None,
            'trained_on': ckpt.get('trained_on') or ckpt.get('data_dir'), 'training_config': ckpt.get('config', {})}
    out_dir = out_dir.rstrip(os.sep) or out_dir
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    old = f"{out_dir}.old.{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={'format': 'pt', 'tied': json.dumps(tied)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, WEIGHTS), 0o666 & ~umask)  # safetensors writes it owner-only
        with open(os.path.join(tmp, CONFIG), 'w', encoding='utf-8') as f:
            json.dump(card, f, indent=2, default=str)
            f.write('\n')
        if recipe.get('file'):
            shutil.copyfile(os.path.join(tok_dir, recipe['file']), os.path.join(tmp, recipe['file']))
        with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
            f.write(model_card(ckpt, model_args, log, eval_results(run_dir), name or out_dir,
                               sum(t.numel() for t in tensors.values())))
        if os.path.isdir(out_dir):
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if os.path.isdir(old):
                os.replace(old, out_dir)  # the earlier export goes back
            raise
    except (OSError, SafetensorError) as e:  # a full disk, a read-only directory
        raise SystemExit(f"writing {out_dir} failed ({type(e).__name__}: {e}); {out_dir} is unchanged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def push_to_hub(out_dir, repo_id):
    """Upload an export to the hub (needs a token: huggingface-cli login, or HF_TOKEN)."""
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=out_dir, repo_id=repo_id, commit_message=f"export of {out_dir}")
    except Exception as e:  # noqa: BLE001 - no token, no network, no permission: the export itself is kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise SystemExit(f"uploading {out_dir} to {repo_id} failed ({type(e).__name__}: {first}); the export in "
                         f"{out_dir} is complete: log in (huggingface-cli login or HF_TOKEN) and run again")
    return info


def main():
    settings = {'ckpt': 'out/tiny_mlm/ckpt.pt', 'out_dir': '', 'push_to_hub': '', 'data_dir': '',
                '__file__': os.path.abspath(__file__)}
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read(), settings)
    import runtime
    runtime.one_line_errors()
    ckpt, out_dir, repo = settings['ckpt'], settings['out_dir'], settings['push_to_hub']
    if not out_dir:
        raise ConfigError("--out_dir is needed, e.g. --out_dir=hub/tiny_mlm")
    if repo and not HUB_ID.match(repo):
        raise ConfigError(f"--push_to_hub={repo!r} is not a hub repo id; use owner/name, "
                          f"e.g. --push_to_hub=me/tiny-mlm")
    export(ckpt, out_dir, settings['data_dir'], name=repo)
    print(f"exported {ckpt} to {out_dir}: {', '.join(sorted(os.listdir(out_dir)))}")
    if repo:
        push_to_hub(out_dir, repo)
        print(f"uploaded {out_dir} to https://huggingface.co/{repo}")


if __name__ == '__main__':
    sys.exit(main())
