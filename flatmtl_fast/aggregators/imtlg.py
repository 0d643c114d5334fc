"""Fused IMTL-G."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import imtlg as reference
from ..solvers import imtlg_weights
from ._fused import FusedGramian


class IMTLG(FusedGramian, reference.IMTLG):
    """IMTL-G (Liu et al., ICLR 2021) as :class:`flatmtl_fast.reference.IMTLG`: Σ α_i = 1, equal projections,
    pseudo-inverse with the reference's cut-off (4 K eps of G's dtype, or of M's dtype in ``weights``).

    On CUDA the torch solver's ``torch.linalg.svd`` checks LAPACK's status on the host (one synchronisation,
    and no CUDA graph capture); the native solver (``use_backend("cuda")``) has neither."""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return imtlg_weights(M, input_dtype)

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "imtlg", [torch.finfo(input_dtype).eps]
