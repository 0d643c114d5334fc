"""Problems over the probability simplex Δ: MGDA's min-norm point (Frank–Wolfe) and the
"linear + norm" problem of CAGrad / IMGrad. Float64 on M's device, fixed budgets, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from ._interior import minimize

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
    g = gamma.flatten()[best]
    w = torch.zeros(K, dtype=M.dtype, device=M.device)
    w = w.scatter(0, i.reshape(1), (1.0 - g).reshape(1)).scatter(0, j.reshape(1), g.reshape(1))
    done = torch.zeros((), dtype=torch.bool, device=M.device)
    for _ in range(max_iter):
        Mw = M @ w
        t = torch.argmin(Mw)
        gamma = _line_min(w @ Mw, Mw[t], d[t])
        step = -gamma * w + gamma * torch.nn.functional.one_hot(t, K).to(M.dtype)
        done = done | (step.abs().sum() < stop_crit)
        w = torch.where(done, w, w + step)
    return w


def argmin_linear_plus_norm(q: Tensor, M: Tensor, beta: Tensor, *, squared: bool) -> Tensor:
    """w ∈ Δ minimising qᵀw + β √(wᵀMw) (or qᵀw + β wᵀMw when ``squared``), β ≥ 0 a 0-d tensor, M PSD.

    The reference's normalisation (unit-trace M, coefficients divided by the largest one) and its special
    cases as masks: an identically zero objective gives 𝟏/K, a linear one the uniform weights over the
    exact ties of q's minimum. The convex problem itself is solved by the interior-point method of
    ``_interior`` (exact active-set polish), to ~1e-12 on well-conditioned problems.
    """
    K = q.shape[0]
    trace = M.diagonal().sum()
    positive_trace = trace > 0
    safe_trace = torch.where(positive_trace, trace, torch.ones_like(trace))
    norm_coef = torch.where(positive_trace, beta * (safe_trace if squared else safe_trace.sqrt()), 0.0)
    scale = torch.maximum(q.abs().max(), norm_coef)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q_n, b_n, M_n = q / safe_scale, norm_coef / safe_scale, M / safe_trace

    def oracle(x: Tensor) -> tuple[Tensor, Tensor]:
        Mx = x @ M_n  # (1, K); M_n is symmetric
        if squared:
            return q_n + 2.0 * b_n * Mx, (2.0 * b_n * M_n).unsqueeze(0)
        # The norm is smooth away from g_w = 0; the floor only keeps a degenerate problem finite
        # (there the caller drops the g_w term anyway, see ZERO_GW_RTOL).
        norm = (Mx * x).sum(dim=1, keepdim=True).clamp_min(1e-30).sqrt()
        u = Mx / norm
        return q_n + b_n * u, (b_n * (M_n - u.mT @ u) / norm).unsqueeze(0)

    uniform = torch.full((1, K), 1.0 / K, dtype=q.dtype, device=q.device)
    w = minimize(oracle, torch.zeros_like(uniform), uniform, simplex=True)[0]
    ties = (q == q.min()).to(q.dtype)
    w = torch.where(norm_coef == 0, ties / ties.sum(), w)
    return torch.where(scale == 0, uniform[0], w)


def conflict_averse_weights(
    M: Tensor, w: Tensor, q: Tensor, beta: Tensor, radius: Tensor, factor: float, *, squared: bool
) -> Tensor:
    """factor · (1/K + λ w) for w = argmin_{w∈Δ} qᵀw + β ψ(g_w) with q ∝ M𝟏 (CAGrad, IMGrad), where
    λ = radius / ‖g_w‖, or λ = 0 when g_w counts as zero (‖g_w‖ ≤ ZERO_GW_RTOL · max‖g_i‖), as the reference.

    With q ∝ M𝟏 the objective is 0 wherever g_w = 0; so when 0 lies in the hull (the min-norm point is
    zero) and no point with a negative objective was found, the optimum is at g_w = 0 — a kink of ψ = ‖·‖
    that the interior-point method only approaches slowly — and λ = 0, whatever the iterate's ‖g_w‖.
    """
    K = M.shape[0]
    largest = M.diagonal().max().clamp_min(0.0).sqrt()
    zero = torch.zeros_like(q)
    w0 = argmin_linear_plus_norm(zero, M, torch.ones_like(beta), squared=True)
    zero_in_hull = (w0 @ M @ w0).clamp_min(0.0).sqrt() <= ZERO_GW_RTOL * largest
    gw_sq = (w @ M @ w).clamp_min(0.0)
    gw_norm = gw_sq.sqrt()
    value = q @ w + beta * (gw_sq if squared else gw_norm)
    magnitude = q.abs().max() + beta * (M.diagonal().max() if squared else largest)
    optimum_at_zero = zero_in_hull & (value >= -1e-9 * magnitude)
    use = (gw_norm > ZERO_GW_RTOL * largest) & ~optimum_at_zero
    lam_w = torch.where(use, radius / torch.where(use, gw_norm, torch.ones_like(gw_norm)) * w, torch.zeros_like(w))
    return factor * (1.0 / K + lam_w)
