"""
TSDAE (Wang et al. 2021) for the Concept Encoder: delete 60% of the tokens, encode what is left into
C concepts, and rebuild every original token from the concepts alone with a position-only decoder:
no [MASK] in the input, no input-embedding shortcut in the decoder, a loss at every real position.

    python train_tsdae.py config/tiny.py                                   # from scratch
    python train_tsdae.py config/tiny.py --init_from=out/tiny_mlm/ckpt.pt  # warm start from MLM
    torchrun --standalone --nproc_per_node=8 train_tsdae.py config/h512l2.py
"""
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from model import concept_diagnostics

# ----------------------------------------------------------------------------------------------
# defaults, overridden by config files and then --key=value (configurator.py)
# I/O
out_dir = ''                     # '' -> out/<config name>_tsdae, e.g. out/tiny_tsdae
data_dir = 'data/pydocs'         # a directory written by prepare_data.py
init_from = 'scratch'            # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint to warm-start from
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
encoder = 'concept'              # 'concept' | 'standard': the O(N²) transformer peer, same blocks and objective
n_layer = 2
n_head = 8
n_embd = 512
n_concepts = 128
ffn_size = 1024
dropout = 0.0
bias = False
decoder = 'posonly'              # the only one: a perceiver query would show the answer
n_dec_layer = 1
bixt = False                     # bidirectional cross-attention: tokens are updated by the concepts
recursive_iters = 0              # >0: one shared encoder layer applied this many times
tie_weights = True               # lm_head shares the token embedding
# TSDAE noise
deletion_rate = 0.6              # share of the real, non-special tokens deleted (the TSDAE paper's best)
deletion_mode = 'hide'           # 'hide': hidden from the encoder, positions kept | 'drop': removed, gaps closed
# concept geometry (model.py): regularisers against concept collapse; the diagnostics are logged either way
concept_losses = ''              # e.g. 'vicreg,t_regs_mst'; '' = none
concept_loss_weight = 0.02       # total weight of the regularisers, split evenly
concept_loss_warmup = 0          # iterations over which the regularisers ramp up linearly
# optimizer (AdamW) and schedule (warmup, cosine to min_lr)
learning_rate = 5e-4
max_iters = 2000
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0                  # 0 disables clipping
warmup_iters = 100
lr_decay_iters = 0               # 0: equal to max_iters
max_minutes = 0.0                # >0: train this long (evaluation not counted), decay over it; max_iters unused
min_lr = 5e-5
max_nonfinite_steps = 10         # consecutive skipped (non-finite) steps before the run stops
# system
device = 'auto'                  # 'auto' | 'cpu' | 'cuda' | 'mps'
dtype = 'bfloat16'               # 'float32' | 'bfloat16' | 'float16' (autocast; bf16 helps on CPU too)
compile = False                  # torch.compile encoder, decoder and loss (model.compile_for_training)
seed = 1337
wandb_log = False
wandb_project = 'concept-encoder'
wandb_run_name = ''
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# ----------------------------------------------------------------------------------------------
# setup: settings, process, output folder, data, model, optimizer

common.check_settings(config)
if decoder != 'posonly':
    raise common.InputError(f"TSDAE rebuilds every token from the concepts: decoder must be 'posonly' "
                            f"(a '{decoder}' query contains the token it has to predict)")
if encoder == 'standard' and deletion_mode == 'drop':
    raise common.InputError("encoder='standard' rebuilds each token from the state at its own position, which "
                            "deletion_mode='drop' removes; use deletion_mode='hide' (deleted tokens become [MASK], unseen)")
ddp, rank, local_rank, world_size, device, dtype = common.init_process(device, dtype, seed)
master = rank == 0
autocast = common.autocast(device, dtype)
accum, micro_batch = common.split_global_batch(batch_size, gradient_accumulation_steps, world_size)
out_dir = out_dir or common.default_out_dir('tsdae', encoder)
ckpt = os.path.join(out_dir, 'ckpt.pt')
common.on_interrupt(ckpt)  # Ctrl-C: one line about the last checkpoint, not a traceback
if master:
    common.check_output(out_dir, '--out_dir', folder=True)  # before any long work
