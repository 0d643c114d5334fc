"""Aligned-MTL: independent component alignment of the task gradients.

Source: Senushkin et al., "Independent Component Alignment for Multi-Task Learning" (CVPR 2023), official
code GitHub ``SamsungLabs/MTL`` (``ProcrustesSolver``, ``AlignedMTLBalancer``; no longer online, torchjd's
``AlignedMTL`` is adapted from it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix

#: The official code's rank cut-off uses ``torch.finfo()`` (the float32 eps) whatever the data's dtype;
#: kept, so a rank deficiency that is exact in float32 data is also detected by our float64 solve.
RANK_EPS = torch.finfo(torch.float32).eps


def balance_transformation(M: Tensor) -> Tensor:
    """B = √λ_min V Λ^{-1/2} Vᵀ from M = VΛVᵀ (float64), keeping the eigenvalues λ > λ_max K eps.

    M = 0 (rank 0) gives B = I, as torchjd does (the official code raises there); any B gives d = 0 then.
    """
    eigenvalues, V = torch.linalg.eigh(M)
    kept = eigenvalues > eigenvalues.max() * M.shape[0] * RANK_EPS
    if not bool(kept.any()):
        return torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    lam, V = eigenvalues[kept], V[:, kept]
    return lam.min().sqrt() * (V / lam.sqrt()) @ V.T


class AlignedMTL(GramianAggregator):
    """Aligned gradients Ĝ = B G (rows with orthogonal directions and equal norms √λ_min on the span of G),
    d = Σ_i ĝ_i, i.e. w = B𝟏 (algorithms.md §2; scale mode "min").

    Output scale: the official balancer *sums* the aligned gradients (``grads.sum(-1)``), and so do we;
    torchjd applies its default mean preference vector, so torchjd's output is ours / K.
    K = 1: B = [1], d = g₁. Deviation: M = 0 returns d = 0 (w = 𝟏) instead of failing.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="AlignedMTL")
        G64 = G.double()
        aligned = balance_transformation(G64 @ G64.T) @ G64
        return aligned.sum(dim=0).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 w = B𝟏."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="AlignedMTL")
        return balance_transformation(M.double()).sum(dim=1)
