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

import runtime
from model import ConceptMLM

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
concept_loss_pooled = False      # True: VICReg statistics pooled over the batch, not per sample
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
compile = False                  # torch.compile encoder, decoder and loss (StageModel.compile_for_training)
seed = 1337
wandb_log = False
wandb_project = 'concept-encoder'
wandb_run_name = ''
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# ----------------------------------------------------------------------------------------------
# setup: device, data, model, optimizer, resume or warm start, log (runtime.TrainingRun)

if deletion_mode not in ('hide', 'drop'):
    raise SystemExit(f"deletion_mode must be 'hide' or 'drop', got {deletion_mode!r}")
if decoder not in ('posonly', 'weighted'):
    raise SystemExit(f"TSDAE rebuilds every token from the concepts: decoder must be 'posonly' or 'weighted' "
                     f"(a '{decoder}' query contains the token it has to predict)")
if encoder == 'standard' and deletion_mode == 'drop':
    raise SystemExit("encoder='standard' rebuilds each token from the state at its own position, which "
                     "deletion_mode='drop' removes; use deletion_mode='hide' (deleted tokens become [MASK], unseen)")
run = runtime.TrainingRun(config, 'tsdae', ConceptMLM)
rt, model, raw_model = run.rt, run.model, run.raw_model  # model: the DDP-wrapped one under torchrun


def evaluate():
    """Reconstruction loss and accuracy on the fixed validation windows (fixed deletions), over every rank."""
    tally = runtime.ValidationTally()
    for idx, nseed in run.val_batches:
        inputs, visible, targets = raw_model.tsdae_noise(idx, runtime.noise_generator(nseed, idx.device),
                                                         deletion_rate, deletion_mode)
        with rt.autocast():
            _, loss, stats = raw_model(inputs, targets, visible)
        tally.add(stats, loss)
    metrics = tally.means(run)
    return {**metrics, 'val_recon_accuracy': metrics['val_accuracy']}


# ----------------------------------------------------------------------------------------------
# training loop

while run.evaluate_and_continue(evaluate):  # every eval_interval steps and at the end: log, best, checkpoint
    # one optimizer step: fresh deletions per micro-batch, every real token rebuilt; the train loss is their mean
    loss_sum, n_decoded = torch.zeros((), device=rt.device), 0  # on the device, read when logged
    for idx, nseed in run.micro_batches():
        inputs, visible, targets = raw_model.tsdae_noise(idx, runtime.noise_generator(nseed, idx.device),
                                                         deletion_rate, deletion_mode)
        with rt.autocast():
            _, loss, stats = model(inputs, targets, visible, step=run.iter_num)
        loss_sum += stats.get('task_loss', loss.detach()).float()  # the task loss, without regularisers
        n_decoded += stats['n_pred']
        run.backward(loss)
    run.step(loss_sum, run.accum, n_decoded)

run.finish()
