"""Fused RLW: random softmax weights, one ``combine`` pass (no Gram pass)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import rlw as reference
from ._fused import FusedGramian


class RLW(FusedGramian, reference.RLW):
    """RLW (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I_K) per call — constructor, generator contract
    (one ``torch.randn(K, float64)`` draw) and state exactly those of :class:`flatmtl_fast.reference.RLW`."""

    _uses_gram = False
    _weights_in_input_dtype = True

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        return self._draw_weights(M.shape[0], M)