tokens_per_iter = micro_batch * block_size * accum * world_size
common.print0(f"tokens per iteration: {tokens_per_iter:,} ({micro_batch} x {block_size} x {accum * world_size})")

train_windows = common.TokenWindows(data_dir, 'train', block_size, micro_batch, doc_aligned, seed, rank, world_size,
                                    accum, device)
meta = train_windows.meta
val_batches = common.fixed_batches(data_dir, 'val', block_size, micro_batch, eval_iters, doc_aligned, seed, rank, device)
model, model_args, resumed = common.init_model('tsdae', config, meta, data_dir, ckpt)
model.to(device)
common.print0(f"ConceptMLM (TSDAE): {model.get_num_params() / 1e6:.2f}M parameters, encoder={encoder}, decoder={decoder}, "
              f"bixt={bixt}, recursive_iters={recursive_iters}")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), common.device_type(device))
scaler = torch.amp.GradScaler(common.device_type(device), enabled=dtype == 'float16')
iter_num, best_val_loss, train_seconds = 0, math.inf, 0.0
if resumed is not None:  # the optimizer, the sampler, every rank's RNG: the run goes on bit for bit
    iter_num, best_val_loss, train_seconds = common.restore_training_state(resumed, optimizer, scaler, train_windows,
                                                                           rank, config)
start_iter, saved_iter = iter_num, iter_num if resumed is not None else None  # the last good checkpoint
raw_model = model
if compile:
    model.compile_for_training(common.device_type(device))  # encoder: fixed shapes; decoder and loss: dynamic
if ddp:
    model = DDP(model, device_ids=[local_rank] if device.startswith('cuda') else None)
if master:
    log_path, logged, elapsed = common.start_log(out_dir, config, 'train_tsdae.py', device, dtype, world_size,
                                                 start_iter if resumed is not None else None)
    wandb_run = common.start_wandb(wandb_project, wandb_run_name, config) if wandb_log else None
peak = common.peak_flops(device, dtype)


@torch.no_grad()
def evaluate():
    """Reconstruction loss and accuracy on the fixed validation windows (fixed deletions), over every
    rank, and the concepts' collapse diagnostics."""
    raw_model.eval()
    loss_sum, n_correct, n_pred, diagnostics = 0.0, 0, 0, []
    for idx, nseed in val_batches:
        inputs, visible, targets = raw_model.tsdae_noise(idx, common.noise_generator(nseed, idx.device),
                                                         deletion_rate, deletion_mode)
        with autocast:
            _, loss, stats = raw_model(inputs, targets, visible)
        if stats['n_pred']:  # the mean of nothing is nan
            loss_sum += loss.item() * stats['n_pred']
            n_correct += int(stats['n_correct'])
            n_pred += stats['n_pred']
        if 'concepts' in stats:  # the concept arm's
            diagnostics.append(concept_diagnostics(stats['concepts']))
    raw_model.train()
    accuracy = common.token_mean(n_correct, n_pred, 'eval_iters or batch_size')
    return {'val_loss': common.token_mean(loss_sum, n_pred, 'eval_iters or batch_size'), 'val_accuracy': accuracy,
            **common.mean_diagnostics(diagnostics), 'val_recon_accuracy': accuracy}


def lr_at(it):
    """Warmup, then cosine decay over lr_decay_iters, or over the time budget when max_minutes > 0."""
    fraction = train_seconds / (60 * max_minutes) if max_minutes else None
    return common.get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters, fraction)


def finished():
    return train_seconds >= 60 * max_minutes if max_minutes else iter_num >= max_iters


# ----------------------------------------------------------------------------------------------
# training loop

t_start = time.time() - (elapsed if master else 0.0)
own_seconds = train_seconds                   # this rank's clock; train_seconds is the one the ranks agree on
last_loss, last_n = 0.0, 0                    # the last step's loss sum and its weight, read when logged
window = [0, 0.0, 0.0]                        # steps, seconds, FLOPs since the last log line
nonfinite_streak = 0
if finished() and resumed is not None:
    common.print0(f"note: {ckpt} is at iter {iter_num}, already the end of this run (max_iters={max_iters}, "
                  f"max_minutes={max_minutes}): nothing to train; raise them to go on")
