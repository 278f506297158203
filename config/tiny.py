# A tiny model for CPUs: every stage trains in a few minutes on 2 cores and its loss falls visibly.
# python train_mlm.py config/tiny.py ; python train_tsdae.py config/tiny.py ; python train_diffusion.py config/tiny.py
dataset = 'data/pydocs'
n_layer = 2
n_head = 4
n_embd = 128
n_concepts = 32
ffn_size = 256
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 300
eval_interval = 100
eval_iters = 10
log_interval = 25
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
dropout = 0.0
device = 'cpu'
dtype = 'float32'
compile = False
