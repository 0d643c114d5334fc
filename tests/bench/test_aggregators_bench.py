"""The aggregators suite (bench/aggregators.py) runs end to end on the CPU at a small size: a Gramian method, the
elementwise GradDrop and DB-MTL (losses, no torchjd peer) give their step and peer rows (a solve row for the
Gramian one), each step with its small-matrix (host) time."""

from __future__ import annotations

import pytest
import torch

from bench import aggregators, common

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["UPGrad", "GradDrop", "DBMTL"])
def test_measure_method_gives_every_row_with_its_host_time(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(common, "ROTATION_BYTES", 0)  # one copy of a small G, not a GB of them
    rows = aggregators.measure_method(name, CPU, 3, 2003, repeat=1)
    peers = ["torchjd"] if aggregators.TORCHJD_PEERS[name] is not None and aggregators.torchjd_available() else []
    steps = [r for r in rows if r.op == f"{name}:step"]
    assert [r.impl for r in steps] == ["flatmtl", "reference", *peers]
    assert [r.op for r in rows if r.op != f"{name}:step"] == ([f"{name}:solve"] if name == "UPGrad" else [])
    assert all(r.K == 3 and r.N == 2003 and r.seconds > 0 for r in rows)
    assert all(r.bytes == aggregators.floor_bytes(name, torch.empty(3, 2003)) for r in steps)
    assert all(r.extra["small_step_us"] > 0 for r in steps)
    assert all(r.extra["flatmtl_speedup"] > 0 for r in steps[1:])
