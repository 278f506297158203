"""
Masked discrete diffusion (MDLM / LLaDA style) through the concept bottleneck: mask each token with
probability t ~ U(t_min, 1), encode into C concepts, and denoise the masked positions with a
cross-attention-only decoder conditioned on t by AdaLN-Zero. sample.py generates text from it.

    python train_diffusion.py config/tiny.py                         # CPU: README "What to expect"
    python train_diffusion.py config/tiny.py --condition=prefix --time_cond=False
    torchrun --standalone --nproc_per_node=8 train_diffusion.py config/h512l2.py

Every setting below can be overridden by a config file and then --key=value (configurator.py).
"""
import math
import os

import torch

import runtime
from model import ConceptDiffusion

# ----------------------------------------------------------------------------------------------
# defaults
# I/O
out_dir = ''                     # '' -> out/<config name>_diffusion, e.g. out/tiny_diffusion
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
n_dec_layer = 2                  # cross-attention + FFN layers of the denoiser (no token self-attention)
local_window = 0                 # >0: each decoded position also reads the noisy tokens this many to each side
bixt = False                     # bidirectional cross-attention: tokens are updated by the concepts
recursive_iters = 0              # >0: one shared encoder layer applied this many times
shared_token_kv = False          # one token K/V projection serves every encoder layer (not with bixt)
tie_weights = True               # lm_head shares the token embedding
# diffusion
condition = 'noisy'              # what the encoder sees: 'noisy' (= what sampling gives it) | 'clean' | 'prefix'
time_cond = True                 # AdaLN-Zero conditioning on t; False: the decoder infers t (MDLM, LLaDA)
t_min = 0.3                      # t ~ U(t_min, 1) in training
stratified_t = True              # one t per stratum of the batch: lower-variance loss (MDLM)
label_smoothing = 0.1
elbo_weight = True               # weight masked tokens by 1/t: the loss estimates the MDLM bound
bound_levels = 8                 # t levels of the validation NLL bound (midpoint rule over (0, 1])
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
# setup: device, data, model, optimizer, resume or warm start, log (runtime.TrainingRun); the
# diffusion noise lives in model.py, as generate() and the NLL bound use it too

run = runtime.TrainingRun(config, 'diffusion', ConceptDiffusion, decoder='diffusion')
rt, model, raw_model = run.rt, run.model, run.raw_model  # model: the DDP-wrapped one under torchrun
rt.print0(f"condition={raw_model.cfg.condition}, time_cond={raw_model.cfg.time_cond}")


def evaluate():
    """On the fixed validation windows, over every rank: the plain masked cross-entropy and
    accuracy at t ~ U(t_min, 1) (no smoothing, no weighting), and the NLL bound in nats/token."""
    tally = runtime.ValidationTally()
    for idx, nseed in run.val_batches:
        with rt.autocast():
            _, _, stats = raw_model(idx, generator=runtime.noise_generator(nseed, idx.device))
            bound, tokens = raw_model.nll_bound(idx, n_grid=bound_levels,
                                                generator=runtime.noise_generator(nseed + 1, idx.device))
        tally.add(stats, stats['ce'], val_nll_bound=(bound, tokens))
    return tally.means(run, val_ppl_bound=lambda m: math.exp(min(m['val_nll_bound'], 50)))


# ----------------------------------------------------------------------------------------------
# training loop

while run.evaluate_and_continue(evaluate):  # every eval_interval steps and at the end: log, best, checkpoint
    # one optimizer step: each window masked at its own t (model.add_noise); the train loss is their mean
    loss_sum, n_decoded = torch.zeros((), device=rt.device), 0  # on the device, read when logged
    for idx, nseed in run.micro_batches():
        with rt.autocast():
            _, loss, stats = model(idx, generator=runtime.noise_generator(nseed, idx.device), step=run.iter_num)
        loss_sum += stats.get('task_loss', loss.detach()).float()  # the task loss, without regularisers
        n_decoded += stats['n_pred']
        run.backward(loss)
    run.step(loss_sum, run.accum, n_decoded)

run.finish()