while True:
    # evaluate, log and checkpoint every eval_interval iterations and at the end
    if iter_num % eval_interval == 0 or finished():
        metrics = evaluate()
        common.check_validation(metrics['val_loss'], iter_num, raw_model, ckpt, saved_iter, dtype)
        n = common.mean_over_ranks(last_n)
        train_loss = common.mean_over_ranks(last_loss) / n if n else None
        common.print0(f"step {iter_num}: train loss {'-' if train_loss is None else f'{train_loss:.4f}'}, val loss "
                      f"{metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f}"
                      + (f", concept erank {metrics['erank']:.2f}" if 'erank' in metrics else ''))
        if master and iter_num not in logged:
            record = {'iter': iter_num, 'train_loss': train_loss, **metrics, 'lr': lr_at(iter_num),
                      'tokens_seen': iter_num * tokens_per_iter, 'elapsed_s': round(time.time() - t_start, 3)}
            common.append_log(log_path, record)
            if wandb_run:
                wandb_run.log(record, step=iter_num)
        improved = metrics['val_loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val_loss'])
        if iter_num > start_iter and (improved or always_save_checkpoint):  # on every rank: each adds its RNG state
            checkpoint = common.training_checkpoint('tsdae', raw_model, optimizer, scaler, model_args, config, iter_num,
                                                    best_val_loss, train_windows, meta, data_dir, train_seconds)
            if master:
                common.save_checkpoint(ckpt, checkpoint)
            saved_iter = iter_num
    if finished():
        break

    # one optimizer step over accum micro-batches; under DDP the gradients are averaged after the last
    t0 = time.time()
    lr = lr_at(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum, n_pred = torch.zeros((), device=device), 0  # kept on the device: no host sync in the step
    for micro, (idx, nseed) in enumerate(train_windows.next_step()):
        if ddp:
            model.require_backward_grad_sync = micro == accum - 1
        # fresh deletions per micro-batch; every real token is rebuilt
        inputs, visible, targets = raw_model.tsdae_noise(idx, common.noise_generator(nseed, idx.device),
                                                         deletion_rate, deletion_mode)
        with autocast:
            _, loss, stats = model(inputs, targets, visible, step=iter_num)
        loss_sum += stats.get('task_loss', loss.detach()).float()  # without the regularisers
        n_pred += stats['n_pred']
        scaler.scale(loss / accum).backward()
    train_windows.prefetch()  # the next step's batch travels while the device computes this one
    # unscale, clip, step; a non-finite loss or gradient skips the step, too many in a row stop the run
    grad_norm, nonfinite_streak = common.optimizer_step(optimizer, scaler, raw_model.parameters(), loss_sum,
                                                        grad_clip, nonfinite_streak, max_nonfinite_steps, iter_num,
                                                        ckpt, saved_iter, dtype)
    last_loss, last_n = loss_sum, accum  # the mean of the micro-batches' losses
    iter_num += 1
    own_seconds += time.time() - t0
    if iter_num > start_iter + 1:  # the first step (compilation, warm-up) stays out of the throughput
        window = [window[0] + 1, window[1] + time.time() - t0,
                  window[2] + raw_model.estimate_flops(micro_batch * accum, block_size, n_pred) * world_size]
    if not ddp:
        train_seconds = own_seconds
    elif max_minutes and iter_num % log_interval == 0:  # the ranks agree on the budget spent, as they log
        train_seconds = common.mean_over_ranks(own_seconds)
    if iter_num % log_interval == 0:  # the one read of the loss per log_interval
        n = common.mean_over_ranks(last_n)
        train_loss = common.mean_over_ranks(last_loss) / n if n else None
        common.print0(f"iter {iter_num}: loss {'-' if train_loss is None else f'{train_loss:.4f}'}, lr {lr:.2e}, "
                      f"grad norm {float(grad_norm):.3f}, {common.throughput(window, tokens_per_iter, peak)}")
        window = [0, 0.0, 0.0]

if master and wandb_run:
    wandb_run.finish()
common.finish_process(ddp)
