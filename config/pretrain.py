# The CPU pretraining recipe (make pretrain MINUTES=20 CORPUS=../shared/corpus): the tiny shape with a
# third layer and dropout, MLM on 128-token windows drawn anywhere in a corpus of real English,
# trained for a time budget (max_minutes, set by make) that the cosine decay follows. The data:
#   python prepare_data.py --dataset=../shared/corpus --vocab_size=4096 --data_dir=data/pretrain_corpus
# docs/LOG.md has how transfer grows with the budget, both arms, beside their baselines.
data_dir = 'data/pretrain_corpus'
n_layer = 3
n_head = 4
n_embd = 128
n_concepts = 32
ffn_size = 256
block_size = 128
batch_size = 128                 # 16k tokens per step
doc_aligned = False              # windows anywhere: every token of a book or an article can be read
dropout = 0.1
learning_rate = 2e-3
beta2 = 0.95
min_lr = 2e-4
warmup_iters = 100
max_iters = 1_000_000            # a bound only: max_minutes ends the run
eval_interval = 500
eval_iters = 10
log_interval = 50
dtype = 'bfloat16'
compile = False
