"""The README's runnable loop (examples/shared_backbone.py): every task's loss falls with aggregators and with
FAMO, and an aggregator's gradient accumulation over micro-batches (aggregate=False) follows the whole-batch
trajectory (FAMO's weighting of log-losses is not additive over micro-batches: there they are another step)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shared_backbone.py"


def _final_losses(*args: str) -> list[tuple[float, float]]:
    """(first, last) loss of each task, as the example prints them."""
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "60", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return [(float(a), float(b)) for a, b in re.findall(r"loss ([\d.]+) -> ([\d.]+)", run.stdout)]


@pytest.mark.parametrize("method", ["UPGrad", "MGDA", "FAMO"])
def test_every_task_loss_falls(method: str) -> None:
    losses = _final_losses("--method", method)
    assert len(losses) == 3 and all(last < 0.5 * first for first, last in losses)


@pytest.mark.parametrize("method", ["UPGrad", "MGDA"])
def test_micro_batches_follow_the_whole_batch(method: str) -> None:
    whole = _final_losses("--method", method)
    micro = _final_losses("--method", method, "--micro-batches", "4")
    # the same steps with the gradients summed in another order (float32): the printed 4 decimals agree to ±1e-4
    # over 60 steps; a micro-batch aggregated on its own (or overwritten) moves them by far more
    for (_, a), (_, b) in zip(whole, micro, strict=True):
        assert abs(a - b) <= 2e-4
