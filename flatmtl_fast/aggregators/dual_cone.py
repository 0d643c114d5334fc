"""Fused UPGrad and DualProj: the dual-cone projection QPs on the device."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import dualproj as reference_dualproj
from ..reference import upgrad as reference_upgrad
from ..solvers.dual_cone import preference_vector, project_weights
from ._fused import FusedGramian


class _DualCone(FusedGramian):
    _weights_in_input_dtype = True

    def _preference(self, M: Tensor) -> Tensor:
        return preference_vector(self.pref_vector, M.shape[0], M.device, type(self).__name__)

    def _native_parameters(self, M: Tensor) -> list:
        # No preference vector: the solver's own 1/K (the same doubles), without a fill op (a GPU launch) per step.
        pref = None if self.pref_vector is None else self._preference(M).contiguous()
        return [pref, float(self.norm_eps), float(self.reg_eps)]


class UPGrad(_DualCone, reference_upgrad.UPGrad):
    """UPGrad (Quinton & Rey, arXiv 2406.16232) as :class:`flatmtl_fast.reference.UPGrad`: w = Σ_i argmin_{v ≥ p_i e_i}
    vᵀM̃v (mean scale by default), M̃ = M/tr(M) + ``reg_eps`` I (1e-4), ``norm_eps`` = 0. Same constructor. The K
    QPs are solved together on the device (interior point + exact active-set polish) instead of one quadprog call
    each; the QP is strictly convex, so the two agree to rounding."""

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "upgrad", self._native_parameters(M)

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        U = torch.diag(self._preference(M))
        return project_weights(M, U, norm_eps=self.norm_eps, reg_eps=self.reg_eps).sum(dim=0)


class DualProj(_DualCone, reference_dualproj.DualProj):
    """DualProj (Lopez-Paz & Ranzato, NeurIPS 2017; torchjd) as :class:`flatmtl_fast.reference.DualProj`:
    w = argmin_{v ≥ p} vᵀM̃v, the mean gradient projected onto the dual cone; the QP solved as in :class:`UPGrad`."""

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "dualproj", self._native_parameters(M)

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        U = self._preference(M).unsqueeze(0)
        return project_weights(M, U, norm_eps=self.norm_eps, reg_eps=self.reg_eps)[0]
