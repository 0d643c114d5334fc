"""Fused Mean and Sum: one ``combine`` pass (no Gram pass: the weights ignore M)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import mean_sum as reference
from ._fused import FusedGramian


class Mean(FusedGramian, reference.Mean):
    """d = (1/K) Σ g_i (mean of the rows), as :class:`flatmtl_fast.reference.Mean`, in one pass over G."""

    _uses_gram = False

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return torch.full((M.shape[0],), 1.0 / M.shape[0], dtype=torch.float64, device=M.device)


class Sum(FusedGramian, reference.Sum):
    """d = Σ g_i (sum of the rows), as :class:`flatmtl_fast.reference.Sum`, in one pass over G."""

    _uses_gram = False

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return torch.ones(M.shape[0], dtype=torch.float64, device=M.device)
