"""Benchmark of the distributed code path on one rank: what ``process_group=`` costs when there is nothing to share.

Issue 7's GPU target: the sharded code path with world size 1 adds < 5 % over the plain path. A process group
whose only rank is this process (NCCL on CUDA, gloo on the CPU) runs, per case, the plain path and the same work
through ``flatmtl_fast.distributed`` in both layouts; each distributed row's ``extra["overhead_pct"]`` is its
time over the plain row's, minus 1, in per cent. With one rank the O(N) collectives are skipped, so what remains
is the consistency check (an all-gather of 9 integers and one host synchronisation), the all-reduces of the
losses and of the K × K Gram, the broadcast of the weights, and Python.

- ``step:<method>``: a whole training step of the MLP of ``bench/training.py`` (forward, K backward passes,
  aggregation, SGD step), ``flatmtl_fast.backward`` without and with ``process_group=``.
- ``<method>:aggregate``: the aggregation alone on a K × N matrix, ``agg(G, out=)`` against
  ``flatmtl_fast.distributed.aggregate(G, agg, out=)``; ``sharded-unchecked`` skips the consistency check
  (``check=False``), which separates its host synchronisation from the rest.

Every distributed row also records ``extra["matches_plain"]``: whether its ``.grad`` (training step) or its
direction (aggregation) equals the plain path's bit for bit, as it must on one rank. The impls of a case are
timed in alternation (:func:`interleaved_medians`), so that the load of a shared machine weighs on all of them.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

import flatmtl_fast
from flatmtl_fast.distributed import aggregate

from .common import Row, median_time, rotation
from .training import Model

SUITE = "distributed"
LAYOUTS = ("replicated", "sharded")
AGGREGATE_IMPLS = ("plain", *LAYOUTS, "sharded-unchecked")


@contextlib.contextmanager
def group_of_one(device: torch.device) -> Iterator[dist.ProcessGroup]:
    """The default process group with this process as its only rank (NCCL on CUDA, gloo otherwise), destroyed on
    exit so that the caller's process can create another."""
    with tempfile.TemporaryDirectory() as directory:
        store = dist.FileStore(str(Path(directory) / "store"), 1)
        backend, device_id = "gloo", None
        if device.type == "cuda":  # NCCL binds to one device, which must be named with its index
            index = torch.cuda.current_device() if device.index is None else device.index
            backend, device_id = "nccl", torch.device("cuda", index)
        dist.init_process_group(
            backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=120), device_id=device_id
        )
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def training_step(
    impl: str, method: str, K: int, batch: int, device: torch.device, group: dist.ProcessGroup
) -> tuple[Model, Callable[[], None]]:
    """The model and one training step with ``flatmtl_fast.backward``: ``impl`` is ``"plain"`` (no group) or a
    layout. Every impl starts from the same parameters and batch (seed 0)."""
    torch.manual_seed(0)
    model = Model(K).to(device)
    x, y = model.inputs(batch, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shared = flatmtl_fast.FlatParameters(model.trunk)
    agg = getattr(flatmtl_fast, method)()
    distributed = {} if impl == "plain" else {"process_group": group, "layout": impl}

    def step() -> None:
        optimizer.zero_grad()
        losses = model.losses(x, y)[1]
        flatmtl_fast.backward(losses, shared, agg, task_params=model.heads.parameters(), **distributed)
        optimizer.step()

    return model, step


def measure_training(
    method: str, K: int, batch: int, device: torch.device, group: dist.ProcessGroup, repeat: int
) -> list[Row]:
    """Rows of the whole training step, plain and through the group in each layout."""
    steps = {impl: training_step(impl, method, K, batch, device, group) for impl in ("plain", *LAYOUTS)}
    results = {}
    for impl, (model, step) in steps.items():
        step()  # from the common starting point, before the timed steps move the parameters
        results[impl] = [p.grad.clone() for p in model.parameters()]
    seconds = interleaved_medians({impl: step for impl, (_, step) in steps.items()}, device, [()], repeat)
    n_shared = sum(p.numel() for p in steps["plain"][0].trunk.parameters())
    return _rows(f"step:{method}", K, n_shared, 0, seconds, results)


def aggregation_call(impl: str, method: str, group: dist.ProcessGroup) -> Callable[[Tensor, Tensor], object]:
    """``call(G, out)`` aggregating with a fresh ``method``: plainly, or through the group (``impl`` a layout, with
    the consistency check, or ``"sharded-unchecked"`` without it)."""
    agg = getattr(flatmtl_fast, method)()
    if impl == "plain":
        return lambda G, out: agg(G, out=out)
    layout, check = impl.removesuffix("-unchecked"), not impl.endswith("-unchecked")
    return lambda G, out: aggregate(G, agg, group=group, layout=layout, out=out, check=check)


def measure_aggregation(
    method: str, K: int, N: int, device: torch.device, group: dist.ProcessGroup, repeat: int
) -> list[Row]:
    """Rows of the aggregation alone on a K × N float32 matrix (inputs rotated so that each call reads memory)."""
    G = torch.randn(K, N, device=device)
    calls = {impl: aggregation_call(impl, method, group) for impl in AGGREGATE_IMPLS}
    results = {}
    for impl, call in calls.items():
        results[impl] = [torch.empty(N, device=device)]
        call(G, *results[impl])
    seconds = interleaved_medians(calls, device, rotation(G, torch.empty(N, device=device)), repeat)
    two_reads = 2 * G.numel() * G.element_size() + N * 4  # gram reads G, combine reads it again and writes d
    return _rows(f"{method}:aggregate", K, N, two_reads, seconds, results)


def interleaved_medians(
    calls: dict[str, Callable[..., object]],
    device: torch.device,
    inputs: list[tuple[Tensor, ...]],
    repeat: int,
    warmup: int = 2,
) -> dict[str, float]:
    """The median seconds of each call over ``repeat`` rounds (after ``warmup`` untimed ones), each round timing
    every call once on the round's inputs (cycling through ``inputs``): on a shared machine a busy spell then
    slows every impl alike instead of whichever happened to be running."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeat):
        args = inputs[round_ % len(inputs)]
        for name, call in calls.items():
            seconds = median_time(call, device, [args], warmup=0, repeat=1)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def _rows(
    op: str, K: int, N: int, nbytes: int, seconds: dict[str, float], results: dict[str, list[Tensor]]
) -> list[Row]:
    """One row per impl; the distributed ones with their overhead over the plain row (time ratio − 1, in per
    cent) and whether their result equals the plain one bit for bit."""
    rows = []
    for impl, elapsed in seconds.items():
        row = Row(SUITE, op, impl, K, N, "float32", elapsed, nbytes)
        if impl != "plain":
            row.extra["overhead_pct"] = 100 * (elapsed / seconds["plain"] - 1)
            same = zip(results[impl], results["plain"], strict=True)
            row.extra["matches_plain"] = all(torch.equal(a, b) for a, b in same)
        rows.append(row)
    return rows


def run(
    device: torch.device, method: str, train_Ks: list[int], batch: int, Ks: list[int], Ns: list[int], repeat: int
) -> list[Row]:
    """Every row of the suite, in one process group of one rank."""
    rows: list[Row] = []
    with group_of_one(device) as group:
        for K in train_Ks:
            rows += measure_training(method, K, batch, device, group, repeat)
        for N in Ns:
            for K in Ks:
                rows += measure_aggregation(method, K, N, device, group, repeat)
    return rows


def summary(rows: list[Row]) -> str:
    """One line per distributed row: its overhead over the plain path and whether it reproduced the plain result."""
    lines = ["overhead over the plain path (world size 1):"]
    for r in rows:
        if "overhead_pct" in r.extra:
            same = "same result" if r.extra["matches_plain"] else "RESULT DIFFERS"
            lines.append(f"  {r.op:<18}{r.impl:<19}K={r.K:<4}N={r.N:<11}{r.extra['overhead_pct']:+7.1f} %  {same}")
    return "\n".join(lines)
