"""Mean and Sum: equal weighting (linear scalarisation), w = 𝟏/K and w = 𝟏.

Dtype policy of the reference backend: directions are computed in float64 and returned in G's dtype;
``weights`` returns float64 on M's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix


class Mean(GramianAggregator):
    """d = (1/K) Σ g_i: the gradient of the mean loss. Scale: mean of the rows."""

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G)
        check_losses(losses, K, G.device, required=False, owner="Mean")
        return G.double().mean(dim=0).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M)
        check_losses(losses, K, M.device, required=False, owner="Mean")
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=M.device)


class Sum(GramianAggregator):
    """d = Σ g_i: the gradient of the summed loss. Scale: sum of the rows (K × Mean)."""

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G)
        check_losses(losses, K, G.device, required=False, owner="Sum")
        return G.double().sum(dim=0).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M)
        check_losses(losses, K, M.device, required=False, owner="Sum")
        return torch.ones(K, dtype=torch.float64, device=M.device)
