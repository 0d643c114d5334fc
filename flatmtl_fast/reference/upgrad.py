"""UPGrad — unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv 2406.16232; official code: ``torchjd.aggregation.UPGrad``, torchjd 0.18)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.checks import check_gramian, check_losses, check_matrix
from ._dual_cone import DualConeAggregator, preference_vector, project_weights


class UPGrad(DualConeAggregator):
    """UPGrad: project every g_i onto the dual cone {y : G y ≥ 0} and combine the projections.

    π(g_i) = Gᵀ w^(i) with w^(i) = argmin_{v ≥ e_i} vᵀMv, solved exactly with quadprog;
    d = Σ_i p_i π(g_i) with the preference vector p = 𝟏/K by default, i.e. **the mean** of the projected
    gradients — torchjd's scale (w = Σ_i argmin_{v ≥ p_i e_i} vᵀMv, which equals Σ_i p_i w^(i) for p ≥ 0).
    For K = 1, d = g₁ (the mean of one row). d never conflicts with any g_i: G d ≥ 0 up to the ridge below.

    QP conventions (see ``_dual_cone``): as torchjd's ``QuadprogProjector``, M is normalised by its trace and
    ``reg_eps`` · I (default 1e-4, torchjd's) is added before solving, which perturbs the result by
    O(reg_eps) relative for a well-conditioned M (the golden value [0.2929, 1.9004, 1.9004] of
    J = [[-4, 1, 1], [6, 1, 1]] is [0.2924, 1.9006, 1.9006] without the ridge) and by up to O(√reg_eps) —
    a few percent — when M is singular (K > rank G); pass a smaller ``reg_eps`` (e.g. 1e-10) for an
    almost exact projection. Deviation: ``norm_eps`` defaults to 0, not torchjd's 1e-4.
    torchjd treats M as zero whenever tr(M) = ‖G‖²_F < 1e-4, i.e. returns the plain mean of rows for every
    small-but-nonzero G (all gradient norms below ~1e-2), which breaks non-conflict and linearity under
    scaling at small scales; here M counts as zero only when tr(M) ≤ norm_eps = 0. ``norm_eps=1e-4``
    reproduces torchjd exactly.

    ``__call__`` forms M from the explicit rows, solves the K QPs and combines the explicitly projected
    vectors π(g_i) (float64; result cast to G's dtype); :meth:`weights` returns w = Σ_i p_i w^(i) from M.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="UPGrad")
        G64 = G.to(torch.float64)
        projected = self._projection_weights(G64 @ G64.T) @ G64  # row i: p_i π(g_i)
        return projected.sum(dim=0).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="UPGrad")
        return self._projection_weights(M).sum(dim=0).to(M.dtype)

    def _projection_weights(self, M: Tensor) -> Tensor:
        """K × K matrix whose row i is argmin_{v ≥ p_i e_i} vᵀMv (the weights of p_i π(g_i))."""
        p = preference_vector(self.pref_vector, M.shape[0], "UPGrad")
        return project_weights(M, torch.diag(p), norm_eps=self.norm_eps, reg_eps=self.reg_eps)
