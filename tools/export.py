"""
Share a trained model: a checkpoint becomes a folder in the Hugging Face Hub layout (model.safetensors, config.json,
the tokenizer's ranks, a model card) that everything taking --ckpt reads (common.load_export), optionally uploaded.

    python tools/export.py --ckpt=out/tiny_mlm/ckpt.pt --out_dir=hub/tiny_mlm [--push_to_hub=user/tiny-mlm]
    python sample.py --ckpt=hub/tiny_diffusion          # or eval_glue.py --ckpt=..., encode(texts, 'hub/...')
"""
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from anywhere

from safetensors.torch import save

import common
import eval_glue

ckpt = 'out/tiny_mlm/ckpt.pt'    # a ckpt.pt, an export or a hub id
out_dir = ''                     # new, empty, or an earlier export (replaced whole)
data_dir = ''                    # where the checkpoint's tokenizer is, if its data directory moved
push_to_hub = ''                 # owner/name: upload the export there too


def model_card(checkpoint, model_args, log, run_dir, name, n_weights):
    """README.md of the export: what it is, how it was trained, what it scored and against what."""
    stage, cfg, arm = checkpoint.get('stage', '?'), checkpoint.get('config') or {}, model_args['encoder']
    C, H, N, V = model_args['n_concepts'], model_args['n_embd'], model_args['block_size'], model_args['vocab_size']
    what = (f"a standard bidirectional transformer encoder (the baseline arm), {model_args['n_layer']} layers, "
            f"hidden size {H}" if arm == 'standard' else
            f"a concept encoder: up to {N} tokens are read by {C} learned concept vectors of size {H} through "
            f"cross-attention ({model_args['n_layer']} layers, cost O(C·N) per layer)")
    lines = ['---', 'library_name: pytorch', f'tags: [concept-encoder, {stage}, {arm}]', '---', f'# {name}', '',
             f"A checkpoint of the {stage} stage of concept-encoder: {what}. Decoder: "
             f"`{model_args.get('decoder')}`. {n_weights:,} weights (a tied lm_head counted once).", '',
             '## Use', '', 'With the concept-encoder code (this is not a `transformers` model):', '', '```python',
             'from eval_glue import encode', f"emb = encode(['a sentence'], '{name}')   # (1, {H}) mean of the concepts",
             '```', '']
    if stage == 'diffusion':
        lines += ['```bash', f'python sample.py --ckpt={name} --prompt="Return the"', '```', '']
    tok = checkpoint['tokenizer']
    data = os.path.basename(str(checkpoint.get('trained_on') or checkpoint.get('data_dir', '?')))
    lines += ['## Training', '',
              f"- stage `{stage}`, {checkpoint.get('iter_num')} iterations"
              + (f", {log[-1]['tokens_seen']:,} tokens seen" if log and 'tokens_seen' in log[-1] else ''),
              f"- data: `{data}`; tokenizer `{tok.get('name')}` ({tok.get('kind')}), vocabulary {V} including "
              f"5 special tokens",
              f"- batch {cfg.get('batch_size')} x accumulation {cfg.get('gradient_accumulation_steps')} x "
              f"{cfg.get('block_size')} tokens, learning rate {cfg.get('learning_rate')} → {cfg.get('min_lr')}, "
              f"dtype {cfg.get('dtype')}; the whole config is `training_config` in config.json", '']
    if log:
        first, last = (log[0] if log[0]['iter'] == 0 else {}), log[-1]
        rows = [f"| {k} | {'-' if first.get(k) is None else f'{first[k]:.4f}'} | {last[k]:.4f} |"
                for k in ('val_loss', 'val_accuracy', 'val_recon_accuracy', 'val_nll_bound', 'val_ppl_bound', 'erank')
                if last.get(k) is not None]
        lines += ['## Validation (from log.jsonl)', '', f"| metric | untrained (iter 0) | final (iter {last['iter']}) |",
                  '|---|---:|---:|', *rows, '',
                  f"For scale: a uniform guess over the vocabulary scores a loss of ln({V}) = {math.log(V):.4f} nats; "
                  f"the untrained column is the same model before its first step.", '']
    found = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    for fname in sorted(n for n in found if n.endswith('.json')):  # eval_glue.py results, told apart by their content
        try:
            with open(os.path.join(run_dir, fname), encoding='utf-8') as f:
                res = json.load(f)
            entries = res.get('results') if isinstance(res, dict) and 'run' in res else res
            if not (entries and all(isinstance(v, dict) and 'majority' in v for v in entries.values())):
                continue
            table = eval_glue.markdown_table(res)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable, or of another version
            continue
        lines += [f'## Evaluation (`{fname}`, eval_glue.py)', '', table, '',
                  'Scores in percent; majority is the majority-class (or constant) baseline of each task.', '']
    return '\n'.join(lines)


