"""FairGrad: α-fair resource allocation among the tasks.

Source: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning" (ICML 2024, arXiv 2402.15638), official
code GitHub ``OptMN-Lab/fairgrad`` (``methods/weight_methods.py``: ``FairGrad``), adapted by torchjd's ``FairGrad``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix, check_real
from .nash_mtl import above_rounding, gram_eps, newton_converged

MAX_NEWTON_ITER = 100
EPS64 = torch.finfo(torch.float64).eps


def _utility(w: Tensor, alpha: float) -> Tensor:
    """Σ_i u(w_i) with u'(w) = w^{-1/α}: the α-fair utility whose optimality condition is Mw = w^{-1/α}."""
    if alpha == 1.0:
        return w.log().sum()
    power = 1.0 - 1.0 / alpha
    return (w**power).sum() / power


def armijo_floor(root_weighted_sum: float | Tensor, K: float | Tensor) -> float | Tensor:
    """The Newton decrement² below which Armijo's test is skipped: 1e-10, or the rounding of f's quadratic term,
    K·eps·|w|ᵀ|M||w| ≤ K·eps·(Σ_i w_i √M_ii)² (``root_weighted_sum``; Cauchy–Schwarz), when larger. That term
    grows with w: on nearly opposite gradients (w ~ 1e3) f cannot see the decrease of a converging step.
    Floats (here) or device scalars (the torch solver)."""
    rounding = K * EPS64 * root_weighted_sum**2
    return rounding.clamp_min(1e-10) if isinstance(rounding, Tensor) else max(1e-10, rounding)


def fair_weights(M: Tensor, alpha: float, eps: float) -> Tensor | None:
    """The w > 0 with M w = w^{-1/α} for a float64 PSD M with a positive diagonal, or None if none is found.

    It minimises the strictly convex f(w) = ½ wᵀMw − Σ u(w_i) (u concave for every α > 0): Newton's method
    with a backtracking (Armijo) line search that keeps w > 0, which converges globally when the minimiser
    exists. Solved on M/‖M‖_F; if M = s M̃ and M̃ w̃ = w̃^{-1/α} then w = s^{-α/(α+1)} w̃ (exact rescaling).
    No solution exists when a nonnegative combination of the gradients vanishes (e.g. opposite rows); None too
    when some g_i·d of the solution is not above its rounding from M (unit roundoff ``eps``; ``above_rounding``).
    """
    K = M.shape[0]
    scale = float(torch.linalg.matrix_norm(M))
    M = M / scale

    def objective(w: Tensor) -> float:
        return float(0.5 * w @ M @ w - _utility(w, alpha))

    # Starts: the official 𝟏/K and the exact solution for diagonal M, each moved to its best multiple
    # t w along its ray (t^{1+1/α} = Σ w_i^{1−1/α} / wᵀMw); keep the one with the lower f.
    candidates = []
    for w in (torch.full((K,), 1.0 / K, dtype=M.dtype), M.diagonal() ** (-alpha / (alpha + 1))):
        quadratic = float(w @ M @ w)
        if quadratic > 0:
            w = w * (float((w ** (1 - 1 / alpha)).sum()) / quadratic) ** (alpha / (alpha + 1))
        candidates.append(w)
    w = min(candidates, key=objective)
    last_residual = math.inf
    for _ in range(MAX_NEWTON_ITER + 1):
        Mw = M @ w
        residual = float((w ** (1 / alpha) * Mw - 1.0).abs().max())  # scale-free form of Mw = w^{-1/α}
        if newton_converged(residual, last_residual):
            return w * scale ** (-alpha / (alpha + 1)) if bool(above_rounding(M, w, Mw, eps)) else None
        last_residual = residual
        gradient = Mw - w ** (-1 / alpha)
        try:
            step = -torch.linalg.solve(M + torch.diag(w ** (-1 / alpha - 1) / alpha), gradient)
        except torch.linalg.LinAlgError:  # w has run off to infinity along a null direction of M
            return None
        # Backtracking: stay in w > 0, and ask for Armijo's decrease only while the Newton decrement²
        # (−slope) is measurable: near the root f's change is below its rounding and full steps converge there.
        t, f0, slope = 1.0, objective(w), float(gradient @ step)
        unmeasurable = armijo_floor(float(w @ M.diagonal().sqrt()), K)
        while t > 1e-12:
            trial = w + t * step
            if bool((trial > 0).all()) and (-slope <= unmeasurable or objective(trial) <= f0 + 1e-4 * t * slope):
                break
            t /= 2
        w = w + t * step
        if not bool(torch.isfinite(w).all()):
            return None
    return None


class FairGrad(GramianAggregator):
    """d = Σ w_i g_i with w > 0 solving M w = w^{-1/α} (g_i·d = w_i^{-1/α}); α = 1 is Nash-MTL's condition,
    α → ∞ tends to max–min fairness. Default α = 1.0 (the official code's default).

    Output scale: the raw solution d = Σ w_i g_i: ‖d‖² = Σ w_i^{1−1/α}, so d scales as ‖g‖^{(1−α)/(1+α)}
    (unit-free for α = 1, where ‖d‖ = √K). K = 1: d = ‖g₁‖^{-2α/(α+1)} g₁ (for α = 1, g₁/‖g₁‖). The official
    training loop then multiplies d by K (``overwrite_grad``, "to match the sum loss") and clips the shared
    gradient's norm to ``max_norm = 1.0`` (``clip_grad_norm_`` in its ``backward``). To reproduce its runs,
    multiply by K and clip the same way; for α = 1 and K ≥ 2 (‖d‖ = √K > 1) the clip alone gives the same unit
    vector.

    Deviations: Newton's method in float64 to max_i|w_i^{1/α}(Mw)_i − 1| ≤ 1e-10, or to where it stalls below
    1e-6 on an ill-conditioned M (see :func:`fair_weights`), instead of SciPy ``least_squares`` from 𝟏/K (whose
    default tolerances and scale dependence leave it far from the root at small/large gradient scales). α must
    be > 0 (the official code divides by α). Rows with g_i = 0 leave the solve with weight 0 (their weight does
    not change d; the official solver pushes it towards +∞). When no positive solution exists, the official
    starting point w = 𝟏/K is returned; as for Nash-MTL, a solution with some g_i·d within the rounding of M
    counts as none.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = check_real(alpha, "FairGrad", "alpha", above=0.0)

    def _hyperparameters(self) -> dict[str, object]:
        return {"alpha": self.alpha}

    def _weights(self, M: Tensor, eps: float) -> Tensor:
        """w for the float64 Gram M, accurate to unit roundoff ``eps``."""
        K = M.shape[0]
        active = M.diagonal() > 0
        w = torch.zeros(K, dtype=torch.float64, device=M.device)
        if bool(active.any()):
            solution = fair_weights(M[active][:, active], self.alpha, eps)
            if solution is None:
                return torch.full((K,), 1.0 / K, dtype=torch.float64, device=M.device)
            w[active] = solution
        return w

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="FairGrad")
        G64 = G.double()
        return (self._weights(G64 @ G64.T, gram_eps(G.dtype)) @ G64).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 w."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="FairGrad")
        return self._weights(M.double(), gram_eps(M.dtype))
