"""Fused MGDA."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..solvers.simplex import FW_MAX_ITER, FW_STOP_CRIT, min_norm_weights
from ._fused import FusedGramian

Normalization = Literal["none", "l2", "loss", "loss+"]


class MGDA(FusedGramian):
    """MGDA (Sener & Koltun, NeurIPS 2018): d = Σ_i (w_i / D_i) g_i, w = argmin_{w∈Δ} wᵀ(D⁻¹MD⁻¹)w.

    Constructor, defaults (``normalize="none"``, ``max_iter=250``, ``stop_crit=1e-5``), divisors D
    (none / l2 / loss / loss+, a zero D_i left at 1) and scale (simplex weights) are those of
    :class:`flatmtl_fast.reference.MGDA`, and so is the solver: the official Frank–Wolfe iteration step for
    step (:func:`~flatmtl_fast.solvers.min_norm_weights`), so the result equals the reference's at the same
    ``max_iter`` / ``stop_crit`` — including the inexactness of the official budget (raise ``max_iter`` for
    the exact min-norm point). Every call runs all ``max_iter`` steps (frozen once the stop rule fires).
    Deviation: the losses are not checked for positivity here (that would synchronise); a loss ≤ 0 with
    ``normalize="loss"``/``"loss+"`` is used as D_i = 1 where it is 0, and gives negative weights below 0.
    (Not a subclass of the reference class: its module imports cvxpy, which the fused path must not need.)
    """

    def __init__(
        self, normalize: Normalization = "none", max_iter: int = FW_MAX_ITER, stop_crit: float = FW_STOP_CRIT
    ) -> None:
        if normalize not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"normalize must be 'none', 'l2', 'loss' or 'loss+', got {normalize!r}")
        if max_iter < 0:
            raise ValueError(f"max_iter must be ≥ 0, got {max_iter}")
        if not stop_crit > 0:
            raise ValueError(f"stop_crit must be > 0, got {stop_crit}")
        self.normalize = normalize
        self.max_iter = max_iter
        self.stop_crit = stop_crit
        self.needs_losses = normalize in ("loss", "loss+")

    def _hyperparameters(self) -> dict[str, object]:
        return {"normalize": self.normalize, "max_iter": self.max_iter, "stop_crit": self.stop_crit}

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        norms = M.diagonal().clamp_min(0.0).sqrt()
        if self.normalize == "none":
            D = torch.ones_like(norms)
        elif self.normalize == "l2":
            D = norms
        else:
            D = losses.to(torch.float64) * (norms if self.normalize == "loss+" else 1.0)
        D = torch.where(D > 0, D, 1.0)
        return min_norm_weights(M / torch.outer(D, D), self.max_iter, self.stop_crit) / D
