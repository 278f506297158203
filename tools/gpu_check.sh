#!/usr/bin/env bash
# make gpu-check: the CUDA tests, a short bf16 compiled run of each stage (h512l2), a 1-GPU torchrun and GPU-sized
# bench.py rows, then the MFU of every run. About 6 minutes on one H100/H200; writes under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/gpu_check}
$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: this torch sees no CUDA device')"
test -f data/pydocs/meta.json || { echo "gpu-check: no data/pydocs; run: make data/pydocs/meta.json" >&2; exit 1; }
mkdir -p "$OUT"
$PY -c "import torch; print('gpu-check on', torch.cuda.get_device_name(), '| torch', torch.__version__)"

echo "== CUDA tests (tests/test_cuda.py)"
failed=0
$PY -m pytest -q -rs -s tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" || failed=1  # the runs below go on

SHORT=(config/h512l2.py --data_dir=data/pydocs --device=cuda --dtype=bfloat16 --gradient_accumulation_steps=1
       --max_iters=60 --warmup_iters=10 --eval_interval=60 --eval_iters=2 --log_interval=20)
for stage in mlm tsdae diffusion; do
    echo "== train_$stage.py, bf16, compile=True"
    $PY train_$stage.py "${SHORT[@]}" --compile=True --out_dir="$OUT/$stage" 2>&1 | tee "$OUT/$stage.log"
done
echo "== torchrun, 1 GPU (the launcher and its environment; DDP itself needs 2 or more)"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 train_mlm.py "${SHORT[@]}" --compile=False \
    --max_iters=20 --eval_interval=20 --out_dir="$OUT/torchrun" 2>&1 | tee "$OUT/torchrun.log"

echo "== bench.py, GPU-sized rows"
$PY bench.py config/h512l2.py --seq_lens=512,2048,8192 --stages=mlm,diffusion --dtype=bfloat16 --compile=False \
    --out="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

echo "== MFU (the last log line of each run; bench.py's table above)"
for run in mlm tsdae diffusion torchrun; do echo "$run: $(grep -E '^iter [0-9]+:' "$OUT/$run.log" | tail -1)"; done
[ "$failed" = 0 ] || { echo "gpu-check: CUDA tests failed, see $OUT/tests.log" >&2; exit 1; }
