"""MGDA: the min-norm point of the convex hull of the task gradients.

Sources: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018), official
code GitHub ``isl-org/MultiObjectiveOptimization`` (``MinNormSolver``, ``gradient_normalizers``), as also
used by LibMTL's ``MGDA``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import (
    check_count,
    check_gramian,
    check_losses,
    check_matrix,
    check_positive_finite_losses,
    check_real,
)
from ._simplex import FW_MAX_ITER, FW_STOP_CRIT, min_norm_weights

Normalization = Literal["none", "l2", "loss", "loss+"]


class MGDA(GramianAggregator):
    """d = Σ_i (w_i / D_i) g_i with w = argmin_{w∈Δ} ‖Σ_i w_i g_i / D_i‖² (Frank–Wolfe, algorithms.md §2).

    ``normalize`` picks the per-task divisor D_i of the official ``gradient_normalizers``:
    ``"none"`` (D = 1, default), ``"l2"`` (D_i = ‖g_i‖), ``"loss"`` (D_i = L_i), ``"loss+"`` (D_i = L_i ‖g_i‖).
    The solve sees D⁻¹MD⁻¹ and, as in LibMTL, the direction combines the *normalised* gradients, so the
    weights on the raw rows are w_i / D_i.

    Output scale: with ``normalize="none"`` the weights lie on the simplex (d is the min-norm point itself,
    no multiplication by K). Solver: official ``find_min_norm_element_FW`` (start from the best pair's
    closed form, at most ``max_iter`` = 250 steps, stop when the change is below ``stop_crit`` = 1e-5), see
    :func:`~flatmtl_fast.reference._simplex.min_norm_weights` for its one deviation (γ clipped to [0, 1]).
    Accuracy: Frank–Wolfe converges as O(1/t); with the official budget the direction can stay a few degrees
    from the exact min-norm point for K ≥ 5 (cosine 0.94 seen at K = 8); raise ``max_iter`` / lower
    ``stop_crit`` for more. Deviation: a row with D_i = 0 (zero gradient) is left unscaled (D_i := 1)
    instead of producing NaN.
    """

    def __init__(
        self, normalize: Normalization = "none", max_iter: int = FW_MAX_ITER, stop_crit: float = FW_STOP_CRIT
    ) -> None:
        if normalize not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"normalize must be 'none', 'l2', 'loss' or 'loss+', got {normalize!r}")
        self.normalize = normalize
        self.max_iter = check_count(max_iter, "MGDA", "max_iter", minimum=0)
        self.stop_crit = check_real(stop_crit, "MGDA", "stop_crit", above=0.0)
        self.needs_losses = normalize in ("loss", "loss+")

    def _hyperparameters(self) -> dict[str, object]:
        return {"normalize": self.normalize, "max_iter": self.max_iter, "stop_crit": self.stop_crit}

    def _divisors(self, norms: Tensor, losses: Tensor | None) -> Tensor:
        """D_i from the row norms ‖g_i‖ and the losses (float64)."""
        if self.normalize == "none":
            D = torch.ones_like(norms)
        elif self.normalize == "l2":
            D = norms
        else:
            assert losses is not None  # checked by _check_losses
            D = losses.double() * (norms if self.normalize == "loss+" else 1.0)
        return torch.where(D > 0, D, torch.ones_like(D))

    def _check_losses(self, losses: Tensor | None, K: int, device: torch.device) -> None:
        check_losses(losses, K, device, required=self.needs_losses, owner=f"MGDA(normalize={self.normalize!r})")
        if self.needs_losses:
            check_positive_finite_losses(losses, owner=f"MGDA(normalize={self.normalize!r})")

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        self._check_losses(losses, K, G.device)
        G64 = G.double()
        normalized = G64 / self._divisors(G64.norm(dim=1), losses)[:, None]
        w = min_norm_weights(normalized @ normalized.T, self.max_iter, self.stop_crit)
        return (w @ normalized).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Weights on the raw rows, float64: w_i / D_i (see the class docstring)."""
        K = check_gramian(M, finite=True)
        self._check_losses(losses, K, M.device)
        M64 = M.double()
        D = self._divisors(M64.diagonal().clamp(min=0).sqrt(), losses)
        return min_norm_weights(M64 / torch.outer(D, D), self.max_iter, self.stop_crit) / D