def export(ckpt, out_dir, data_dir='', name=''):
    """Write the export of ckpt to out_dir through common.atomic_write, so a failure or a kill leaves out_dir as it
    was. name: what the model card calls it (the hub id when pushed; else out_dir)."""
    out_dir = os.path.normpath(out_dir)
    common.check_output(out_dir, '--out_dir', folder=True, replaced=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, common.EXPORT_CONFIG)):
        raise common.InputError(f"--out_dir={out_dir} exists and is not an export (no {common.EXPORT_CONFIG}); "
                                f"choose another directory or remove it")
    checkpoint = common.load_checkpoint(ckpt)
    recipe = checkpoint.get('tokenizer')
    if not isinstance(recipe, dict):
        raise common.InputError(f"{ckpt} records no tokenizer recipe, so an export could not be read back; "
                                f"export a checkpoint that train_*.py wrote")
    if recipe.get('file'):  # the ranks file must be there and be the model's own before anything is written
        common.checkpoint_tokenizer(checkpoint, data_dir)
    model_args = {'encoder': 'concept', **checkpoint['model_args']}  # older checkpoints lack the key
    tensors, tied, seen = {}, {}, {}
    for k, t in checkpoint['model'].items():  # safetensors refuses shared memory: a tied lm_head is stored once
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[k] = seen[key]
        else:
            seen[key], tensors[k] = k, t.detach().cpu().contiguous()
    run_dir = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    log_path = os.path.join(run_dir, 'log.jsonl')
    log = common.read_log(log_path) if os.path.isfile(log_path) else []
    card = {'format': common.EXPORT_FORMAT[0], 'format_version': common.EXPORT_FORMAT[1],
            'stage': checkpoint.get('stage'), 'encoder': model_args['encoder'], 'vocab_size': model_args['vocab_size'],
            'special_tokens': checkpoint.get('special_tokens') or {k: model_args[f'{k}_id'] for k in common.SPECIALS},
            'tokenizer': recipe, 'model_args': model_args, 'iter_num': checkpoint.get('iter_num'),
            'best_val_loss': checkpoint.get('best_val_loss'), 'tokens_seen': log[-1].get('tokens_seen') if log else None,
            'trained_on': checkpoint.get('trained_on') or checkpoint.get('data_dir'),
            'training_config': checkpoint.get('config', {})}
    readme = model_card(checkpoint, model_args, log, run_dir, name or out_dir, sum(t.numel() for t in tensors.values()))

    def build(tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, common.EXPORT_WEIGHTS), 'wb') as f:  # not save_file: it writes owner-only
            f.write(save(tensors, metadata={'format': 'pt', 'tied': json.dumps(tied)}))
        for fname, content in ((common.EXPORT_CONFIG, json.dumps(card, indent=2, default=str) + '\n'),
                               ('README.md', readme)):
            with open(os.path.join(tmp, fname), 'w', encoding='utf-8') as f:
                f.write(content)
        if recipe.get('file'):
            shutil.copyfile(os.path.join(data_dir or checkpoint['data_dir'], recipe['file']),
                            os.path.join(tmp, recipe['file']))
    common.atomic_write(out_dir, build)
    return out_dir


def main():
    if not out_dir:
        raise common.InputError("--out_dir is needed, e.g. --out_dir=hub/tiny_mlm")
    if push_to_hub and not common.HUB_ID.match(push_to_hub):
        raise common.InputError(f"--push_to_hub={push_to_hub!r} is not a hub repo id; use owner/name, "
                                f"e.g. --push_to_hub=me/tiny-mlm")
    written = None
    try:
        written = export(ckpt, out_dir, data_dir, name=push_to_hub)
        print(f"exported {ckpt} to {written}: {', '.join(sorted(os.listdir(written)))}")
        if push_to_hub:  # needs a token: huggingface-cli login, or HF_TOKEN
            try:
                from huggingface_hub import HfApi
                api = HfApi()
                api.create_repo(push_to_hub, exist_ok=True)
                api.upload_folder(folder_path=written, repo_id=push_to_hub, commit_message=f"export of {written}")
            except Exception as e:  # noqa: BLE001 - no token, no network, no permission: the export is kept
                raise common.InputError(f"uploading {written} to {push_to_hub} failed ({type(e).__name__}: "
                                        f"{common.first_line(e)}); the export in {written} is complete: log in "
                                        f"(huggingface-cli login or HF_TOKEN) and run again")
            print(f"uploaded {written} to https://huggingface.co/{push_to_hub}")
    except KeyboardInterrupt:
        common.interrupted(f"{out_dir} {'is unchanged' if os.path.exists(out_dir) else 'was not written'}"
                           if written is None else f"the export in {written} is complete, the upload did not finish")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configurator.py')).read())
    main()
