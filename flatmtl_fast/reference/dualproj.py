"""DualProj — projection of the mean gradient onto the dual cone (Lopez-Paz & Ranzato, "Gradient Episodic
Memory for Continual Learning", NeurIPS 2017, Eq. 11; as packaged by Quinton & Rey, arXiv 2406.16232;
official code: ``torchjd.aggregation.DualProj``, torchjd 0.18)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.checks import check_gramian, check_losses, check_matrix
from ._dual_cone import DualConeAggregator, preference_vector, project_weights


class DualProj(DualConeAggregator):
    """DualProj: d = π(g_p), the projection of g_p = Σ_i p_i g_i onto the dual cone {y : G y ≥ 0}.

    π(g_p) = Gᵀw with w = argmin_{v ≥ p} vᵀMv, solved exactly with quadprog; p = 𝟏/K by default, so
    g_p = g₀ is **the mean** gradient (torchjd's scale). For K = 1, d = g₁. d never conflicts with any
    g_i: G d ≥ 0 up to the ridge below.

    QP conventions and the one deviation from torchjd (``norm_eps`` defaults to 0 instead of 1e-4, so
    small-but-nonzero G are still projected; ``norm_eps=1e-4`` reproduces torchjd) are those of
    :class:`~flatmtl_fast.reference.UPGrad`: M normalised by its trace, plus ``reg_eps`` · I (1e-4).

    ``__call__`` forms M from the explicit rows and returns the projected vector Gᵀw (float64; result cast
    to G's dtype); :meth:`weights` returns w from M.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="DualProj")
        G64 = G.to(torch.float64)
        return (self._weights(G64 @ G64.T) @ G64).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="DualProj")
        return self._weights(M).to(M.dtype)

    def _weights(self, M: Tensor) -> Tensor:
        p = preference_vector(self.pref_vector, M.shape[0], "DualProj")
        return project_weights(M, p.unsqueeze(0), norm_eps=self.norm_eps, reg_eps=self.reg_eps)[0]
