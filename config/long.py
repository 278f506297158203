# Long context: windows of 32,768 tokens that span whole books, for MLM and diffusion, sized for about
# an hour of MLM on 2 CPU cores and unchanged on a GPU (only faster). The data, once (about 15 s):
#   python prepare_data.py --dataset=../shared/corpus/gutenberg --vocab_size=8192 --val_fraction=0.05 --data_dir=data/gutenberg
#   python train_mlm.py config/long.py           (out/long_mlm)
#   python train_diffusion.py config/long.py --init_from=out/long_mlm/ckpt.pt --time_cond=False --max_iters=200
#                                                (out/long_diffusion: from scratch, 800 steps would take hours)
# docs/LOG.md has what the run costs and what its concepts carry at 512, 4,096 and 32,768 tokens of context.
data_dir = 'data/gutenberg'
block_size = 32768
doc_aligned = False              # windows start anywhere and run across book boundaries (278 books: few starts)
batch_size = 1
gradient_accumulation_steps = 4  # 131,072 tokens per step
n_layer = 2
n_head = 4
n_embd = 128
n_concepts = 64
ffn_size = 256
n_dec_layer = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
max_iters = 800                  # docs/LOG.md has what a run costs on 2 CPU cores; diffusion decodes more a step
eval_interval = 100
eval_iters = 4                   # 4 windows of 32,768 validation tokens
log_interval = 10
dtype = 'bfloat16'
compile = False
