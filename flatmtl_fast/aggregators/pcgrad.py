"""Fused PCGrad."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import pcgrad as reference
from ..solvers import corrected_weights, draw_keys, pcgrad_correction, visiting_orders
from ._fused import FusedGramian


class PCGrad(FusedGramian, reference.PCGrad):
    """PCGrad (Yu et al., NeurIPS 2020) as :class:`flatmtl_fast.reference.PCGrad` (sum scale), in Gram form:
    the same single (K, K) key draw from the generator, so equal generator states give equal orders."""

    _weights_in_input_dtype = True

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        keys = draw_keys(M.shape[0], self.generator, M.device)
        return corrected_weights(M, visiting_orders(keys), pcgrad_correction)

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        keys = draw_keys(M.shape[0], self.generator, M.device).contiguous()
        return "pcgrad", [keys]
