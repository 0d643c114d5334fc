"""Inputs shared by the distributed tests and the ranks they launch: both sides rebuild them from seeds."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

import flatmtl_fast

K = 3
#: 1002 = 2 · 3 · 167 is divisible by both world sizes tested (2, 3); 1001 = 7 · 11 · 13 by neither.
N_VALUES = (1002, 1001)
#: Columns of the sharded cases in which rank 2 of 3 owns none (its shard is empty, yet it joins every collective).
EMPTY_SHARD_N = 2
STEPS = 2  # two steps: stateful aggregators (PCGrad's generator, Nash-MTL's warm start, DB-MTL's EMA) carry on
SEED = 7
#: Aggregators whose distributed result must equal the single-process result on the averaged gradients.
EXACT = ("MGDA", "PCGrad", "CAGrad", "NashMTL", "UPGrad", "IMGrad", "DBMTL")
RANDOMISED = ("PCGrad", "GradDrop")
AVERAGED = 2  # leading rows of G already averaged over ranks in the ``averaged_rows`` cases
BATCH = 12  # divisible by 1, 2 and 3: every rank gets an equal slice
HIDDEN = 12  # the tensor-parallel layer's width, split evenly over 1, 2 or 3 ranks
#: The widths of Net's heads: FSDP2 splits the wider ones over 2 or 3 ranks (with only one-row heads, wholly on
#: rank 0, a sharded step that forgot to sum the heads' norms over the ranks would go unseen), and leaves empty
#: shards of the narrower ones (head 0 on ranks 1 and 2, head 2 on rank 2 of 3).
HEAD_WIDTHS = (1, 3, 2)


def make(name: str) -> flatmtl_fast.aggregators.Aggregator:
    """A fused aggregator; randomised ones get a generator with the same seed on every rank."""
    cls = getattr(flatmtl_fast, name)
    return cls(generator=torch.Generator().manual_seed(SEED)) if name in RANDOMISED else cls()


def rank_inputs(world: int, rank: int, N: int, step: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s task gradients (K × N, float32) and K losses (float64) at ``step``.

    Entries are ``world`` · j / 16 with integers |j| ≤ 31, so every sum over ranks is exact, their mean
    Σ_r j_r / 16 is exact, and so is every Gram entry (|Σ_r j_r| ≤ 93, 1002 · 93² < 2²⁴, in units of 1/256):
    the distributed and single-process paths then see bit-identical G, M and losses whatever their
    summation orders or tile sizes.
    """
    gen = torch.Generator().manual_seed(10_000 * step + 1_000 * world + 100 * rank + N)
    G = world * torch.randint(-31, 32, (K, N), generator=gen).float() / 16
    losses = world * torch.randint(1, 32, (K,), generator=gen).double() / 16
    return G, losses


def mean_inputs(world: int, N: int, step: int) -> tuple[Tensor, Tensor]:
    """The gradients and losses averaged over ``world`` ranks (exact, see :func:`rank_inputs`)."""
    Gs, losses = zip(*(rank_inputs(world, r, N, step) for r in range(world)), strict=True)
    return torch.stack(Gs).sum(0) / world, torch.stack(losses).sum(0) / world


def column_slices(N: int, world: int) -> list[slice]:
    """The uneven column ranges owned by each rank in the sharded-layout cases (as ``tensor_split``)."""
    ends = [0, *itertools.accumulate(len(chunk) for chunk in torch.arange(N).tensor_split(world))]
    return [slice(start, end) for start, end in itertools.pairwise(ends)]


class Net(nn.Module):
    """A shared MLP trunk with K linear heads; ``forward`` returns the K losses (means over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.trunk = nn.Sequential(nn.Linear(6, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, width) for width in HEAD_WIDTHS)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return task_losses(self.heads, self.trunk(x), y)


class TinyNet(Net):
    """Net with a trunk of one 6 → 2 layer: FSDP2 leaves rank 2 of 3 no shard of it (both tensors have 2 rows)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.trunk = nn.Sequential(nn.Linear(6, 2), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(2, width) for width in HEAD_WIDTHS)


class WideNet(nn.Module):
    """One wide shared layer (the one the tensor-parallel case splits by rows) and K heads on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.layer = nn.Linear(6, HIDDEN)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(K))


def task_losses(heads: nn.ModuleList, z: Tensor, y: Tensor) -> Tensor:
    """The K mean squared errors of the heads' mean outputs on the features z (+ 0.1, so DB-MTL's losses are > 0)."""
    return torch.stack([((head(z).mean(1) - y[:, i]) ** 2).mean() + 0.1 for i, head in enumerate(heads)])


def batch() -> tuple[Tensor, Tensor]:
    """The global batch; rank r of P trains on ``chunk(P)[r]`` of it."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, K, generator=gen)


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over a list of tensors taken as one vector."""
    got, want = [[t.detach().flatten() for t in tensors] for tensors in (got, want)]
    return float(torch.cat([a - b for a, b in zip(got, want, strict=True)]).norm() / torch.cat(want).norm())
