"""Problems over the probability simplex Δ: MGDA's min-norm point (Frank–Wolfe) and the
"linear + norm" problem of CAGrad / IMGrad. Float64 on M's device, fixed budgets, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from ._interior import minimize
from ._norm_cone import argmin_linear_plus_norm_cone

#: Official MGDA-UB / LibMTL ``MinNormSolver`` settings (the reference's defaults).
FW_MAX_ITER = 250
FW_STOP_CRIT = 1e-5
#: ‖g_w‖ at or below this fraction of the largest ‖g_i‖ counts as zero (as the reference CAGrad / IMGrad).
ZERO_GW_RTOL = 1e-6


def _line_min(vv: Tensor, vt: Tensor, tt: Tensor) -> Tensor:
    """γ ∈ [0, 1] minimising ‖(1−γ) v + γ t‖² (elementwise; the reference's branches as masks)."""
    denominator = vv - 2.0 * vt + tt
    interior = (vv - vt) / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(vt >= vv, torch.zeros_like(vv), torch.where(vt >= tt, torch.ones_like(vv), interior))


def min_norm_weights(M: Tensor, max_iter: int = FW_MAX_ITER, stop_crit: float = FW_STOP_CRIT) -> Tensor:
    """MGDA's w ∈ Δ minimising wᵀMw: the official Frank–Wolfe iteration, step for step.

    Same start (the best pair's closed form; ties to the first pair in (i, j) order), same vertex choice
    (first argmin of Mw), same exact line search and the same stop rule — as a mask that freezes the
    iterate once the L1 step falls below ``stop_crit`` — so the result equals the reference's at the same
    (max_iter, stop_crit), including its inexactness at the official budget.
    """
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device)
    d = M.diagonal()
    mii, mjj = d.unsqueeze(1).expand(K, K), d.unsqueeze(0).expand(K, K)
    gamma = _line_min(mii, M, mjj)
    cost = (1 - gamma) ** 2 * mii + 2 * gamma * (1 - gamma) * M + gamma**2 * mjj
    upper = torch.ones(K, K, dtype=torch.bool, device=M.device).triu(diagonal=1)
    best = torch.argmin(torch.where(upper, cost, torch.full_like(cost, torch.inf)).flatten())
    i, j = best // K, best % K
    g = gamma.flatten().gather(0, best.reshape(1))  # gather, not [best]: a tensor index reads it to the host
    w = torch.zeros(K, dtype=M.dtype, device=M.device)
    w = w.scatter(0, i.reshape(1), 1.0 - g).scatter(0, j.reshape(1), g)
    done = torch.zeros((), dtype=torch.bool, device=M.device)
    index = torch.arange(K, device=M.device)
    for _ in range(max_iter):
        Mw = M @ w
        e_t = (index == torch.argmin(Mw)).to(M.dtype)
        gamma = _line_min(w @ Mw, e_t @ Mw, e_t @ d)  # exact picks of (Mw)_t and M_tt
        step = -gamma * w + gamma * e_t
        done = done | (step.abs().sum() < stop_crit)
        w = torch.where(done, w, w + step)
    return w


def argmin_linear_plus_norm(q: Tensor, M: Tensor, beta: Tensor, *, squared: bool) -> Tensor:
    """w ∈ Δ minimising qᵀw + β √(wᵀMw) (or qᵀw + β wᵀMw when ``squared``), β ≥ 0 a 0-d tensor, M PSD.

    The reference's normalisation (unit-trace M, coefficients divided by the largest one) and its special
    cases as masks: an identically zero objective gives 𝟏/K, a linear one the uniform weights over the
    exact ties of q's minimum. The convex problem itself is solved by an interior-point method with an exact
    polish on the support, to ~1e-12 on well-conditioned problems: for the norm, the second-order cone
    method of ``_norm_cone`` (which lands on the kink g_w = 0 where the optimum lies there); for the square,
    the quadratic programme by ``_interior``.
    """
    K = q.shape[0]
    trace = M.diagonal().sum()
    positive_trace = trace > 0
    safe_trace = torch.where(positive_trace, trace, torch.ones_like(trace))
    norm_coef = torch.where(positive_trace, beta * (safe_trace if squared else safe_trace.sqrt()), 0.0)
    scale = torch.maximum(q.abs().max(), norm_coef)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q_n, b_n, M_n = q / safe_scale, norm_coef / safe_scale, M / safe_trace

    uniform = torch.full((1, K), 1.0 / K, dtype=q.dtype, device=q.device)
    if squared:

        def oracle(x: Tensor) -> tuple[Tensor, Tensor]:
            return q_n + 2.0 * b_n * (x @ M_n), (2.0 * b_n * M_n).unsqueeze(0)  # M_n is symmetric

        w = minimize(oracle, torch.zeros_like(uniform), uniform, simplex=True)[0]
    else:
        w = argmin_linear_plus_norm_cone(q_n, b_n, M_n)
    ties = (q == q.min()).to(q.dtype)
    w = torch.where(norm_coef == 0, ties / ties.sum(), w)
    return torch.where(scale == 0, uniform[0], w)


def combination_norm(M: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """‖g_w‖ = √(wᵀMw) for g_w = Σ w_i g_i, and whether it counts as zero: ‖g_w‖ ≤ ZERO_GW_RTOL · max‖g_i‖
    (the reference's rule for CAGrad's / IMGrad's g_w and IMGrad's g_m)."""
    norm = (w @ M @ w).clamp_min(0.0).sqrt()
    return norm, norm <= ZERO_GW_RTOL * M.diagonal().max().clamp_min(0.0).sqrt()


def conflict_averse_weights(M: Tensor, w: Tensor, radius: Tensor, factor: float) -> Tensor:
    """factor · (1/K + λ w) for the w of CAGrad / IMGrad, where λ = radius / ‖g_w‖, or λ = 0 when g_w counts
    as zero (see :func:`combination_norm`), as the reference."""
    K = M.shape[0]
    gw_norm, zero = combination_norm(M, w)
    lam_w = torch.where(zero, torch.zeros_like(w), radius / torch.where(zero, torch.ones_like(gw_norm), gw_norm) * w)
    return factor * (1.0 / K + lam_w)
