"""Small solvers over the probability simplex Δ, shared by MGDA, CAGrad and IMGrad (reference backend).

Everything here works on K × K float64 tensors (K = number of tasks); speed is a non-goal.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Official MGDA-UB / LibMTL ``MinNormSolver`` settings.
FW_MAX_ITER = 250
FW_STOP_CRIT = 1e-5


def _line_min(vv: float, vt: float, tt: float) -> float:
    """γ ∈ [0, 1] minimising ‖(1−γ) v + γ t‖², given vv = ‖v‖², vt = v·t, tt = ‖t‖² (exact clip).

    The branches avoid dividing by ‖v − t‖² = 0 (both branches hold when v = t).
    """
    if vt >= vv:
        return 0.0
    if vt >= tt:
        return 1.0
    return (vv - vt) / (vv - 2.0 * vt + tt)


def _best_pair_start(M: Tensor) -> Tensor:
    """Min-norm point of the best pair of tasks (official ``MinNormSolver._min_norm_2d``)."""
    K = M.shape[0]
    m = M.tolist()
    best_cost, best = float("inf"), (0, 0, 0.0)
    for i in range(K):
        for j in range(i + 1, K):
            gamma = _line_min(m[i][i], m[i][j], m[j][j])
            cost = (1 - gamma) ** 2 * m[i][i] + 2 * gamma * (1 - gamma) * m[i][j] + gamma**2 * m[j][j]
            if cost < best_cost:
                best_cost, best = cost, (i, j, gamma)
    i, j, gamma = best
    w = torch.zeros(K, dtype=M.dtype, device=M.device)
    w[i], w[j] = 1.0 - gamma, gamma
    return w


def min_norm_weights(M: Tensor, max_iter: int = FW_MAX_ITER, stop_crit: float = FW_STOP_CRIT) -> Tensor:
    """w ∈ Δ minimising wᵀMw by Frank–Wolfe, as the official ``MinNormSolver.find_min_norm_element_FW``.

    Starts from the best pair's closed form; each step moves towards the vertex e_t with the smallest
    (Mw)_t by the exact line search γ = clip((vv − vt)/(vv − 2vt + tt), 0, 1); stops when the L1 change
    would be below ``stop_crit`` (keeping the current point, as the official code does) or after
    ``max_iter`` steps. Deviation: the official line search clips γ to [0.001, 0.999], which never lets
    the iterate settle on the optimum; we clip to [0, 1].
    """
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device)
    w = _best_pair_start(M)
    for _ in range(max_iter):
        Mw = M @ w
        t = int(torch.argmin(Mw))
        gamma = _line_min(float(w @ Mw), float(Mw[t]), float(M[t, t]))
        step = -gamma * w
        step[t] += gamma
        if float(step.abs().sum()) < stop_crit:
            break
        w = w + step
    return w


def argmin_linear_plus_norm(q: Tensor, M: Tensor, beta: float, *, squared: bool) -> Tensor:
    """w ∈ Δ minimising qᵀw + β √(wᵀMw) (or qᵀw + β wᵀMw when ``squared``), with β ≥ 0 and M PSD.

    Convex (a second-order-cone / quadratic programme), solved by the CLARABEL interior-point method
    through cvxpy (as torchjd does for CAGrad) to ~1e-8, after rescaling to unit-trace M and unit-size
    coefficients so the solver sees the same well-scaled problem at every gradient scale.
    When the objective is identically zero (M = 0 and q = 0) every w is optimal: returns 𝟏/K.
    """
    K = q.shape[0]
    uniform = torch.full((K,), 1.0 / K, dtype=torch.float64, device=q.device)
    trace = float(M.diagonal().sum())
    # √(wᵀMw) = √trace ‖Rᵀw‖ and wᵀMw = trace ‖Rᵀw‖² with R Rᵀ = M / trace.
    norm_coef = beta * (trace if squared else trace**0.5) if trace > 0 else 0.0
    scale = max(float(q.abs().max()), norm_coef)
    if scale == 0.0:
        return uniform
    if norm_coef == 0.0:
        # Linear objective: a vertex; uniform over ties keeps the result permutation-invariant.
        ties = (q == q.min()).to(torch.float64)
        return ties / ties.sum()
    # Imported here, not at module level: the fused classes subclass the reference ones, and
    # ``import flatmtl_fast`` must not load cvxpy (or its solvers).
    import cvxpy as cp

    eigenvalues, V = torch.linalg.eigh(M.double().cpu() / trace)
    R = (V * eigenvalues.clamp(min=0).sqrt()).numpy()  # clamp: round-off may leave tiny negative λ
    w = cp.Variable(K)
    norm = cp.sum_squares(R.T @ w) if squared else cp.norm(R.T @ w, 2)
    objective = (q.double().cpu().numpy() / scale) @ w + (norm_coef / scale) * norm
    cp.Problem(cp.Minimize(objective), [w >= 0, cp.sum(w) == 1]).solve(solver=cp.CLARABEL)
    if w.value is None:
        raise RuntimeError(f"the simplex solver failed on q={q.tolist()}, M={M.tolist()}, beta={beta}")
    # Interior-point output lies within ~1e-9 of Δ: snap it back exactly.
    solution = np.clip(w.value, 0.0, None)
    return torch.as_tensor(solution / solution.sum(), dtype=torch.float64, device=q.device)
