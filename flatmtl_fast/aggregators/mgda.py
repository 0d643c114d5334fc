"""Fused MGDA."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import mgda as reference
from ..solvers.simplex import min_norm_weights
from ._fused import FusedGramian


class MGDA(FusedGramian, reference.MGDA):
    """MGDA (Sener & Koltun, NeurIPS 2018): d = Σ_i (w_i / D_i) g_i, w = argmin_{w∈Δ} wᵀ(D⁻¹MD⁻¹)w.

    Constructor, defaults (``normalize="none"``, ``max_iter=250``, ``stop_crit=1e-5``), divisors D
    (none / l2 / loss / loss+, a zero D_i left at 1) and scale (simplex weights) are those of
    :class:`flatmtl_fast.reference.MGDA`, and so is the solver: the official Frank–Wolfe iteration step for
    step (:func:`~flatmtl_fast.solvers.min_norm_weights`), so the result equals the reference's at the same
    ``max_iter`` / ``stop_crit`` — including the inexactness of the official budget (raise ``max_iter`` for
    the exact min-norm point). Every call runs all ``max_iter`` steps (frozen once the stop rule fires).
    Deviation: the losses are not checked here (that would synchronise); with ``normalize="loss"``/``"loss+"``
    a loss ≤ 0 is used as D_i = 1, and a NaN or Inf loss gives NaN weights (the non-finite policy), where the
    reference raises.
    """

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        code = ("none", "l2", "loss", "loss+").index(self.normalize)
        losses64 = None if losses is None else losses.to(device=M.device, dtype=torch.float64).contiguous()
        return "mgda", [code, losses64, self.max_iter, float(self.stop_crit)]

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        D = self._divisors(M.diagonal().clamp_min(0.0).sqrt(), losses)
        return min_norm_weights(M / torch.outer(D, D), self.max_iter, self.stop_crit) / D
