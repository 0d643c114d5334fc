"""Nash-MTL's bargaining solution M α = 1/α by damped Newton, fixed budget, on the device."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.nash_mtl import NASH_TOL, STALL_TOL


def newton_converged(residual: Tensor, last_residual: Tensor) -> Tensor:
    """The reference's ``newton_converged`` on device scalars: below NASH_TOL, or stalled below STALL_TOL."""
    return (residual <= NASH_TOL) | ((last_residual <= residual) & (residual <= STALL_TOL))


def above_rounding(w: Tensor, Mn: Tensor, active: Tensor, eps: float) -> Tensor:
    """The reference's ``above_rounding`` for w on the active rows of the decoupled ``Mn`` (inactive rows pass)."""
    w_active = torch.where(active, w, 0.0)
    root = torch.where(active, Mn.diagonal(), 0.0).sqrt()
    return ((Mn @ w_active > eps * root * (w_active @ root)) | ~active).all()


def _decoupled(M: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """(M restricted to the active rows / ‖·‖_F with identity rows for the inactive ones, ‖·‖_F).

    Inactive rows (zero gradients) then solve α_i = 1/α_i → 1 independently, which keeps every shape
    static: the reference's ``M[active][:, active]`` would need a host sync for its size.
    """
    both = active.unsqueeze(1) & active.unsqueeze(0)
    M_active = torch.where(both, M, 0.0)
    scale = torch.linalg.matrix_norm(M_active)
    safe = torch.where(scale > 0, scale, 1.0)
    return M_active / safe + torch.diag((~active).to(M.dtype)), safe


def nash_weights(M: Tensor, previous: Tensor, max_iter: int, eps: float) -> Tensor:
    """The new α: the solution on the rows with M_ii > 0 where found within ``max_iter`` Newton steps and above
    M's rounding (unit roundoff ``eps``), else (and on inactive rows) ``previous``. Step for step the
    reference's ``nash_weights``: the better of two ray-rescaled starts, convergence checked before each step,
    step 1/(1 + λ) while the Newton decrement λ > 1/4; "return" and "give up" become masks that freeze α.
    """
    active = M.diagonal() > 0
    Mn, scale = _decoupled(M, active)
    n_active = active.sum().to(M.dtype)

    def on_ray(a: Tensor) -> Tensor:
        a_active = torch.where(active, a, 0.0)
        quadratic = a_active @ Mn @ a_active
        positive = quadratic > 0
        scaled = torch.where(positive, a * (n_active / torch.where(positive, quadratic, 1.0)).sqrt(), a)
        return torch.where(active, scaled, 1.0)

    def objective(a: Tensor) -> Tensor:
        a_active = torch.where(active, a, 0.0)
        return 0.5 * a_active @ Mn @ a_active - torch.where(active, a.log(), 0.0).sum()

    warm = on_ray(torch.where(active, previous * scale.sqrt(), 1.0))
    diagonal = on_ray(Mn.diagonal().rsqrt())
    alpha = torch.where(objective(diagonal) < objective(warm), diagonal, warm)
    done = torch.zeros((), dtype=torch.bool, device=M.device)
    failed = torch.zeros((), dtype=torch.bool, device=M.device)
    last_residual = torch.full((), torch.inf, dtype=M.dtype, device=M.device)
    for _ in range(max_iter + 1):
        Ma = Mn @ alpha
        residual = (alpha * Ma - 1.0).abs().max()
        done = done | newton_converged(residual, last_residual)
        last_residual = residual
        gradient = Ma - 1.0 / alpha
        step, info = torch.linalg.solve_ex(Mn + torch.diag(alpha**-2), -gradient)
        decrement = (-(gradient @ step)).clamp_min(0.0).sqrt()
        new = alpha + torch.where(decrement > 0.25, step / (1.0 + decrement), step)
        failed = failed | (~done & ((info != 0) | ~torch.isfinite(new).all()))
        alpha = torch.where(done | failed, alpha, new)
    found = done & ~failed & above_rounding(alpha, Mn, active, eps)
    return torch.where(active & found, alpha / scale.sqrt(), previous)
