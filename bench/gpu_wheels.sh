#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a GPU session: downloads into .whl/ (git-ignored) the peers
# the GPU image lacks, as Python 3.12 x86-64 wheels, so that `run` can carry them (carry: [".whl"]) and
# bench/gpu_session.sh installs them with --no-index. torchjd's UPGrad needs qpsolvers + quadprog; its CAGrad
# and Nash-MTL need cvxpy with CLARABEL/ECOS. scs (43 MB) is left out: cvxpy imports without it and neither
# peer uses it, and the carried tree must stay under 64 MiB. numpy and scipy are already on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14 cvxpy==1.9.3 clarabel==0.11.1 ecos==2.0.14
  osqp==1.1.3 qdldl==0.1.9.post1 highspy==1.15.1 sparsediffpy==0.6.1 cffi==2.0.0 pycparser==3.0)
PLATFORMS=()
for p in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PINS[@]}"
du -sh .whl
