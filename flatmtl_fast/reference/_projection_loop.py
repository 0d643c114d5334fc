"""The pairwise correction loop shared by PCGrad and GradVac, on explicit vectors or in Gram form.

Both methods run, for each task i, over the other tasks j in a random order and add a multiple of the
*original* g_j to a working copy g_i' (which starts as g_i); the direction is d = Σ_i g_i'. Only the
multiple differs between the methods (a :data:`Correction`).

The loop is written once over abstract "rows" with an inner product, which covers both forms:

- explicit: rows are the gradients g_k themselves and the inner product is the dot product;
- Gram form: rows are the unit coefficient vectors e_k and the inner product is ⟨a, b⟩ = aᵀMb. Then
  g_i' = Σ_k C_ik g_k is carried as its coefficient row C_i, every dot product the rule needs is read
  from M, and Σ_i C_i — the column sums of C — are the weights w with d = wᵀG.

Random order contract (so a fused implementation fed the same generator state replays it): per call,
ONE draw ``keys = torch.rand((K, K), generator=generator, device=device, dtype=torch.float64)``; row i
visits the indices j ≠ i sorted by keys[i, j] ascending (stable argsort, so ties go to the lower j).
The draw is made even for K = 1, so the generator advances the same way for every K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._random import draw

#: ``correction(i, j, dot, sq_norm_i, sq_norm_j) -> c`` with dot = g_i'·g_j, sq_norm_i = ‖g_i'‖²,
#: sq_norm_j = ‖g_j‖² (Python floats, float64); the loop then sets g_i' ← g_i' + c g_j.
Correction = Callable[[int, int, float, float, float], float]


def draw_orders(K: int, generator: torch.Generator | None, device: torch.device) -> list[list[int]]:
    """The visiting order of the other tasks for each task i, from one (K, K) uniform draw."""
    keys = draw(torch.rand, (K, K), generator=generator, device=device, dtype=torch.float64)
    sorted_indices = torch.argsort(keys, dim=1, stable=True).tolist()
    return [[j for j in row if j != i] for i, row in enumerate(sorted_indices)]


def corrected_direction(G: Tensor, orders: list[list[int]], correction: Correction) -> Tensor:
    """Explicit form: d = Σ_i g_i' computed on the rows of ``G`` (K × N)."""
    return _corrected_sum(G, torch.dot, orders, correction)


def corrected_weights(M: Tensor, orders: list[list[int]], correction: Correction) -> Tensor:
    """Gram form: the weights w = column sums of C (d = wᵀG), computed from ``M`` = G Gᵀ alone."""
    K = M.shape[0]
    return _corrected_sum(torch.eye(K, dtype=M.dtype, device=M.device), lambda a, b: a @ M @ b, orders, correction)


def _corrected_sum(
    rows: Tensor, inner: Callable[[Tensor, Tensor], Tensor], orders: list[list[int]], correction: Correction
) -> Tensor:
    """Σ_i g_i', where g_i' starts at ``rows[i]`` and for j in ``orders[i]``: g_i' += correction(…) · rows[j]."""
    sq_norms = [float(inner(row, row)) for row in rows]
    total = torch.zeros_like(rows[0])
    for i, order in enumerate(orders):
        current = rows[i].clone()
        for j in order:
            c = correction(i, j, float(inner(current, rows[j])), float(inner(current, current)), sq_norms[j])
            if c != 0.0:
                current += c * rows[j]
        total += current
    return total
