"""Fused GradVac."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import gradvac as reference
from ..solvers import corrected_weights, draw_keys, gradvac_correction, visiting_orders
from ._fused import FusedGramian


class GradVac(FusedGramian, reference.GradVac):
    """GradVac (Wang et al., ICLR 2021), whole-model form, as :class:`flatmtl_fast.reference.GradVac`: same
    constructor, generator contract and state (targets ``phi_hat``, K × K float64, and the generator)."""

    _weights_in_input_dtype = True

    def _targets(self, M: Tensor) -> Tensor:
        """The EMA targets φ̂ (K × K float64, contiguous, on M's device), created at the first step."""
        K = M.shape[0]
        if self.phi_hat is None:
            self.phi_hat = torch.zeros(K, K, dtype=torch.float64, device=M.device)
        elif self.phi_hat.shape != (K, K):
            raise ValueError(
                f"GradVac: the targets are for K = {self.phi_hat.shape[0]} tasks, got K = {K}; call reset() first"
            )
        self.phi_hat = self.phi_hat.to(device=M.device, dtype=torch.float64).contiguous()
        return self.phi_hat

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        K = M.shape[0]
        phi_hat = self._targets(M)
        keys = draw_keys(K, self.generator, M.device)
        correction, targets = gradvac_correction(phi_hat, self.beta, self.eps)
        w = corrected_weights(M, visiting_orders(keys), correction)
        phi_hat.copy_(targets())  # in place, as the native solver: a CUDA graph replay carries it to the next
        return w

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        phi_hat = self._targets(M)  # the native solver updates it in place
        keys = draw_keys(M.shape[0], self.generator, M.device).contiguous()
        return "gradvac", [keys, phi_hat, float(self.beta), float(self.eps)]
