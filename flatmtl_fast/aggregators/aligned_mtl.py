"""Fused Aligned-MTL."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import aligned_mtl as reference
from ..solvers import aligned_weights
from ..solvers.aligned import RANK_EPS
from ._fused import FusedGramian


class AlignedMTL(FusedGramian, reference.AlignedMTL):
    """Aligned-MTL (Senushkin et al., CVPR 2023) as :class:`flatmtl_fast.reference.AlignedMTL`: w = B𝟏, the
    sum of the aligned gradients.

    The torch solver calls ``torch.linalg.eigh``, which checks LAPACK's status on the host: on CUDA one
    synchronisation, and no CUDA graph capture (as IMTL-G's torch solver). The native CUDA solver
    (``use_backend("cuda")``) has neither: a Jacobi eigendecomposition of a pivoted Cholesky factor in the
    kernel. On the CPU the torch solver runs under every backend: LAPACK's eigh is faster there (0.3-0.5 ms
    against 1.9-2.6 ms at K = 64, 2 cores) and synchronises with nothing."""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return aligned_weights(M)

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return None if M.device.type == "cpu" else ("aligned_mtl", [RANK_EPS])
