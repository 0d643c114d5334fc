"""Fused Aligned-MTL."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import aligned_mtl as reference
from ..solvers import aligned_weights
from ._fused import FusedGramian


class AlignedMTL(FusedGramian, reference.AlignedMTL):
    """Aligned-MTL (Senushkin et al., CVPR 2023) as :class:`flatmtl_fast.reference.AlignedMTL`: w = B𝟏, the
    sum of the aligned gradients. On CUDA, ``torch.linalg.eigh`` checks its LAPACK status on the host
    (a synchronisation, and no CUDA graph capture) — as IMTL-G's torch solver; none on the CPU."""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return aligned_weights(M)
