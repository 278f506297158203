# A tiny model for CPUs: its loss falls visibly on pydocs within a couple of minutes on 2 cores.
# python train_mlm.py config/tiny.py                                    (~2.5 minutes for 300 iterations)
# python train_diffusion.py config/tiny.py --batch_size=32 --eval_iters=10   (~2 minutes; TSDAE likewise)
# TSDAE and diffusion decode most positions, so at batch 128 they take ~9 minutes (make quickstart uses 32).
data_dir = 'data/pydocs'
n_layer = 2
n_head = 4
n_embd = 128
n_concepts = 32
ffn_size = 256
block_size = 128
batch_size = 128                 # 16k tokens per step: the loss needs tokens more than iterations
gradient_accumulation_steps = 1
max_iters = 300
eval_interval = 100
eval_iters = 3                   # 3 x 128 windows: about twice pydocs' validation split
log_interval = 25
learning_rate = 2e-3
beta2 = 0.95                     # a shorter second-moment memory suits a 300-step run
min_lr = 2e-4
warmup_iters = 30
dropout = 0.0
device = 'cpu'
dtype = 'float32'
compile = False
