#!/usr/bin/env bash
# One command for a lent GPU machine (torch 2.11 + CUDA 13.0, triton 3.6, Python 3.12, no network):
# build the extension, run the GPU test marker, run the benchmark suite; logs and JSON under $OUT.
#   usage (device tool, repo root):  bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/flatmtl_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

FLATMTL_NATIVE=1 FLATMTL_CUDA=1 FLATMTL_CUDA_ARCHS="${FLATMTL_CUDA_ARCHS:-90}" \
  python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import flatmtl_fast; print(flatmtl_fast.backends())" | tee -a "$OUT/gpu.txt"

# GPU tests (directories whose modules import only what the GPU image has).
python3 -m pytest tests/primitives tests/fused/test_gpu.py tests/test_package.py -m gpu -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25

python3 -m bench --suite primitives aggregators training --train-K 3 10 "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
cp bench/results/*.json "$OUT/" 2>/dev/null || true
