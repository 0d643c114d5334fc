"""Fused UPGrad and DualProj: the dual-cone projection QPs on the device."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.dual_cone import check_projection_parameters, preference_vector, project_weights
from ._fused import FusedGramian


class _DualCone(FusedGramian):
    _weights_in_input_dtype = True

    def __init__(self, pref_vector: Tensor | None = None, *, norm_eps: float = 0.0, reg_eps: float = 1e-4) -> None:
        check_projection_parameters(pref_vector, norm_eps, reg_eps, type(self).__name__)
        self.pref_vector = pref_vector
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def _hyperparameters(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps}

    def _preference(self, M: Tensor) -> Tensor:
        return preference_vector(self.pref_vector, M.shape[0], M.device, type(self).__name__)


class UPGrad(_DualCone):
    """UPGrad (Quinton & Rey, arXiv 2406.16232) as :class:`flatmtl_fast.reference.UPGrad`: w = Σ_i argmin_{v ≥ p_i e_i}
    vᵀM̃v (mean scale by default), M̃ = M/tr(M) + ``reg_eps`` I (1e-4), ``norm_eps`` = 0. The K QPs are solved
    together on the device (interior point + exact active-set polish) instead of one quadprog call each;
    the QP is strictly convex, so the two agree to rounding. (Not a subclass of the reference class: its
    module imports quadprog, which the fused path must not need.)"""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        U = torch.diag(self._preference(M))
        return project_weights(M, U, norm_eps=self.norm_eps, reg_eps=self.reg_eps).sum(dim=0)


class DualProj(_DualCone):
    """DualProj (Lopez-Paz & Ranzato, NeurIPS 2017; torchjd) as :class:`flatmtl_fast.reference.DualProj`:
    w = argmin_{v ≥ p} vᵀM̃v, the mean gradient projected onto the dual cone; the QP solved as in :class:`UPGrad`."""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        U = self._preference(M).unsqueeze(0)
        return project_weights(M, U, norm_eps=self.norm_eps, reg_eps=self.reg_eps)[0]
