"""A batched primal–dual interior-point method for small smooth convex problems over a box's lower
face — ``min φ(x) s.t. x ≥ lower`` — optionally on the simplex slice ``𝟏ᵀx = 1``, with a fixed
iteration budget and convergence masks (no host synchronisation), followed by an exact active-set polish.

Used by the dual-cone QPs of UPGrad / DualProj and the squared simplex problem of IMGrad (paper); the
norm problem of CAGrad / IMGrad has its own cone method (``_norm_cone``), which shares the pieces below.
Callers normalise their problem so that φ, its gradient and the bounds are O(1); the tolerances below are
therefore absolute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: ``oracle(x) -> (gradient, Hessian)`` of φ for a batch x of shape (B, K): shapes (B, K) and (B, K, K).
Oracle = Callable[[Tensor], tuple[Tensor, Tensor]]

#: Mehrotra predictor–corrector identifies the active set within ~10–15 steps here (measured up to K = 64); margin.
IPM_ITERATIONS = 25
#: Newton steps of the polish (exact after one for a quadratic φ).
POLISH_STEPS = 3
#: Stop (freeze) once the complementarity gap and the stationarity residual are below these.
GAP_TOL = 1e-15
STATIONARITY_TOL = 1e-13
#: Sign tolerance of the polished solution's feasibility and multipliers (problems are O(1)).
POLISH_TOL = 1e-9
#: The polish is a local correction: a longer move means a wrongly guessed active set.
POLISH_MAX_MOVE = 1e-3
_FRACTION_TO_BOUNDARY = 0.99


def _factor_kkt(
    H: Tensor, border: Tensor | None, row: Tensor | float = 1.0
) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]:
    """Factor [[H, b], [aᵀ, 0]] (b = ``border``, a = ``row``, 𝟏 by default; just H without a border) once;
    return a solver ``(rhs, rhs_border) -> (dx, dν)``. A singular system yields non-finite values, which
    callers reject.

    On the CPU the batch is factored matrix by matrix: torch's batched LAPACK path runs its batch in a
    parallel region whose threading overhead (milliseconds) dwarfs these K × K factorisations."""
    B, K = H.shape[:2]
    if border is not None:
        system = H.new_zeros(B, K + 1, K + 1)
        system[:, :K, :K] = H
        system[:, :K, K] = border
        system[:, K, :K] = row
        H = system
    if H.is_cuda:
        LU, pivots, _ = torch.linalg.lu_factor_ex(H)
    else:
        factors = [torch.linalg.lu_factor_ex(matrix) for matrix in H]
        LU, pivots = torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors])

    def solve(rhs: Tensor, rhs_border: Tensor | None) -> tuple[Tensor, Tensor]:
        if rhs_border is not None:
            rhs = torch.cat([rhs, rhs_border.unsqueeze(1)], dim=1)
        if H.is_cuda:
            solution = torch.linalg.lu_solve(LU, pivots, rhs.unsqueeze(-1)).squeeze(-1)
        else:
            solution = torch.stack(
                [torch.linalg.lu_solve(LU[b], pivots[b], rhs[b].unsqueeze(-1)).squeeze(-1) for b in range(B)]
            )
        if border is None:
            return solution, rhs.new_zeros(B)
        return solution[:, :K], solution[:, K]

    return solve


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest t ≤ 1 with v + t dv ≥ 0 (v > 0), per batch row."""
    ratios = torch.where(dv < 0, -v / torch.where(dv < 0, dv, -torch.ones_like(dv)), torch.full_like(v, torch.inf))
    return ratios.amin(dim=1).clamp(max=1.0)


