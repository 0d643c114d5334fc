"""Fused Nash-MTL."""

from __future__ import annotations

import torch
from torch import Tensor

from .._device import forbid_in_capture
from ..reference import nash_mtl as reference
from ..solvers import nash_weights
from ._fused import FusedGramian


class NashMTL(FusedGramian, reference.NashMTL):
    """Nash-MTL (Navon et al., ICML 2022) as :class:`flatmtl_fast.reference.NashMTL`: α > 0 with Mα = 1/α
    (damped Newton, warm-started from the previous α, ``optim_niter`` steps — always all of them here, frozen
    once converged), then ‖d‖ clipped to ``max_norm`` inside the weights (‖d‖² = αᵀMα). Same constructor,
    state (``_alpha``, ``_step``) and semantics for zero rows and unsolvable steps (keep the previous α)."""

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        previous, update = self._advance(M)
        alpha = nash_weights(M, previous, self.optim_niter, reference.gram_eps(input_dtype)) if update else previous
        previous.copy_(alpha)
        norm = (alpha @ M @ alpha).clamp_min(0.0).sqrt()
        clip = (self.max_norm > 0) & (norm > self.max_norm)
        return alpha * torch.where(clip, self.max_norm / torch.where(clip, norm, 1.0), 1.0)

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        alpha, update = self._advance(M)
        return "nash_mtl", [alpha, self.optim_niter, float(self.max_norm), update, reference.gram_eps(input_dtype)]

    def _advance(self, M: Tensor) -> tuple[Tensor, bool]:
        """(the warm start α, created at 𝟏 and then updated in place — so a CUDA graph replay carries it to
        the next replay —, whether this step solves), advancing the step count."""
        K = M.shape[0]
        if self._alpha is None:
            self._alpha = torch.ones(K, dtype=torch.float64, device=M.device)
        if self._alpha.shape != (K,):
            raise ValueError(f"NashMTL was used with {self._alpha.shape[0]} tasks, now {K}: call reset() first")
        self._alpha = self._alpha.to(device=M.device, dtype=torch.float64).contiguous()
        if self.update_weights_every > 1:
            forbid_in_capture(M.device, "NashMTL with update_weights_every > 1 (its step count lives on the host)")
        step = self._step or 0
        self._step = step + 1
        return self._alpha, step % self.update_weights_every == 0
