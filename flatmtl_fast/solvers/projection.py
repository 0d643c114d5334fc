"""PCGrad and GradVac in Gram form: the coefficient matrix C (g_i' = Σ_k C_ik g_k), all K rows at once.

Each row i runs its own sequence of corrections against the *original* g_j, independently of the other
rows, so step p of every row is done together: K − 1 batched steps instead of K(K − 1) scalar ones.
Orders follow the reference contract (``flatmtl_fast.reference._projection_loop``): one
``torch.rand((K, K), float64)`` draw per call; row i visits j ≠ i by ascending keys[i, j], stable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._random import draw_on

#: ``correction(rows, j, dot, sq_norm_i, sq_norm_j) -> c`` for all rows at once (tensors of shape (K,)),
#: dot = g_i'·g_j, sq_norm_i = ‖g_i'‖², sq_norm_j = ‖g_j‖²; then g_i' ← g_i' + c_i g_j.
BatchedCorrection = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def draw_keys(K: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The reference's single draw that fixes the visiting orders, on ``device`` (drawn on the generator's)."""
    return draw_on(device, torch.rand, (K, K), generator=generator, dtype=torch.float64)


def visiting_orders(keys: Tensor) -> Tensor:
    """(K, K − 1) int64: row i lists j ≠ i by ascending keys[i, j] (stable). Putting i last with a key
    above every draw (draws are < 1) and dropping the last column equals sorting and then removing i."""
    K = keys.shape[0]
    eye = torch.eye(K, dtype=torch.bool, device=keys.device)
    return torch.argsort(torch.where(eye, 2.0, keys), dim=1, stable=True)[:, : K - 1]


def corrected_weights(M: Tensor, orders: Tensor, correction: BatchedCorrection) -> Tensor:
    """w = column sums of C, where row i of C starts at e_i and takes its corrections in ``orders[i]``."""
    K = M.shape[0]
    C = torch.eye(K, dtype=M.dtype, device=M.device)
    rows = torch.arange(K, device=M.device)
    diagonal = M.diagonal()
    for p in range(K - 1):
        j = orders[:, p]
        CM = C @ M
        dot = CM.gather(1, j.unsqueeze(1)).squeeze(1)
        c = correction(rows, j, dot, (CM * C).sum(dim=1), diagonal[j])
        C = C.scatter_add(1, j.unsqueeze(1), c.unsqueeze(1))
    return C.sum(dim=0)


def pcgrad_correction(rows: Tensor, j: Tensor, dot: Tensor, sq_norm_i: Tensor, sq_norm_j: Tensor) -> Tensor:
    """Remove the component along g_j when g_i'·g_j < 0 (never against a zero g_j)."""
    project = (dot < 0.0) & (sq_norm_j > 0.0)
    return torch.where(project, -dot / torch.where(project, sq_norm_j, torch.ones_like(sq_norm_j)), 0.0)


def gradvac_correction(phi_hat: Tensor, beta: float, eps: float) -> tuple[BatchedCorrection, Callable[[], Tensor]]:
    """GradVac's rule bound to the targets φ̂ (K × K); returns (correction, current targets).

    Every visited pair (i, j) sets φ̂_ij ← (1−β) φ̂_ij + β φ_ij with φ_ij measured before the correction.
    """
    state = {"phi_hat": phi_hat}

    def correction(rows: Tensor, j: Tensor, dot: Tensor, sq_norm_i: Tensor, sq_norm_j: Tensor) -> Tensor:
        norm_i, norm_j = sq_norm_i.clamp_min(0.0).sqrt(), sq_norm_j.clamp_min(0.0).sqrt()
        cos_denominator = norm_i * norm_j + eps
        positive = cos_denominator > 0.0
        phi = torch.where(positive, dot / torch.where(positive, cos_denominator, 1.0), 0.0)
        target = state["phi_hat"][rows, j]
        sin_phi = (1.0 - phi**2).clamp_min(0.0).sqrt()
        sin_target = (1.0 - target**2).clamp_min(0.0).sqrt()
        denominator = norm_j * sin_target + eps
        apply = (phi < target) & (denominator > 0.0)
        c = norm_i * (target * sin_phi - phi * sin_target) / torch.where(apply, denominator, 1.0)
        state["phi_hat"] = state["phi_hat"].index_put((rows, j), (1.0 - beta) * target + beta * phi)
        return torch.where(apply, c, 0.0)

    return correction, lambda: state["phi_hat"]
