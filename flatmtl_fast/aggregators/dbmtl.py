"""Fused DB-MTL: the EMA update fused with the row norms over column blocks, then one combine."""

from __future__ import annotations

import torch
from torch import Tensor

from ..primitives import combine
from ..reference import dbmtl as reference
from .checks import check_losses, check_matrix

#: Elements of the buffer updated per block: the block's norms are taken while it is still in cache.
BLOCK_ELEMENTS = 1 << 18


class DBMTL(reference.DBMTL):
    """DB-MTL (Lin et al., arXiv 2308.12029) as :class:`flatmtl_fast.reference.DBMTL` (same constructor,
    defaults β = 0.9, σ = 0.5, sum scale, step counter, α_i = 0 for a zero row).

    Per call: B ← decay · B + (1 − decay) · G / L in place, block by block with each block's squared row
    norms accumulated in float64 while it is hot, then α_i = max_j ‖B_j‖ / ‖B_i‖ and d = αᵀB by ``combine``
    (into ``out`` if given). Deviations: the buffer (state ``buffer``) is float32 — half the reference's
    float64 K × N, and readable by ``combine`` — so d agrees with the reference to float32 rounding; the
    losses are not checked for being finite and > 0 (that would synchronise): bad losses give NaN/Inf.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
        K, N = check_matrix(G)
        check_losses(losses, K, G.device, required=True, owner="DBMTL")
        if self.buffer is None:
            self.buffer, self.step = torch.zeros(K, N, dtype=torch.float32, device=G.device), 0
        elif self.buffer.shape != (K, N):
            raise ValueError(f"DBMTL: the buffer has shape {tuple(self.buffer.shape)}, G {(K, N)}; call reset() first")
        self.step += 1
        decay = self.beta / self.step**self.beta_sigma
        gain = ((1.0 - decay) / losses.to(torch.float64)).to(torch.float32).unsqueeze(1)
        squared_norms = torch.zeros(K, dtype=torch.float64, device=G.device)
        block = max(1, BLOCK_ELEMENTS // K)
        for start in range(0, N, block):
            columns = self.buffer[:, start : start + block]
            columns.mul_(decay).addcmul_(G[:, start : start + block], gain)
            squared_norms += torch.linalg.vector_norm(columns, dim=1, dtype=torch.float64).square()
        norms = squared_norms.sqrt()
        alpha = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        if out is None:
            out = torch.empty(N, dtype=G.dtype, device=G.device)
        return combine(alpha, self.buffer, out=out)