def minimize(oracle: Oracle, lower: Tensor, x0: Tensor, *, simplex: bool) -> Tensor:
    """argmin φ(x) subject to x ≥ ``lower`` (and 𝟏ᵀx = 1 when ``simplex``), batched over rows (B, K).

    ``x0`` must be strictly feasible. Mehrotra predictor–corrector for ``IPM_ITERATIONS`` steps (rows that
    have converged are frozen), then the active set {i : slack < multiplier} is fixed and Newton's method
    on the remaining equality-constrained problem makes the solution exact to rounding; the polish is
    kept only where it is feasible, its multipliers have the right sign and it moved little.
    """
    B = lower.shape[0]
    x = x0.clone()
    z = torch.ones_like(x)
    nu = x.new_zeros(B)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    border = torch.ones_like(x) if simplex else None

    def primal_residual(x: Tensor) -> Tensor | None:
        return 1.0 - x.sum(dim=1) if simplex else None

    for _ in range(IPM_ITERATIONS):
        g, H = oracle(x)
        s = x - lower
        mu = (s * z).mean(dim=1)
        stationarity = g - z + (nu.unsqueeze(1) if simplex else 0.0)
        done = done | ((mu <= GAP_TOL) & (stationarity.abs().amax(dim=1) <= STATIONARITY_TOL))
        H_aug = H + torch.diag_embed(z / s)
        base = -(g + (nu.unsqueeze(1) if simplex else 0.0))
        # Predictor (affine scaling), then the centring + second-order corrector.
        solve = _factor_kkt(H_aug, border)
        dx_a, _ = solve(base, primal_residual(x))
        dz_a = -z - z * dx_a / s
        t_a = torch.minimum(_max_step(s, dx_a), _max_step(z, dz_a)).unsqueeze(1)
        mu_a = ((s + t_a * dx_a) * (z + t_a * dz_a)).mean(dim=1)
        sigma = (mu_a / mu).clamp(0.0, 1.0).pow(3).unsqueeze(1)
        centring = sigma * mu.unsqueeze(1) - dx_a * dz_a
        dx, dnu = solve(base + centring / s, primal_residual(x))
        dz = (centring - s * z - z * dx) / s
        t = (_FRACTION_TO_BOUNDARY * torch.minimum(_max_step(s, dx), _max_step(z, dz))).unsqueeze(1)
        x_new, z_new, nu_new = x + t * dx, z + t * dz, nu + t.squeeze(1) * dnu
        keep = done | ~(torch.isfinite(x_new).all(dim=1) & torch.isfinite(z_new).all(dim=1) & torch.isfinite(nu_new))
        x = torch.where(keep.unsqueeze(1), x, x_new)
        z = torch.where(keep.unsqueeze(1), z, z_new)
        nu = torch.where(keep, nu, nu_new)

    return _polish(oracle, lower, x, z, simplex)


def _polish(oracle: Oracle, lower: Tensor, x: Tensor, z: Tensor, simplex: bool) -> Tensor:
    """Newton on the KKT system with the active set {slack < multiplier} held at the bound."""
    B, K = lower.shape
    active = (x - lower) < z
    eye = torch.eye(K, dtype=x.dtype, device=x.device).expand(B, K, K)
    border = (~active).to(x.dtype) if simplex else None
    xp = x
    nu = x.new_zeros(B)
    for _ in range(POLISH_STEPS):
        g, H = oracle(xp)
        # Free rows: ∇φ(xp + dx) + ν𝟏 = 0 linearised (ν solved for directly); active rows: land on the bound.
        system = torch.where(active.unsqueeze(2), eye, H)
        rhs = torch.where(active, lower - xp, -g)
        dx, nu = _factor_kkt(system, border)(rhs, 1.0 - xp.sum(dim=1) if simplex else None)
        xp = xp + dx
    g, _ = oracle(xp)
    multipliers = g + (nu.unsqueeze(1) if simplex else 0.0)
    ok = (
        torch.isfinite(xp).all(dim=1)
        & torch.isfinite(nu)
        & torch.where(active, multipliers >= -POLISH_TOL, xp >= lower - POLISH_TOL).all(dim=1)
        & ((xp - x).abs().amax(dim=1) <= POLISH_MAX_MOVE)
    )
    # Snap the rounding-level infeasibility away (the reference snaps its interior-point output likewise).
    x = torch.maximum(torch.where(ok.unsqueeze(1), xp, x), lower)
    return x / x.sum(dim=1, keepdim=True) if simplex else x
