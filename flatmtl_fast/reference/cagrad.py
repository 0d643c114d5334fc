"""CAGrad: conflict-averse gradient descent.

Source: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021), official code
GitHub ``Cranial-XIX/CAGrad`` (``nyuv2/utils.py``: ``cagrad``, ``overwrite_grad``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix, check_real
from ..primitives.checks import check_flag
from ._simplex import argmin_linear_plus_norm

#: ‖g_w‖ at or below this fraction of the largest ‖g_i‖ counts as zero (the solver's own accuracy is ~1e-8).
ZERO_GW_RTOL = 1e-6


class CAGrad(GramianAggregator):
    """w* = argmin_{w∈Δ} wᵀM𝟏/K + c‖g₀‖ √(wᵀMw);  d = (g₀ + c‖g₀‖/‖g_w‖ · g_w) / r · s.

    ``rescale`` is the official option: r = 1 + c² for 1 (default, as the official NYUv2/CityScapes runs),
    r = 1 + c for 2, r = 1 for 0. ``sum_scale`` multiplies by s = K as the official ``overwrite_grad``
    ("to match the sum loss"); default False, so that the default output has the mean-gradient scale that
    algorithms.md §2 writes (d = g₀ when c = 0) and that the other mean-scale methods here share.
    Default c = 0.4 (the value of the official NYUv2 runs; torchjd defaults to 0.5). K = 1: d = (1 + c) g₁ / r · s.
    Non-conflicting (min_i g_i·d ≥ 0) holds for c ≥ 1 when 0 is not in the hull, not for c < 1 in general.

    Solver: CLARABEL via cvxpy (see :func:`~flatmtl_fast.reference._simplex.argmin_linear_plus_norm`) in place
    of the official SciPy SLSQP (default tolerance 1e-6), for a more accurate oracle.
    Deviations: the official ``+1e-8`` terms in ‖g₀‖, c‖g₀‖ and 1/‖g_w‖ are dropped (they make the result
    depend on the gradient scale, e.g. at 1e-10); instead, when ‖g_w‖ ≤ 1e-6 · max‖g_i‖ (zero lies in the
    hull where the objective is minimal, so g_w/‖g_w‖ is solver noise) the g_w term is dropped, which is
    what the official code computes when g_w is exactly zero.
    """

    def __init__(self, c: float = 0.4, rescale: Literal[0, 1, 2] = 1, sum_scale: bool = False) -> None:
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2 (official option), got {rescale!r}")
        self.c = check_real(c, "CAGrad", "c", minimum=0.0)
        self.rescale = rescale
        self.sum_scale = check_flag(sum_scale, "CAGrad", "sum_scale")

    def _hyperparameters(self) -> dict[str, object]:
        return {"c": self.c, "rescale": self.rescale, "sum_scale": self.sum_scale}

    def _output_factor(self, K: int) -> float:
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return (K if self.sum_scale else 1.0) / divisor

    def _solve(self, M: Tensor) -> tuple[Tensor, float]:
        """w* and λ = c‖g₀‖/‖g_w‖ (0 when g_w counts as zero) from the float64 Gram M."""
        K = M.shape[0]
        b = M.sum(dim=1) / K  # (M𝟏/K)_i = g_i · g₀
        g0_norm = max(float(b.sum()) / K, 0.0) ** 0.5  # ‖g₀‖² = 𝟏ᵀM𝟏/K² (max: round-off)
        radius = self.c * g0_norm
        w = argmin_linear_plus_norm(b, M, radius, squared=False)
        gw_norm = max(float(w @ M @ w), 0.0) ** 0.5
        largest = float(M.diagonal().max().clamp(min=0)) ** 0.5
        return w, (radius / gw_norm if gw_norm > ZERO_GW_RTOL * largest else 0.0)

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="CAGrad")
        G64 = G.double()
        w, lam = self._solve(G64 @ G64.T)
        g0 = G64.mean(dim=0)
        gw = w @ G64
        return ((g0 + lam * gw) * self._output_factor(K)).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 weights (1/K + λ w*_i) · s / r."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="CAGrad")
        w, lam = self._solve(M.double())
        return (1.0 / K + lam * w) * self._output_factor(K)
