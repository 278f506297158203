# The original project's L6 runs: H512, C128, 8 heads, FFN 2048, block 512,
# effective batch 512 sequences, bf16. Meant for GPUs:
#   torchrun --standalone --nproc_per_node=8 train_diffusion.py config/h512l6.py
# On any number of GPUs the global batch stays 512 sequences: gradient_accumulation_steps is divided
# by the world size, and beyond 8 GPUs each runs a smaller micro-batch (common.split_global_batch).
data_dir = 'data/minipile'            # python prepare_data.py --dataset=minipile (needs the HF hub)
n_layer = 6
n_head = 8
n_embd = 512
n_concepts = 128
ffn_size = 2048
block_size = 512
batch_size = 64                      # per GPU (up to 8 GPUs; 512 / world size beyond)
gradient_accumulation_steps = 8      # global: 64 x 8 = 512 sequences per step
max_iters = 40000                    # ~20 epochs of Minipile's first 512 tokens per document (origin)
lr_decay_iters = 40000
warmup_iters = 2000
learning_rate = 3e-4                 # stable for L6 and diffusion at this batch (docs/design.md)
min_lr = 3e-5
weight_decay = 0.01
grad_clip = 1.0
dropout = 0.1
eval_interval = 2000
eval_iters = 50
log_interval = 50
dtype = 'bfloat16'
compile = True
