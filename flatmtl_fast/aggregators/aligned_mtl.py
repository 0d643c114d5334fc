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
    synchronisation, and no CUDA graph capture (as IMTL-G's torch solver). The native solver has neither: a Jacobi
    eigendecomposition of a pivoted Cholesky factor, in the CUDA kernel (``use_backend("cuda")``) and, up to
    ``CPU_NATIVE_MAX_K`` tasks, on the CPU. Beyond that LAPACK's eigh is faster on the CPU (it synchronises with
    nothing there)."""

    #: The largest K whose CPU solve is the native one: at small K the torch solver's fixed cost (~0.08 ms of torch
    #: ops around eigh) dominates, at large K the Jacobi's O(K³) sweeps. ``weights(M)`` on 2 cores, native / torch:
    #: K = 3: 0.014 / 0.087 ms, K = 10: 0.034 / 0.12 ms, K = 20: 0.10 / 0.11 ms, K = 24: 0.15 / 0.14 ms, K = 32:
    #: 0.30 / 0.16 ms.
    CPU_NATIVE_MAX_K = 20

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return aligned_weights(M)

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        if M.device.type == "cpu" and M.shape[0] > self.CPU_NATIVE_MAX_K:
            return None
        return "aligned_mtl", [RANK_EPS]
