"""IMGrad: imbalance-sensitive gradient descent (CAGrad with an adaptive mix towards MGDA).

Source: Zhou et al., "IMGrad: Imbalance-sensitive gradient descent for multi-task learning" (IJCAI 2025,
arXiv 2503.08006), official code GitHub ``zzpustc/IMGrad`` (``nyuv2/utils.py``: ``imgrad``, ``overwrite_grad``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix, check_real
from ._simplex import argmin_linear_plus_norm
from .cagrad import ZERO_GW_RTOL
from .mgda import MGDA


class IMGrad(GramianAggregator):
    """Both forms of algorithms.md §1.3, with g_m the MGDA direction and cos θ = cos(g₀, g_m) ∈ [0, 1].

    ``variant="official"`` (default: its numbers are the published ones), c = α‖g₀‖:
        w* = argmin_{w∈Δ} (1.5 − cos θ) wᵀM𝟏/K + cos θ · c · √(wᵀMw),
        d = K (g₀ + c/‖g_w‖ · g_w) / (1 + α²)   (``rescale=1`` and ``overwrite_grad``'s × K, as run officially).
    ``variant="paper"`` (Eq. 11), √φ = α‖g₀‖:
        w* = argmin_{w∈Δ} (1 − cos θ) g_wᵀg₀ + cos θ · √φ · ‖g_w‖²,   d = g₀ + (√φ/‖g_w‖) g_w   (mean scale).
    The paper form is not scale-invariant (√φ carries the gradient's units): that is the paper's formula.
    K = 1: d = (1 + α)/(1 + α²) g₁ (official), (1 + α) g₁ (paper).

    g_m comes from :class:`~flatmtl_fast.reference.MGDA` (Frank–Wolfe, no normalisation); the official code
    uses ``MinNormSolver.find_min_norm_element`` (projected gradient) for the same min-norm point.
    Solver: CLARABEL via cvxpy in place of SciPy SLSQP. Deviations, as in :class:`CAGrad`: the official
    ``+1e-8`` terms are dropped, cos θ is exact (torch's ``cosine_similarity`` clamps ‖g₀‖‖g_m‖ at 1e-8, which
    zeroes cos θ at small gradient scales) and 0 when g_m counts as zero, and a g_w with ‖g_w‖ ≤ 1e-6 · max‖g_i‖
    drops the g_w term. g_m counts as zero by the same rule as g_w: when 0 lies in the hull, Frank–Wolfe can
    end on it up to rounding (e.g. N = 1, where any g_m ≠ 0 has cos θ = ±1), and the direction of that
    rounding is noise. The official code hard-codes K = 3; any K works here.
    """

    def __init__(self, alpha: float = 0.8, variant: Literal["official", "paper"] = "official") -> None:
        alpha = check_real(alpha, "IMGrad", "alpha", minimum=0.0)
        if variant not in ("official", "paper"):
            raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")
        self.alpha = float(alpha)
        self.variant = variant
        self._mgda = MGDA()

    def _hyperparameters(self) -> dict[str, object]:
        return {"alpha": self.alpha, "variant": self.variant}

    def _weights(self, M: Tensor, g0_gm: float, g0_norm: float, gm_norm: float) -> Tensor:
        """Weights on the raw rows from the float64 Gram M and g₀·g_m, ‖g₀‖, ‖g_m‖ (for cos θ)."""
        K = M.shape[0]
        largest = float(M.diagonal().max().clamp(min=0)) ** 0.5
        defined = g0_norm * gm_norm > 0 and gm_norm > ZERO_GW_RTOL * largest
        # g₀·g_m ≥ ‖g_m‖² ≥ 0 (g_m is the min-norm point): clip round-off.
        cos = min(max(g0_gm / (g0_norm * gm_norm), 0.0), 1.0) if defined else 0.0
        b = M.sum(dim=1) / K  # (M𝟏/K)_i = g_i · g₀
        radius = self.alpha * max(float(b.sum()) / K, 0.0) ** 0.5  # c = √φ = α‖g₀‖
        if self.variant == "official":
            w = argmin_linear_plus_norm((1.5 - cos) * b, M, cos * radius, squared=False)
            factor = K / (1.0 + self.alpha**2)
        else:
            w = argmin_linear_plus_norm((1.0 - cos) * b, M, cos * radius, squared=True)
            factor = 1.0
        gw_norm = max(float(w @ M @ w), 0.0) ** 0.5
        lam = radius / gw_norm if gw_norm > ZERO_GW_RTOL * largest else 0.0
        return factor * (1.0 / K + lam * w)

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="IMGrad")
        G64 = G.double()
        g0, gm = G64.mean(dim=0), self._mgda(G64)
        return (self._weights(G64 @ G64.T, float(g0 @ gm), float(g0.norm()), float(gm.norm())) @ G64).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 weights: factor · (1/K + λ w*), λ = α‖g₀‖/‖g_w‖ (factor K/(1+α²) official, 1 paper)."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="IMGrad")
        M64 = M.double()
        wm = self._mgda.weights(M64)
        # g₀·g_m = 𝟏ᵀM w_m / K, ‖g₀‖² = 𝟏ᵀM𝟏/K², ‖g_m‖² = w_mᵀM w_m.
        g0_norm = max(float(M64.sum()), 0.0) ** 0.5 / K
        gm_norm = max(float(wm @ M64 @ wm), 0.0) ** 0.5
        return self._weights(M64, float(M64.sum(dim=0) @ wm) / K, g0_norm, gm_norm)
