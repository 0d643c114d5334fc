#!/usr/bin/env bash
# The work of a lent GPU machine (torch 2.11 + CUDA 13.0, triton 3.6, Python 3.12, no network), in stages
# that each fit one `run` call (10 minutes); logs, test reports and the benchmark JSON land in $OUT.
#
#   here, once, before the session:  bash bench/gpu_wheels.sh        (peers as wheels into .whl/)
#   run(command="bash bench/gpu_session.sh build test", carry=[".whl"])
#   run(command="bash bench/gpu_session.sh bench-primitives bench-solvers bench-distributed", carry=[".whl"])
#   run(command="bash bench/gpu_session.sh bench-aggregators", carry=[".whl"])
#   run(command="bash bench/gpu_session.sh bench-training", carry=[".whl"])
#
# Stages: build (the extension with the CUDA kernels; skipped when an up-to-date CUDA build is there, as on a
# still-warm machine), test (every `-m gpu` test), bench-primitives, bench-aggregators (every method, K 2 3 10
# 40, N 1e6 1e7 1e8, beside the reference and torchjd; results saved after each method), bench-solvers,
# bench-training (MLP and ViT-B steps at K = 3 and 10 with their breakdown and peak memory, beside torchjd),
# bench-distributed (world-size-1 NCCL group vs the plain path).
# A bench stage rebuilds first if the machine was handed back in between. Extra arguments after `--` go to
# every `python3 -m bench` call (e.g. `-- --quick`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flatmtl_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=()
while (($#)) && [[ $1 != -- ]]; do STAGES+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
BENCH_ARGS=("$@")
((${#STAGES[@]})) || STAGES=(build test bench-primitives bench-solvers bench-distributed bench-aggregators bench-training)

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

built_with_cuda() {
  local so
  so=$(ls flatmtl_fast/_C.cpython-312-*.so 2>/dev/null | head -1)
  [[ -n $so ]] && [[ -z $(find csrc CMakeLists.txt setup.py -newer "$so" -print -quit) ]] \
    && python3 -c "import flatmtl_fast._C as c, sys; sys.exit(0 if c.with_cuda else 1)" 2>/dev/null
}

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
  if built_with_cuda; then
    echo "build: up to date"
  else
    FLATMTL_NATIVE=1 FLATMTL_CUDA=1 FLATMTL_CUDA_ARCHS="${FLATMTL_CUDA_ARCHS:-90}" \
      python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; return 1; }
  fi
  python3 -c "import flatmtl_fast; print(flatmtl_fast.backends())" | tee -a "$OUT/gpu.txt"
}

gpu_tests() {
  timeout 540 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
}

bench() {  # name, then the arguments of python3 -m bench
  local name=$1
  shift
  timeout 560 python3 -m bench "$@" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench_$name.log" | tail -60
  cp bench/results/*.json "$OUT/" 2>/dev/null || true
}

status=0
for stage in "${STAGES[@]}"; do
  echo "=== $stage"
  case $stage in
    build) build || exit 1 ;;
    test) gpu_tests || status=1 ;;
    bench-*)
      built_with_cuda || build || exit 1
      case $stage in
        bench-primitives) bench primitives --suite primitives ;;
        bench-aggregators) bench aggregators --suite aggregators ;;
        bench-solvers) bench solvers --suite solvers ;;
        bench-training) bench training --suite training --train-model mlp vit-b deep-narrow --train-K 3 10 ;;
        bench-distributed) bench distributed --suite distributed ;;
        *) echo "unknown stage $stage"; exit 2 ;;
      esac
      ;;
    *) echo "unknown stage $stage (build, test, bench-*)"; exit 2 ;;
  esac
done
exit $status
