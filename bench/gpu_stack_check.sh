#!/usr/bin/env bash
# The test suite under the lent GPU machine's software (Python 3.12, torch 2.11 + CUDA 13.0, triton 3.6) on a
# machine without a GPU, so that version trouble shows before a GPU session rather than during it: the
# extension is built as gpu_session.sh builds it there (CUDA kernels for sm_90) and every test that needs no
# GPU runs. About 4 GB of wheels and 15-25 minutes on 2 cores.
#
#   bash bench/gpu_stack_check.sh [VENV]        (default VENV: /tmp/flatmtl-gpu-stack)
#
# The package is built in a copy of the tracked files (VENV/tree), so this checkout's own build is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/flatmtl-gpu-stack}
# A pyenv shim named python3.12 may exist without being runnable: prefer the interpreter itself.
PY312=$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
[[ -n $PY312 ]] || PY312=$(command -v python3.12 || true)
[[ -x $PY312 ]] || { echo "python3.12 not found"; exit 2; }

[[ -x $VENV/bin/python ]] || "$PY312" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
# NumPy below 2.4: Triton 3.6's interpreter converts one-element arrays with int(), which NumPy 2.5 rejects.
"${PIP[@]}" torch==2.11.0 triton==3.6.0 "numpy<2.4" pybind11 cmake ninja "pytest>=8" scipy scikit-learn matplotlib tqdm
# torchjd's requirements would move torch to the newest wheel: install it and its solvers separately.
"${PIP[@]}" --no-deps "torchjd==0.18.*"
"${PIP[@]}" "quadprog!=0.1.10,>=0.1.9" "qpsolvers>=1.0.1" "cvxpy>=1.3.0" "ecos>=2.0.14"
"$VENV/bin/python" -c "import torch, triton; assert torch.__version__.startswith('2.11') and triton.__version__.startswith('3.6'), (torch.__version__, triton.__version__); print('torch', torch.__version__, 'triton', triton.__version__)"

TREE=$VENV/tree
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -z | xargs -0 cp --parents -t "$TREE"
cd "$TREE"
FLATMTL_NATIVE=1 FLATMTL_CUDA=1 FLATMTL_CUDA_ARCHS=90 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider
