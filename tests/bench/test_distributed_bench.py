"""CPU smoke test of the distributed benchmark (bench/distributed.py) at tiny sizes: the suite produces its rows
with positive times, overheads and a reproduced plain result, its steps really go through the process group, and
on one rank the distributed training step leaves exactly the plain step's ``.grad``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from bench import common, distributed

CPU = torch.device("cpu")
# The module (flatmtl_fast.distributed.aggregate is the function of the same name).
#: Where every collective of a step is looked up (``_function``), whichever module runs it.
TRAFFIC_MODULE = importlib.import_module("flatmtl_fast.distributed.traffic")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch was built without torch.distributed")


@pytest.fixture(autouse=True)
def small_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few copies of the tiny inputs instead of 1 GiB of them."""
    monkeypatch.setattr(common, "ROTATION_BYTES", 1 << 16)


def test_the_suite_produces_its_rows() -> None:
    rows = distributed.run(CPU, "UPGrad", train_Ks=[2], batch=4, Ks=[3], Ns=[1000], repeat=1)
    assert not dist.is_initialized()  # the group of one was destroyed
    expected = [("step:UPGrad", impl, 2) for impl in ("plain", *distributed.LAYOUTS)]
    expected += [("UPGrad:aggregate", impl, 3) for impl in distributed.AGGREGATE_IMPLS]
    assert [(r.op, r.impl, r.K) for r in rows] == expected
    assert all(r.seconds > 0 for r in rows)
    for r in rows:
        assert r.suite == distributed.SUITE
        if r.impl == "plain":
            assert "overhead_pct" not in r.extra
        else:
            assert r.extra["matches_plain"] is True, (r.op, r.impl)
            assert r.extra["overhead_pct"] > -100
    assert all(r.N == 1000 and r.bytes == 2 * 3 * 1000 * 4 + 1000 * 4 for r in rows if r.op.endswith("aggregate"))
    assert rows[0].N == sum(p.numel() for p in distributed.Model(2).trunk.parameters())
    assert distributed.summary(rows).count("same result") == len(rows) - 2  # every row but the two plain ones


def test_distributed_steps_communicate_and_leave_the_plain_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked here, not through the suite's own ``matches_plain``: the ``.grad`` of one step per impl, and the
    collectives that each training step and each aggregation impl runs."""
    collectives: list[str] = []
    original = TRAFFIC_MODULE._function

    def counted(kind: str) -> Callable[..., object]:
        collectives.append(kind)
        return original(kind)

    def collected(fn: Callable[[], object]) -> list[str]:
        collectives.clear()
        fn()
        return list(collectives)

    monkeypatch.setattr(TRAFFIC_MODULE, "_function", counted)
    grads, step_calls, aggregation_calls = {}, {}, {}
    with distributed.group_of_one(CPU) as group:
        for impl in ("plain", *distributed.LAYOUTS):
            model, step = distributed.training_step(impl, "UPGrad", 2, 4, CPU, group)
            step_calls[impl] = collected(step)
            grads[impl] = [p.grad.clone() for p in model.parameters()]
        for impl in distributed.AGGREGATE_IMPLS:
            call = distributed.aggregation_call(impl, "UPGrad", group)
            aggregation_calls[impl] = collected(lambda call=call: call(torch.randn(3, 50), torch.empty(50)))
    assert step_calls["plain"] == aggregation_calls["plain"] == []
    assert any(float(g.abs().max()) > 0 for g in grads["plain"])
    for layout in distributed.LAYOUTS:  # on one rank nothing of size N moves: the check, losses, Gram, weights
        assert step_calls[layout] == ["check", "all_reduce", "all_reduce", "broadcast"], layout
        assert aggregation_calls[layout] == ["check", "all_reduce", "broadcast"], layout  # no losses given
        for got, want in zip(grads[layout], grads["plain"], strict=True):
            assert torch.equal(got, want), layout
    assert aggregation_calls["sharded-unchecked"] == ["all_reduce", "broadcast"]
