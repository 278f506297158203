# The quickstart's diffusion run, on top of config/tiny.py (make quickstart):
#   python train_diffusion.py config/tiny.py config/tiny_diffusion.py --out_dir=out/tiny_diffusion
# It starts from the tiny MLM checkpoint: with time_cond off and one decoder layer, the diffusion
# model is the MLM model (encoder, Perceiver decoder, tied head) trained at every masking rate, so
# every tensor is copied (the local window's map is new and starts at zero, so the run starts as
# the MLM model) and the diffusion run refines what the MLM run learned instead of spending its
# budget on the unigram solution. docs/LOG.md (the local window entry) has the measurements behind each key.
init_from = 'out/tiny_mlm/ckpt.pt'
batch_size = 32                  # diffusion decodes a fraction t of every window (MLM: 15%)
eval_iters = 8                   # 8 x 32 windows of 128 tokens: about pydocs' validation split once
max_iters = 700                  # the rest of the quickstart's ~8 minutes after the MLM run
eval_interval = 350              # the bound at the start, halfway and the end: evaluations cost training time
time_cond = False                # no AdaLN-Zero: its zero gates close the decoder's path to the concepts at init
n_dec_layer = 1                  # the MLM's decoder depth, so that the whole decoder is warm-started
local_window = 2                 # each decoded position reads its 2 neighbours on either side: the concepts blur positions
label_smoothing = 0.0            # smoothing costs nats of the NLL bound directly
t_min = 0.1                      # the bound integrates over (0, 1]: train on most of that range
learning_rate = 1e-3             # a warm start: lower than tiny.py's 2e-3 from scratch, short warmup
warmup_iters = 10
min_lr = 1e-4
