"""A small synthetic multi-task regression problem shared by the training tests."""

from __future__ import annotations

import torch
from torch import nn


def regression_problem(seed: int = 0, K: int = 3) -> tuple[nn.ModuleDict, torch.Tensor, torch.Tensor]:
    """K related but partly conflicting regression tasks on shared inputs, and an MLP trunk with K heads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=gen)
    common = torch.randn(8, generator=gen)
    y = torch.stack([torch.tanh(x @ (common + 0.5 * torch.randn(8, generator=gen))) for _ in range(K)], dim=1)
    torch.manual_seed(seed)
    net = nn.ModuleDict(
        {"trunk": nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 12), nn.Tanh()),
         "heads": nn.ModuleList(nn.Linear(12, 1) for _ in range(K))}
    )  # fmt: skip
    return net, x, y
