"""Aligned-MTL's balance transformation from the Gram matrix, without host synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor

#: The official rank cut-off uses the float32 eps whatever the data's dtype (as the reference).
RANK_EPS = torch.finfo(torch.float32).eps


def aligned_weights(M: Tensor) -> Tensor:
    """w = B𝟏 with B = √λ_min V Λ^{-1/2} Vᵀ over the eigenvalues λ > λ_max K eps (B = I when none is kept)."""
    K = M.shape[0]
    eigenvalues, V = torch.linalg.eigh(M)
    kept = eigenvalues > eigenvalues.max() * K * RANK_EPS
    safe = torch.where(kept, eigenvalues, 1.0)
    lam_min = torch.where(kept, eigenvalues, torch.inf).min()
    B = (V * torch.where(kept, safe.rsqrt(), 0.0)) @ V.T * torch.where(kept.any(), lam_min, 1.0).sqrt()
    return torch.where(kept.any(), B.sum(dim=1), torch.ones(K, dtype=M.dtype, device=M.device))
