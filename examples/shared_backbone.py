"""A shared-backbone model with K heads trained with any flatmtl_fast aggregator (runs on the CPU in seconds).

    python examples/shared_backbone.py --method UPGrad --steps 300
    python examples/shared_backbone.py --method FAMO
    python examples/shared_backbone.py --method PCGrad --micro-batches 4   # gradient accumulation

The three lines that differ from a plain loop are marked with  # <-- flatmtl_fast
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import flatmtl_fast

METHODS = [*flatmtl_fast.reference.__all__, "FAMO"]


def make_data(K: int, n: int = 512, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K regression tasks on shared inputs: related (a common signal) but partly conflicting."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    common = torch.randn(d, generator=gen)
    targets = [torch.tanh(x @ (common + torch.randn(d, generator=gen))) for _ in range(K)]
    return x, torch.stack(targets, dim=1)


class MultiTaskNet(nn.Module):
    def __init__(self, d: int, K: int, width: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(K))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(1) for head in self.heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="UPGrad", choices=METHODS)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation: backward per chunk")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x, y = make_data(args.tasks, seed=args.seed)
    model = MultiTaskNet(x.shape[1], args.tasks)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shared = flatmtl_fast.FlatParameters(model.trunk)  # <-- flatmtl_fast
    if args.method == "FAMO":
        famo = flatmtl_fast.FAMO(args.tasks)
    else:
        aggregator = getattr(flatmtl_fast, args.method)()  # <-- flatmtl_fast

    def task_losses(xs: torch.Tensor = x, ys: torch.Tensor = y) -> list[torch.Tensor]:
        return [((pred - ys[:, i]) ** 2).mean() for i, pred in enumerate(model(xs))]

    chunks = list(zip(x.chunk(args.micro_batches), y.chunk(args.micro_batches), strict=True))
    first = torch.stack(task_losses()).detach()
    start = time.perf_counter()
    for _ in range(args.steps):
        optimizer.zero_grad()
        for part, (xs, ys) in enumerate(chunks):  # one chunk unless --micro-batches: then each adds its share
            losses = [loss / len(chunks) for loss in task_losses(xs, ys)]
            if args.method == "FAMO":
                famo.backward(losses)  # accumulates as usual (its log-loss weights make chunks another step)
            else:
                # instead of sum(losses).backward(); all micro-batches but the last only accumulate:
                last = part == len(chunks) - 1
                heads = model.heads.parameters()
                flatmtl_fast.backward(losses, shared, aggregator, task_params=heads, aggregate=last)  # <-- flatmtl_fast
        optimizer.step()
        if args.method == "FAMO":
            with torch.no_grad():
                famo.update(task_losses())
    elapsed = time.perf_counter() - start
    last = torch.stack(task_losses()).detach()
    print(f"{args.method}: {args.steps} steps in {elapsed:.2f} s ({1e3 * elapsed / args.steps:.2f} ms/step)")
    for i in range(args.tasks):
        print(f"  task {i}: loss {first[i]:.4f} -> {last[i]:.4f}")


if __name__ == "__main__":
    main()
