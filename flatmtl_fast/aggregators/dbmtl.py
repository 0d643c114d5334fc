"""Fused DB-MTL: the EMA update fused with the row norms (one streaming pass), then one combine."""

from __future__ import annotations

import torch
from torch import Tensor

from .._memory import overlaps
from ..primitives import check_runnable, combine, ema_row_norms
from ..reference import dbmtl as reference
from .checks import check_losses, check_matrix, check_streaming


class DBMTL(reference.DBMTL):
    """DB-MTL (Lin et al., arXiv 2308.12029) as :class:`flatmtl_fast.reference.DBMTL` (same constructor,
    defaults β = 0.9, σ = 0.5, sum scale, step counter, α_i = 0 for a zero row).

    Per call: B ← decay · B + (1 − decay) · G / L in place and the row norms ‖B_i‖ in one pass over G and B
    (:func:`flatmtl_fast.ema_row_norms`), then α_i = max_j ‖B_j‖ / ‖B_i‖ and d = αᵀB by ``combine`` (into
    ``out`` if given): G read once, B read twice and written once, no temporary of G's size.

    Deviations: the buffer (state ``buffer``) is float32 — half the reference's float64 K × N, and readable by
    ``combine`` — so d agrees with the reference to float32 rounding; the step count (state ``step``) is a
    float64 tensor on G's device, advanced in place, so the decay β/t^σ is computed there and a step captured
    in a CUDA graph advances it at every replay (the reference's int ``step`` loads too); the losses are not
    checked for being finite and > 0 (that would synchronise): bad losses give NaN/Inf.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
        K, N = check_matrix(G)
        check_losses(losses, K, G.device, required=True, owner="DBMTL")
        # Everything is checked before the state moves: a refused call leaves buffer and step as they were.
        out = check_streaming(G, out, "DBMTL")
        check_runnable("ema_row_norms", G.device, G.dtype, torch.float32)
        check_runnable("combine", G.device, torch.float32, G.dtype if out is None else out.dtype)
        if self.buffer is None:
            self.buffer, self.step = torch.zeros(K, N, dtype=torch.float32, device=G.device), 0
        elif self.buffer.shape != (K, N):
            raise ValueError(f"DBMTL: the buffer has shape {tuple(self.buffer.shape)}, G {(K, N)}; call reset() first")
        elif overlaps(G, self.buffer):
            raise ValueError("DBMTL: G overlaps the aggregator's EMA buffer, which this step updates")
        elif out is not None and overlaps(out, self.buffer):
            raise ValueError("DBMTL: out overlaps the aggregator's EMA buffer, which the result is read from")
        # A state loaded from elsewhere (another device, the reference's float64 and int, a non-contiguous tensor):
        # as the reference, follow G. Unchanged state stays the same tensors, updated in place below.
        self.buffer = self.buffer.to(device=G.device, dtype=torch.float32).contiguous()
        if isinstance(self.step, Tensor):
            self.step = self.step.to(device=G.device, dtype=torch.float64)
        else:  # a fill on the device, not a host-to-device copy
            self.step = torch.full((), float(self.step), dtype=torch.float64, device=G.device)
        self.step.add_(1)
        decay = self.beta / self.step.pow(self.beta_sigma)
        gain = ((1.0 - decay) / losses.to(torch.float64)).to(torch.float32)
        norms = ema_row_norms(self.buffer, G, decay=decay, gain=gain)
        alpha = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        if out is None:
            out = torch.empty(N, dtype=G.dtype, device=G.device)
        return combine(alpha, self.buffer, out=out)
