#!/usr/bin/env bash
# The quality benchmark at 33x the default model (0.44M), for a lent GPU machine (one H200: ~9 min for the first
# five arms by estimate; needs only torch): DP vs DiLoCo (the default [outer], and the DiLoCo paper's 0.7/0.9) vs
# SparseLoCo (topk + plain SGD) vs the rotate codec (a shared quarter of Hadamard-rotated coefficients at 1 bit, the
# rest kept in the model) vs the hadtopk codec (each peer's largest 1/32 of those coefficients, Nesterov 1.6 / 0.6;
# after rotate, before 0.7/0.9) for a 14.6M-parameter model (6 layers x 448, block 128), K=4 workers, 3000 inner
# steps per worker at H=30 (100 outer rounds). Each arm is saved as it ends, so a timeout still returns the finished ones.
#   OUT=runs/gpu bash scripts/bench_quality_gpu.sh      -> $OUT/bench_quality_gpu.{json,md,png}
set -o pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_quality.txt"
timeout 560 python3 scripts/bench_quality.py --gpu --suites 3000:30 --grid n0.7/0.9 --codecs --no-iid --seeds 0 \
    --out "$OUT/bench_quality_gpu.json" 2>&1 | tee "$OUT/bench_quality_gpu.log"
