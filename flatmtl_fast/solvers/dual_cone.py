"""The dual-cone projection QP of UPGrad and DualProj: v = argmin_{v ≥ u} vᵀ M̃ v, batched over u.

Conventions of the reference (``flatmtl_fast.reference._dual_cone``, torchjd's ``QuadprogProjector``):
M̃ = M / tr(M) + reg_eps · I (M counted as 0 when tr(M) ≤ norm_eps). M̃ is positive definite, so the QP
is strictly convex and its solution unique; the interior-point method of ``_interior`` with its exact
active-set polish returns it to rounding, on M's device, without host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Re-exported: the constructor check is the reference's own (its module imports quadprog only when solving).
from ..reference._dual_cone import check_projection_parameters as check_projection_parameters
from ._interior import minimize


def preference_vector(pref_vector: Tensor | None, K: int, device: torch.device, owner: str) -> Tensor:
    """The preference vector p (float64 on ``device``): the given one, checked against K, or 𝟏/K."""
    if pref_vector is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
    if pref_vector.shape != (K,):
        raise ValueError(f"{owner}: pref_vector must have shape ({K},) (one per task), got {tuple(pref_vector.shape)}")
    return pref_vector.detach().to(device=device, dtype=torch.float64)


def project_weights(M: Tensor, U: Tensor, *, norm_eps: float, reg_eps: float) -> Tensor:
    """For each row u of ``U`` (B × K), v = argmin_{v ≥ u} vᵀ M̃ v; returns the B × K float64 v's."""
    K = M.shape[0]
    trace = M.diagonal().sum()
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    normalised = torch.where(trace > norm_eps, M / torch.where(trace > 0, trace, torch.ones_like(trace)), 0.0)
    P = normalised + reg_eps * eye
    # v is positively homogeneous in u: solve for u / max|u| (an O(1) problem), scale back.
    row_scale = U.abs().amax(dim=1, keepdim=True)
    safe_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    lower = U / safe_scale
    P_batch = (2.0 * P).expand(U.shape[0], K, K)

    def oracle(x: Tensor) -> tuple[Tensor, Tensor]:
        return 2.0 * x @ P, P_batch

    v = minimize(oracle, lower, lower.clamp_min(0.0) + 1.0, simplex=False)
    return torch.where(row_scale > 0, v * row_scale, 0.0)
