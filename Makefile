# Two commands a newcomer needs, from a fresh clone, offline:
#   make quickstart   virtualenv + requirements, the pydocs corpus, a tiny MLM and a tiny diffusion
#                     model trained on the CPU, then samples and their quality (~8 minutes on 2 cores).
#                     make quickstart TSDAE=1 also trains the TSDAE stage, warm-started from the MLM.
#   make test         the test suite (pytest, CPU, offline)
#   make pretrain     MLM pretraining on a corpus of real text for a time budget, MINUTES=20 CORPUS=../shared/corpus
#                     (the data is prepared once into data/pretrain_<corpus folder name>); out/pretrain_$(MINUTES)
#   make gpu-check    on a CUDA machine: CUDA tests, short bf16 compiled runs, torchrun, bench (tools/gpu_check.sh)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := config/tiny.py --data_dir=data/pydocs
SMALL_BATCH := --batch_size=32 --eval_iters=10
SAMPLE := --prompt="Return the" --num_samples=3 --length=48 --steps=48 --block_len=1 --top_k=100

MINUTES ?= 20
CORPUS ?= ../shared/corpus
PRETRAIN_DATA := data/pretrain_$(notdir $(abspath $(CORPUS)))

.PHONY: venv quickstart pretrain test gpu-check clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

data/pydocs/meta.json: $(VENV)/.installed
	$(PY) prepare_data.py --dataset=pydocs

quickstart: venv data/pydocs/meta.json
	$(PY) train_mlm.py $(TINY)
	@$(PY) -c "import json; r = [json.loads(l) for l in open('out/tiny_mlm/log.jsonl')][-1]; \
	print(f\"MLM: val loss {r['val_loss']:.3f}, val accuracy {r['val_accuracy']:.3f} after {r['iter']} iterations (out/tiny_mlm)\")"
# TSDAE decodes every position (MLM 15%), so it takes a smaller batch here: at config/tiny.py's
# 128 it would take ~9 minutes
	if [ -n "$(TSDAE)" ]; then $(PY) train_tsdae.py $(TINY) $(SMALL_BATCH) --init_from=out/tiny_mlm/ckpt.pt; fi
# diffusion starts from the MLM checkpoint (config/tiny_diffusion.py says why)
	$(PY) train_diffusion.py config/tiny.py config/tiny_diffusion.py --data_dir=data/pydocs --out_dir=out/tiny_diffusion
	@$(PY) -c "import json; r = [json.loads(l) for l in open('out/tiny_diffusion/log.jsonl')]; \
	print(f\"diffusion: val NLL bound {r[0]['val_nll_bound']:.3f} -> {r[-1]['val_nll_bound']:.3f} nats/token after {r[-1]['iter']} iterations (out/tiny_diffusion)\")"
	$(PY) sample.py --ckpt=out/tiny_diffusion/ckpt.pt $(SAMPLE) --out=out/tiny_diffusion/samples.json
	$(PY) tools/sample_quality.py --samples=out/tiny_diffusion/samples.json

$(PRETRAIN_DATA)/meta.json: $(VENV)/.installed
	$(PY) prepare_data.py --dataset=$(CORPUS) --vocab_size=4096 --data_dir=$(PRETRAIN_DATA)

pretrain: venv $(PRETRAIN_DATA)/meta.json
	$(PY) train_mlm.py config/pretrain.py --data_dir=$(PRETRAIN_DATA) --max_minutes=$(MINUTES) --out_dir=out/pretrain_$(MINUTES)

test: venv
	$(PY) -m pytest -q tests

gpu-check: venv data/pydocs/meta.json
	PY=$(PY) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) data/pydocs out/tiny_mlm out/tiny_tsdae out/tiny_diffusion
