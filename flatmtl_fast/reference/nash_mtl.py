"""Nash-MTL: the Nash bargaining solution among the task gradients.

Source: Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022), official code GitHub
``AvivNavon/nash-mtl`` (``methods/weight_methods.py``: ``NashMTL``), adapted by torchjd's ``NashMTL``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator, check_state_step, check_state_tensor
from ..aggregators.checks import check_count, check_gramian, check_losses, check_matrix, check_real

#: Converged when max_i |α_i (Mα)_i − 1| is below this (the official test is ‖Mα − 1/α‖ < 1e-3).
NASH_TOL = 1e-10
#: Or when Newton no longer lowers a residual already below this: on an ill-conditioned M (nearly opposite
#: gradients) α_i (Mα)_i cannot be evaluated better than about cond(M)·eps, so the residual stalls above
#: NASH_TOL (~1e-8 at cond 5e8) at a solution as good as rounding allows. Shared with FairGrad.
STALL_TOL = 1e-6


def newton_converged(residual: float, last_residual: float) -> bool:
    """Whether a Newton iteration with this residual (``last_residual`` before its last step, ∞ before the
    first) has converged: below NASH_TOL, or stalled on its rounding floor below STALL_TOL."""
    return residual <= NASH_TOL or last_residual <= residual <= STALL_TOL


def gram_eps(dtype: torch.dtype) -> float:
    """The unit roundoff of a Gram computed from (or given in) ``dtype``: float64's for float64, else float32's
    (the fused kernels accumulate 16- and 32-bit gradients in float32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def above_rounding(M: Tensor, w: Tensor, Mw: Tensor, eps: float) -> Tensor:
    """Whether every g_i·d = (Mw)_i of a solution w > 0 (each positive at a solution) exceeds its rounding from
    M, eps·Σ_j |M_ij| w_j ≤ eps·√M_ii·Σ_j w_j √M_jj (Cauchy–Schwarz), as a 0-dim bool tensor. If not, M does not
    resolve that task's equation: a nonnegative combination of the gradients may vanish, and then there is no
    solution — what Newton found lives in M's rounding (e.g. a pair of float32 gradients opposite up to their
    rounding, whose float32 Gram is positive definite only by its rounding: α ~ 5e3 on the pair). Per task: a
    test on ‖d‖² alone is diluted by the other tasks (such a pair passed it among 16 or more tasks)."""
    root = M.diagonal().clamp_min(0.0).sqrt()
    return (Mw > eps * root * (w @ root)).all()


def nash_weights(M: Tensor, start: Tensor, max_iter: int, eps: float) -> Tensor | None:
    """The α > 0 with M α = 1/α (elementwise) for a float64 PSD M with a positive diagonal, or None.

    Mα = 1/α is the optimality condition of the strictly convex, self-concordant
    f(α) = ½ αᵀMα − Σ log α_i, minimised by damped Newton (Nesterov's step 1/(1 + λ) while the Newton
    decrement λ > 1/4, full steps after): every step stays in α > 0 and the method converges globally and
    then quadratically. Solved on M/‖M‖_F (α scales as ‖M‖_F^{-1/2}) for conditioning.
    None when there is no solution within ``max_iter`` steps: when some nonnegative combination of the
    gradients vanishes (e.g. opposite rows) f is unbounded below and α_i(Mα)_i ≥ 1 is infeasible. None too
    when some g_i·d of the solution is not above its rounding from M (unit roundoff ``eps``; ``above_rounding``).
    """
    K = M.shape[0]
    scale = float(torch.linalg.matrix_norm(M))
    M = M / scale
    # Two starts, each rescaled along its ray to the best multiple (t² αᵀMα = K): the warm start and
    # the exact solution for diagonal M (exact for K = 2); keep the one with the lower f.
    candidates = [start * scale**0.5, M.diagonal().rsqrt()]
    candidates = [a * (K / float(a @ M @ a)) ** 0.5 if float(a @ M @ a) > 0 else a for a in candidates]
    alpha = min(candidates, key=lambda a: float(0.5 * a @ M @ a - a.log().sum()))
    last_residual = math.inf
    for _ in range(max_iter + 1):
        Ma = M @ alpha
        residual = float((alpha * Ma - 1.0).abs().max())
        if newton_converged(residual, last_residual):
            return alpha / scale**0.5 if bool(above_rounding(M, alpha, Ma, eps)) else None
        last_residual = residual
        gradient = Ma - 1.0 / alpha
        try:
            step = -torch.linalg.solve(M + torch.diag(alpha**-2), gradient)
        except torch.linalg.LinAlgError:  # α has run off to infinity along a null direction of M
            return None
        decrement = max(float(-(gradient @ step)), 0.0) ** 0.5
        alpha = alpha + (step / (1.0 + decrement) if decrement > 0.25 else step)
        if not bool(torch.isfinite(alpha).all()):
            return None
    return None


class NashMTL(GramianAggregator):
    """d = Σ α_i g_i with α > 0 solving M α = 1/α (each task's directional derivative g_i·d = 1/α_i),
    then ‖d‖ clipped to ``max_norm`` (‖d‖² = αᵀMα, no extra pass); ``max_norm = 0`` disables the clip.

    Output scale: the official code normalises M by its Frobenius norm f for ECOS but puts f back in its
    constraint α_i f (M/f α)_i ≥ 1, so its fixed point is the raw Mα = 1/α, whence ‖d‖ = √K before the clip:
    with the default ``max_norm=1`` the result has norm 1 (K = 1: d = g₁/‖g₁‖). We return that fixed point.
    State (``_state_attributes``): the previous α (warm start; ``None`` → 𝟏 as officially) and the step count.
    ``update_weights_every = n`` solves on steps 0, n, 2n, ... and reuses the previous α in between.
    ``weights()`` advances the same state as ``__call__``.

    Deviations: the solver is damped Newton in float64 to max_i|α_i(Mα)_i − 1| ≤ 1e-10, or to where it
    stalls below 1e-6 on an ill-conditioned M (see :func:`nash_weights`), instead of up to 20 convex–concave
    rounds of cvxpy/ECOS stopped at ‖Mα − 1/α‖ < 1e-3; ``optim_niter`` caps Newton steps, hence a larger
    default (100; typical use takes < 15). Rows with g_i = 0 (no bargaining power: g_i·d = 0 ≠ 1/α_i) leave
    the solve and keep their previous α_i. When no solution exists (the official ECOS call fails and keeps the
    previous α) we also keep the previous α; a solution with some g_i·d within the rounding of M (float32's for
    16- and 32-bit gradients or M, float64's for float64) counts as none: M cannot exclude a vanishing
    combination of the gradients there. The clip is exact (torch's ``clip_grad_norm_`` divides by ‖d‖ + 1e-6).
    """

    _state_attributes = ("_alpha", "_step")

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 100) -> None:
        self.max_norm = check_real(max_norm, "NashMTL", "max_norm", minimum=0.0)  # 0 disables the clip
        self.update_weights_every = check_count(update_weights_every, "NashMTL", "update_weights_every", minimum=1)
        self.optim_niter = check_count(optim_niter, "NashMTL", "optim_niter", minimum=1)
        self._alpha: Tensor | None = None
        self._step: int | None = None

    def _check_state(self, state: dict[str, object]) -> None:
        super()._check_state(state)
        check_state_tensor(state["_alpha"], "NashMTL", "_alpha", 1, positive=True)
        check_state_step(state["_step"], "NashMTL")

    def _hyperparameters(self) -> dict[str, object]:
        return {
            "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
            "optim_niter": self.optim_niter,
        }

    def _next_alpha(self, M: Tensor, eps: float) -> Tensor:
        """α for the float64 Gram M, accurate to unit roundoff ``eps`` (before the clip), advancing the state."""
        K = M.shape[0]
        # A loaded state follows M (as the fused class does): float32 from a cast checkpoint, another device.
        previous = torch.ones(K, dtype=torch.float64, device=M.device) if self._alpha is None else self._alpha
        previous = previous.to(device=M.device, dtype=torch.float64)
        if previous.shape != (K,):
            raise ValueError(f"NashMTL was used with {previous.shape[0]} tasks, now {K}: call reset() first")
        step = self._step or 0
        alpha = previous.clone()
        active = M.diagonal() > 0
        if step % self.update_weights_every == 0 and bool(active.any()):
            sub = nash_weights(M[active][:, active], previous[active], self.optim_niter, eps)
            if sub is not None:
                alpha[active] = sub
        self._alpha, self._step = alpha, step + 1
        return alpha

    def _clip_factor(self, squared_norm: float) -> float:
        norm = max(squared_norm, 0.0) ** 0.5
        return self.max_norm / norm if 0 < self.max_norm < norm else 1.0

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="NashMTL")
        G64 = G.double()
        d = self._next_alpha(G64 @ G64.T, gram_eps(G.dtype)) @ G64
        return (d * self._clip_factor(float(d @ d))).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 α, clip included (advances the state like a call)."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="NashMTL")
        M64 = M.double()
        alpha = self._next_alpha(M64, gram_eps(M.dtype))
        return alpha * self._clip_factor(float(alpha @ M64 @ alpha))
