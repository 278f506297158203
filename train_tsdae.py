"""
TSDAE (Wang et al. 2021) for the Concept Encoder: delete 60% of the tokens, encode what is left
into C concepts, and rebuild every original token from the concepts alone with a position-only
decoder. Unlike MLM there is no [MASK] token in the input and no input-embedding shortcut in the
decoder, and every real position carries a loss.

    python train_tsdae.py config/tiny.py                                   # CPU, from scratch
    python train_tsdae.py config/tiny.py --init_from=out/tiny_mlm/ckpt.pt  # warm start from MLM
    torchrun --standalone --nproc_per_node=8 train_tsdae.py config/h512l2.py

Every setting below can be overridden by a config file and then --key=value (configurator.py).
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime
from model import ConceptConfig, ConceptMLM, average_diagnostics, concept_diagnostics

# ----------------------------------------------------------------------------------------------
# defaults
# I/O
out_dir = ''                     # '' -> out/<config name>_tsdae, e.g. out/tiny_tsdae
dataset = 'data/pydocs'          # a directory written by prepare_data.py
init_from = 'scratch'            # 'scratch' | 'resume' (from out_dir/ckpt.pt) | path of a checkpoint to warm-start from
eval_interval = 250
eval_iters = 20                  # validation batches per evaluation (fixed windows, fixed deletions)
log_interval = 10
always_save_checkpoint = True    # else only when val_loss improves
# data
batch_size = 32                  # micro-batch per process
block_size = 256                 # tokens per window
gradient_accumulation_steps = 1  # global: divided by the number of processes
doc_aligned = True               # windows start at a document start
# model
encoder = 'concept'               # 'concept' | 'standard': the O(N²) transformer peer, same blocks and objective
n_layer = 2
n_head = 8
n_embd = 512
n_concepts = 128
ffn_size = 1024
dropout = 0.0
bias = False
decoder = 'posonly'              # 'posonly' | 'weighted' (a perceiver query would show the answer)
n_dec_layer = 1
bixt = False                     # bidirectional cross-attention: tokens are updated by the concepts
recursive_iters = 0              # >0: one shared encoder layer applied this many times
shared_token_kv = False          # one token K/V projection serves every encoder layer (not with bixt)
tie_weights = True               # lm_head shares the token embedding
# TSDAE noise
deletion_rate = 0.6              # share of the real, non-special tokens deleted (the TSDAE paper's best)
deletion_mode = 'hide'           # 'hide': hidden from the encoder, positions kept | 'drop': removed, gaps closed
# concept geometry (model.py): regularisers against concept collapse, and their weighting
concept_losses = ''              # e.g. 'vicreg,t_regs_mst'; '' = none. Diagnostics are logged either way
concept_loss_weight = 0.02       # total weight of the regularisers (fixed weighting), split evenly
concept_loss_warmup = 0          # iterations over which the regularisers ramp up linearly
loss_weighting = 'fixed'         # 'fixed' | 'learnable' | 'kendall_gal' (bounded, see model.py)
concept_loss_pooled = False      # True: the original's batch-pooled VICReg statistics
# optimizer (AdamW) and schedule (warmup, cosine to min_lr)
learning_rate = 5e-4
max_iters = 2000
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0                  # 0 disables clipping
warmup_iters = 100
lr_decay_iters = 0               # 0: equal to max_iters
max_minutes = 0.0                # >0: train this long (evaluation not counted), decay over the budget; max_iters unused
min_lr = 5e-5
max_nonfinite_steps = 10         # consecutive skipped (non-finite) steps before the run stops
# system
device = 'auto'                  # 'auto' | 'cpu' | 'cuda' | 'mps'
dtype = 'bfloat16'               # 'float32' | 'bfloat16' | 'float16' (autocast; bf16 helps on CPU too)
compile = False                  # torch.compile encoder, decoder and loss (ConceptLM.compile_for_training)
seed = 1337
wandb_log = False
wandb_project = 'concept-encoder'
wandb_run_name = ''
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# ----------------------------------------------------------------------------------------------
# setup

runtime.one_line_errors()
runtime.check_settings(config)
rt = runtime.setup_runtime(device, dtype, seed)
# the global batch (batch_size x gradient_accumulation_steps sequences) is the contract at any world size
accum, batch_size = runtime.micro_batches_per_rank(gradient_accumulation_steps, batch_size, rt.world_size)
gradient_accumulation_steps = accum * rt.world_size
lr_decay_iters = lr_decay_iters or max_iters
out_dir = out_dir or runtime.default_out_dir('tsdae', encoder)
runtime.prepare_out_dir(out_dir, rt)  # a file or read-only out_dir fails here, before any long work
tokens_per_iter = batch_size * block_size * gradient_accumulation_steps
rt.print0(f"tokens per iteration: {tokens_per_iter:,} ({batch_size} x {block_size} x {gradient_accumulation_steps})")

# ----------------------------------------------------------------------------------------------
# data and the TSDAE noise

if deletion_mode not in ('hide', 'drop'):
    raise SystemExit(f"deletion_mode must be 'hide' or 'drop', got {deletion_mode!r}")
if decoder not in ('posonly', 'weighted'):
    raise SystemExit(f"TSDAE rebuilds every token from the concepts: decoder must be 'posonly' or 'weighted' "
                     f"(a '{decoder}' query contains the token it has to predict)")
if encoder == 'standard' and deletion_mode == 'drop':
    raise SystemExit("encoder='standard' rebuilds each token from the state at its own position, which "
                     "deletion_mode='drop' removes; use deletion_mode='hide' (deleted tokens become [MASK], unseen)")
data_dir = runtime.resolve_data_dir(dataset)
train_windows = runtime.TokenWindows(data_dir, 'train', block_size, batch_size, doc_aligned, seed,
                                     rt.rank, rt.world_size, accum, rt.device)
meta = train_windows.meta
special = meta['special_tokens']
val_batches = runtime.fixed_batches(data_dir, 'val', block_size, batch_size, eval_iters, doc_aligned,
                                    seed, rt.rank, rt.device)




# ----------------------------------------------------------------------------------------------
# model

model_keys = ['encoder', 'n_layer', 'n_head', 'n_embd', 'n_concepts', 'ffn_size', 'dropout', 'bias', 'decoder',
              'n_dec_layer', 'bixt', 'recursive_iters', 'shared_token_kv', 'tie_weights', 'block_size',
              'concept_losses', 'concept_loss_weight', 'concept_loss_warmup', 'loss_weighting',
              'concept_loss_pooled']
model_args = {k: globals()[k] for k in model_keys}
model_args.update(vocab_size=meta['vocab_size'], pad_id=special['pad'], mask_id=special['mask'],
                  eod_id=special['eod'], cls_id=special['cls'], sep_id=special['sep'])
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model, model_args, ckpt = runtime.build_model('tsdae', ConceptMLM, ConceptConfig, model_args, init_from,
                                              ckpt_path, meta, data_dir, rt)
rt.print0(f"ConceptMLM (TSDAE): {model.get_num_params() / 1e6:.2f}M parameters, encoder={model.cfg.encoder}, decoder={model.cfg.decoder}, "
          f"bixt={model.cfg.bixt}, recursive_iters={model.cfg.recursive_iters}")

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), rt.device_type)
scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == 'float16'))
iter_num, best_val_loss = 0, float('inf')
if ckpt is not None:
    iter_num, best_val_loss = runtime.restore_training_state(ckpt, optimizer, scaler, train_windows, rt, config)
budget = runtime.Budget(rt, max_iters, max_minutes, log_interval, learning_rate, min_lr, warmup_iters, lr_decay_iters,
                        spent=ckpt.get('train_seconds', 0.0) if ckpt else 0.0)
ckpt = None  # free memory
start_iter = iter_num  # a resumed run's checkpoint of start_iter exists: it is not written again
optimizer_step = runtime.OptimizerStep(optimizer, scaler, grad_clip, max_nonfinite_steps, ckpt_path, rt,
                                       saved_iter=start_iter if init_from == 'resume' else None)

raw_model = model
if compile:
    model.compile_for_training(rt.device_type)  # encoder: fixed shapes; decoder and loss: dynamic M
if rt.ddp:
    model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None)


@torch.no_grad()
def evaluate():
    """Reconstruction loss and accuracy on the fixed validation windows, averaged over ranks."""
    raw_model.eval()
    loss_sum, n_pred, n_correct, geometry = 0.0, 0, 0, []
    for idx, nseed in val_batches:
        inputs, visible, targets = raw_model.tsdae_noise(idx, runtime.noise_generator(nseed, idx.device), deletion_rate, deletion_mode)
        with rt.autocast():
            _, loss, stats = raw_model(inputs, targets, visible)
        loss_sum += loss.item() * stats['n_pred']  # a batch weighs by its scored tokens
        n_pred += stats['n_pred']
        n_correct += int(stats['n_correct'])
        if 'concepts' in stats:  # the concept arm's (model.ConceptLM.concept_stats)
            geometry.append(concept_diagnostics(stats['concepts']))
    raw_model.train()
    metrics = runtime.token_means(rt, n_pred, {'val_loss': loss_sum, 'val_accuracy': n_correct}, eval_iters,
                                  batch_size)
    return {**metrics, **{k: runtime.all_reduce_mean(v, rt) for k, v in average_diagnostics(geometry).items()}}


# ----------------------------------------------------------------------------------------------
# training loop

log = runtime.RunLog(rt, out_dir, config, 'train_tsdae.py', wandb_log, wandb_project, wandb_run_name,
                     resumed_at=iter_num if init_from == 'resume' else None)
meter = runtime.Throughput(rt)
step_loss, tokens_seen = None, iter_num * tokens_per_iter
while True:
    lr = budget.lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if iter_num % eval_interval == 0 or budget.done(iter_num):
        meter.pause()  # evaluation and checkpoints are left out of the throughput window
        train_loss = None if step_loss is None else runtime.mean_over_ranks(step_loss, rt)
        metrics = evaluate()
        val_loss = metrics['val_loss']
        optimizer_step.check_validation(val_loss, iter_num, raw_model)  # a nan stops the run, unsaved
        rt.print0(f"step {iter_num}: train loss {'-' if train_loss is None else f'{train_loss:.4f}'}, "
                  f"val loss {val_loss:.4f}, "
                  f"val accuracy {metrics['val_accuracy']:.4f}{runtime.erank_text(metrics)}")
        log.log_eval({'iter': iter_num, 'train_loss': train_loss, **metrics,
                      'val_recon_accuracy': metrics['val_accuracy'], 'lr': lr, 'tokens_seen': tokens_seen})
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        if iter_num > start_iter and (improved or always_save_checkpoint):  # every rank: each adds its RNG state
            runtime.save_training_checkpoint(rt, ckpt_path, 'tsdae', raw_model, optimizer, scaler, model_args,
                                             config, iter_num, best_val_loss, train_windows, meta, data_dir,
                                             budget.spent)
            optimizer_step.saved_iter = iter_num
    if budget.done(iter_num):
        break
    meter.resume()

    # one optimizer step over `accum` micro-batches
    budget.step_begins()
    step_loss, n_pred_step = torch.zeros((), device=rt.device), 0  # on the device, read when logged
    for micro, (idx, nseed) in enumerate(train_windows.next_step()):
        inputs, visible, targets = raw_model.tsdae_noise(idx, runtime.noise_generator(nseed, idx.device), deletion_rate, deletion_mode)
        if rt.ddp:
            model.require_backward_grad_sync = (micro == accum - 1)
        with rt.autocast():
            _, loss, stats = model(inputs, targets, visible, step=iter_num)
        step_loss += stats.get('task_loss', loss.detach()).float() / accum  # the task loss, without regularisers
        n_pred_step += stats['n_pred']
        scaler.scale(loss / accum).backward()
    train_windows.prefetch()  # the next step's batch is copied while the device computes this one
    grad_norm = optimizer_step(raw_model.parameters(), step_loss, iter_num)

    # accounting
    tokens_seen += tokens_per_iter
    meter.add(tokens_per_iter, raw_model.estimate_flops(block_size, 0) * batch_size * gradient_accumulation_steps
              + 3 * raw_model.decoder_flops(n_pred_step) * rt.world_size)
    iter_num += 1
    budget.step_ends(iter_num)
    if iter_num % log_interval == 0:  # the one all-reduce and read of the loss per log_interval
        train_loss = runtime.mean_over_ranks(step_loss, rt)
        rt.print0(f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, grad norm {float(grad_norm):.3f}, {meter.report()}")

log.finish()
runtime.teardown(rt)
