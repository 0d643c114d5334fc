"""Fused FairGrad."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import fairgrad as reference
from ..solvers import fair_weights
from ._fused import FusedGramian


class FairGrad(FusedGramian, reference.FairGrad):
    """FairGrad (Ban & Ji, ICML 2024) as :class:`flatmtl_fast.reference.FairGrad`: w > 0 with Mw = w^{-1/α}
    (raw scale, no clip), the reference's Newton iteration with backtracking: the compiled solver stops once
    converged; the on-device torch solver runs the full budget (frozen once converged, no host sync)."""

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "fairgrad", [self.alpha, reference.gram_eps(input_dtype)]

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return fair_weights(M, self.alpha, reference.gram_eps(input_dtype))
