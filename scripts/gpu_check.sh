#!/usr/bin/env bash
# The CUDA checks for a lent GPU machine (see BENCHMARKS.md, "CUDA path"). Expects the project's
# dependencies that the machine lacks as wheels in .whl/ and copied packages in .gpu_site/.
set -o pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu_site:$PWD PYTHONUNBUFFERED=1
chmod +x .gpu_site/hivemind/hivemind_cli/p2pd
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, hivemind, swarmloco.app.peer; print(sys.version.split()[0], torch.__version__, hivemind.__version__, torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_outer_optim.py tests/test_allgather.py 2>&1 | tee "$OUT/pytest.log"
timeout 400 python3 scripts/bench_gpu.py --peers 3 --outer-steps 3 --inner-steps 20 --n-layer 4 --n-embd 384 \
    --block-size 128 --batch-size 16 --out "$OUT/bench_gpu.json" 2>&1 | grep -v " WARN \| INFO \|^\[" | tee "$OUT/bench.log"
# the public API's cost on a GPU: the GPT-2-124M-sized Llama through DiLoCo vs a plain loop (H200: 989 bf16 TFLOP/s)
timeout 300 python3 scripts/bench_api.py --config configs/llama-124m.toml --device cuda --batch 16 --blocks 6 \
    --block 10 --peak-tflops 989 --out "$OUT/bench_api.json" 2>&1 | grep -v " WARN \| INFO \|^\[" | tee -a "$OUT/bench.log"
