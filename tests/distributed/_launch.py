"""Launching the ranks of a distributed test (``_worker.main``) and reading their saved results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from distributed import _worker


def launch(world: int, out: Path, timeout: float, suite: str = "main") -> list[dict[str, Any]]:
    """Run ``_worker.main`` on ``world`` spawned ranks (killed after ``timeout`` seconds); return each rank's
    results, with an error entry ``"launch"`` for a rank that had to be killed."""
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_worker.main, args=(rank, world, str(out / "store"), str(out), suite), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    results = [
        torch.load(out / f"rank{rank}.pt", weights_only=False) if (out / f"rank{rank}.pt").exists() else {}
        for rank in range(world)
    ]
    for rank, result in enumerate(results):
        result.setdefault("errors", {})
        if rank in hung:
            result["errors"]["launch"] = f"rank {rank} was still running after {timeout} s and was killed"
    return results


def scenario(ranks: list[dict[str, Any]], name: str, world: int | None = None) -> list[Any]:
    """The results of scenario ``name`` on ranks 0 … world − 1 (default: every rank launched), failing with the
    rank's traceback if it raised."""
    world = len(ranks) if world is None else world
    for rank in range(world):
        errors = ranks[rank]["errors"]
        assert name not in errors, f"rank {rank} raised in scenario {name!r}:\n{errors[name]}"
        assert name in ranks[rank], f"rank {rank} did not finish scenario {name!r}: {errors.get('launch', '')}"
    return [ranks[rank][name] for rank in range(world)]
