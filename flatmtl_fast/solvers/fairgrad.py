"""FairGrad's α-fair weights M w = w^{-1/α} by Newton with a backtracking line search, fixed budget."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.fairgrad import MAX_NEWTON_ITER, armijo_floor
from .nash import _decoupled, above_rounding, newton_converged


#: The reference halves t from 1 while t > 1e-12: it tries 2^0 … 2^-39 and otherwise takes 2^-40.
def fair_weights(M: Tensor, alpha: float, eps: float) -> Tensor:
    """w on the active rows (M_ii > 0), 0 on the others; 𝟏/K if no solution is found or it is within the
    rounding of M (unit roundoff ``eps``), as the reference.

    Step for step the reference's ``fair_weights``: the better of two ray-rescaled starts, convergence
    checked before each step, Newton with Armijo backtracking — all 40 trial step sizes are evaluated at
    once and the first acceptable one is taken, which is the sequential loop's choice without its branches.
    """
    K = M.shape[0]
    active = M.diagonal() > 0
    Mn, scale = _decoupled(M, active)
    n_active = active.sum().to(M.dtype)
    power = 1.0 - 1.0 / alpha
    step_sizes = 2.0 ** -torch.arange(41, dtype=torch.float64, device=M.device)  # made there: a copy would wait

    def objective(w: Tensor) -> Tensor:
        """f(w) = ½ wᵀMw − Σ u(w_i) over the active rows, for w of shape (..., K)."""
        w_active = torch.where(active, w, 0.0)
        quadratic = 0.5 * ((w_active @ Mn) * w_active).sum(dim=-1)
        terms = w.log() if alpha == 1.0 else w**power / power
        return quadratic - torch.where(active, terms, 0.0).sum(dim=-1)

    def on_ray(w: Tensor) -> Tensor:
        w_active = torch.where(active, w, 0.0)
        quadratic = w_active @ Mn @ w_active
        positive = quadratic > 0
        t = (torch.where(active, w**power, 0.0).sum() / torch.where(positive, quadratic, 1.0)) ** (alpha / (alpha + 1))
        return torch.where(active, torch.where(positive, w * t, w), 1.0)

    uniform = on_ray(torch.where(active, 1.0 / n_active, 1.0))
    diagonal = on_ray(Mn.diagonal() ** (-alpha / (alpha + 1)))
    w = torch.where(objective(diagonal) < objective(uniform), diagonal, uniform)
    done = torch.zeros((), dtype=torch.bool, device=M.device)
    failed = torch.zeros((), dtype=torch.bool, device=M.device)
    last_residual = torch.full((), torch.inf, dtype=M.dtype, device=M.device)
    for _ in range(MAX_NEWTON_ITER + 1):
        Mw = Mn @ w
        residual = (w ** (1 / alpha) * Mw - 1.0).abs().max()
        done = done | newton_converged(residual, last_residual)
        last_residual = residual
        gradient = Mw - w ** (-1 / alpha)
        step, info = torch.linalg.solve_ex(Mn + torch.diag(w ** (-1 / alpha - 1) / alpha), -gradient)
        f0, slope = objective(w), gradient @ step
        unmeasurable = armijo_floor(torch.where(active, w, 0.0) @ Mn.diagonal().sqrt(), n_active)
        trials = w + step_sizes[:40, None] * step
        acceptable = (trials > 0).all(dim=1) & (
            (-slope <= unmeasurable) | (objective(trials) <= f0 + 1e-4 * step_sizes[:40] * slope)
        )
        # First acceptable trial, else the last halving 2^-40 (appended as an always-true sentinel).
        first = torch.argmax(torch.cat([acceptable, acceptable.new_ones(1)]).to(torch.float32))
        new = w + step_sizes.index_select(0, first.reshape(1)) * step  # not step_sizes[first]: a host read
        failed = failed | (~done & ((info != 0) | ~torch.isfinite(new).all()))
        w = torch.where(done | failed, w, new)
    solution = torch.where(active, w * scale ** (-alpha / (alpha + 1)), 0.0)
    found = done & ~failed & above_rounding(w, Mn, active, eps)
    return torch.where(found, solution, torch.full((K,), 1.0 / K, dtype=M.dtype, device=M.device))
