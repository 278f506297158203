"""
Masked language modelling (BERT-style) for the Concept Encoder: mask 15% of the tokens, encode the
corrupted text into C concepts, and decode the concepts back at the masked positions only.

    python train_mlm.py config/tiny.py                              # CPU: README "What to expect"
    python train_mlm.py config/tiny.py --decoder=posonly --bixt=True
    torchrun --standalone --nproc_per_node=8 train_mlm.py config/h512l2.py

Every setting below can be overridden by a config file and then --key=value (configurator.py).
"""
import os

import torch

import runtime
from model import ConceptMLM

# ----------------------------------------------------------------------------------------------
# defaults
# I/O
out_dir = ''                     # '' -> out/<config name>_mlm, e.g. out/tiny_mlm
dataset = 'data/pydocs'          # a directory written by prepare_data.py
init_from = 'scratch'            # 'scratch' | 'resume' (from out_dir/ckpt.pt) | path of a checkpoint to warm-start from
eval_interval = 250
eval_iters = 20                  # validation batches per evaluation (fixed windows, fixed noise)
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
decoder = 'perceiver'            # 'weighted' | 'perceiver' | 'posonly'
n_dec_layer = 1
bixt = False                     # bidirectional cross-attention: tokens are updated by the concepts
recursive_iters = 0              # >0: one shared encoder layer applied this many times
shared_token_kv = False          # one token K/V projection serves every encoder layer (not with bixt)
tie_weights = True               # lm_head shares the token embedding
# MLM noise
mask_prob = 0.15                 # of the real tokens; of those 80% -> [MASK], 10% random, 10% kept
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

if encoder == 'standard' and decoder != 'perceiver':  # its lm_head reads the corrupted token's own state
    raise SystemExit(f"encoder='standard' predicts each masked token from its own state, which is what "
                     f"decoder='perceiver' reads; decoder='{decoder}' applies to the concept arm only")
run = runtime.TrainingRun(config, 'mlm', ConceptMLM)
rt, model, raw_model = run.rt, run.model, run.raw_model  # model: the DDP-wrapped one under torchrun


def evaluate():
    """Masked-token loss and accuracy on the fixed validation windows (fixed noise), over every rank."""
    tally = runtime.ValidationTally()
    for idx, nseed in run.val_batches:
        inputs, targets = raw_model.mlm_noise(idx, runtime.noise_generator(nseed, idx.device), mask_prob)
        with rt.autocast():
            _, loss, stats = raw_model(inputs, targets)
        tally.add(stats, loss)
    return tally.means(run, hint=' or mask_prob')


# ----------------------------------------------------------------------------------------------
# training loop

while run.evaluate_and_continue(evaluate):  # every eval_interval steps and at the end: log, best, checkpoint
    # one optimizer step over the micro-batches; the train loss is a mean over the masked tokens
    loss_sum, n_pred = torch.zeros((), device=rt.device), 0  # on the device, read when logged
    for idx, nseed in run.micro_batches():
        inputs, targets = raw_model.mlm_noise(idx, runtime.noise_generator(nseed, idx.device), mask_prob)
        with rt.autocast():
            _, loss, stats = model(inputs, targets, step=run.iter_num)
        loss_sum += stats.get('task_loss', loss.detach()).float() * stats['n_pred']  # the task loss, no regularisers
        n_pred += stats['n_pred']
        run.backward(loss)
    run.step(loss_sum, n_pred, n_decoded=n_pred)

run.finish()
