"""Timing, bandwidth ceilings and result files shared by the benchmark suites."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """A name that keeps results from different machines apart (file name safe)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or "cpu"
        try:
            text = Path("/proc/cpuinfo").read_text()
            model = re.search(r"model name\s*:\s*(.+)", text).group(1)
        except (OSError, AttributeError):
            pass
        name = f"{model} {torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Inputs are rotated among copies totalling at least this much, so repeated calls read memory,
# not a cache that still holds the previous call's data (L3 of the CI machine: 300 MB; H100 L2: 50 MB).
ROTATION_BYTES = 1 << 30


def rotation(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Copies of ``tensors`` to cycle through (the originals first), ``ROTATION_BYTES`` in all."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = max(1, -(-ROTATION_BYTES // max(nbytes, 1)))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]


def median_time(
    fn: Callable[..., object],
    device: torch.device,
    inputs: list[tuple[torch.Tensor, ...]] | None = None,
    *,
    warmup: int = 2,
    repeat: int = 7,
    setup: Callable[[], tuple] | None = None,
) -> float:
    """Median time of ``fn(*inputs[i])`` in seconds over ``repeat`` calls, cycling through ``inputs``
    (device work included: events on CUDA, synchronised host clock on the CPU). ``setup``, when given, makes
    each call's arguments instead, outside the timed region (e.g. the forward pass whose graph a timed
    backward pass consumes)."""
    if setup is None:
        cycle = inputs or [()]
        calls = iter(range(1 << 62))

        def setup() -> tuple:
            return cycle[next(calls) % len(cycle)]

    for _ in range(warmup):
        fn(*setup())
    times = []
    for _ in range(repeat):
        arguments = setup()
        times.append(time_call(fn, device, *arguments))
    return statistics.median(times)


def time_call(fn: Callable[..., object], device: torch.device, *arguments: object) -> float:
    """Seconds of one ``fn(*arguments)``, device work included (events on CUDA, synchronised host clock on the
    CPU); device work queued before the call is not timed."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*arguments)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*arguments)
    return time.perf_counter() - t0


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device, warmup: int = 1) -> tuple[int, int]:
    """(bytes allocated on ``device`` at the peak of a ``fn()`` call, bytes allocated before it), after ``warmup``
    calls: lazy initialisation (kernels, workspaces kept between calls) is not per-call memory. PyTorch's caching
    allocator keeps a resettable high-water mark; the CPU has none (see aggregators.peak_extra_memory)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), base


@dataclass
class Ceilings:
    """The machine's measured memory ceilings (bytes per second)."""

    copy_bandwidth: float  # device-to-device copy, bytes read + written
    read_bandwidth: float  # a plain vectorised sum over a large buffer

    @classmethod
    def measure(cls, device: torch.device, nbytes: int) -> Ceilings:
        n = nbytes // 4
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        copy = median_time(lambda: dst.copy_(src), device)
        read = median_time(lambda: src.sum(), device)
        return cls(copy_bandwidth=2 * nbytes / copy, read_bandwidth=nbytes / read)


@dataclass
class Row:
    """One measured case: what moved, how long it took, how close to the ceilings. Bandwidth and floor are given
    for streaming passes only: a K × K solve (``streaming=False``) is bound by its arithmetic and its steps'
    latency, not by the bytes it reads, and a training step (no bytes counted) by its forward and backward."""

    suite: str
    op: str
    impl: str
    K: int
    N: int
    dtype: str
    seconds: float
    bytes: int
    extra: dict = field(default_factory=dict)
    streaming: bool = True

    def finish(self, ceilings: Ceilings) -> Row:
        if not self.streaming or self.bytes == 0:
            return self
        self.extra["GB/s"] = self.bytes / self.seconds / 1e9
        self.extra["copy_fraction"] = self.bytes / self.seconds / ceilings.copy_bandwidth
        self.extra["read_floor_ms"] = self.bytes / ceilings.read_bandwidth * 1e3
        return self


def add_speedups(rows: list[Row]) -> None:
    """Give every row but flatmtl's ``flatmtl_speedup``: its time over the flatmtl row's of the same case (op, K, N)."""
    ours = {(r.op, r.K, r.N): r.seconds for r in rows if r.impl == "flatmtl"}
    for r in rows:
        if r.impl != "flatmtl" and (r.op, r.K, r.N) in ours:
            r.extra["flatmtl_speedup"] = r.seconds / ours[(r.op, r.K, r.N)]


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'op':<22}{'impl':<12}{'K':>4}{'N':>11} {'dtype':<9}{'ms':>9}{'GB/s':>7}{'copy%':>7}{'floor ms':>10}"
        f"{'speedup':>9}{'extra MB':>10}{'small us':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        e = r.extra
        # speedup: ours over torch's (primitives), or ours over this peer's (aggregators)
        ratio = e.get("speedup_vs_torch", e.get("flatmtl_speedup"))
        speedup = f"{ratio:.1f}x" if ratio is not None else ""
        memory = "" if "peak_extra_MB" not in e else "n/a" if e["peak_extra_MB"] < 0 else f"{e['peak_extra_MB']:.1f}"
        stream = " " * 24  # GB/s, copy%, floor: streaming passes only
        if "GB/s" in e:
            stream = f"{e['GB/s']:>7.1f}{100 * e['copy_fraction']:>6.0f}%{e['read_floor_ms']:>10.2f}"
        case = f"{r.op:<22}{r.impl:<12}{r.K:>4}{r.N:>11} {r.dtype:<9}{r.seconds * 1e3:>9.2f}"
        small = f"{e['small_step_us']:.0f}" if "small_step_us" in e else ""  # aggregators: a step's host time
        print(f"{case}{stream}{speedup:>9}{memory:>10}{small:>10}")


def write_results(suite: str, device: torch.device, ceilings: Ceilings, rows: list[Row], config: dict) -> Path:
    """Merge this run's rows into bench/results/<device>.json: a row replaces the earlier row of the same
    case (suite, op, impl, K, N, dtype), other rows and suites are kept, so partial runs (one method, one K)
    add to the record instead of erasing it. Each row keeps the time it was measured; the suite keeps the
    latest run's configuration and ceilings."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{device_name(device)}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in rows:
        r.extra.setdefault("when", now)

    def case(row: dict) -> tuple:
        return tuple(row[k] for k in ("suite", "op", "impl", "K", "N", "dtype"))

    merged = {case(row): row for row in data.get(suite, {}).get("rows", [])}
    merged.update({case(row): row for row in map(asdict, rows)})
    data["device"] = device_name(device)
    data["torch"] = torch.__version__
    data[suite] = {
        "when": now,
        "config": config,
        "ceilings_GBps": {"copy": ceilings.copy_bandwidth / 1e9, "read": ceilings.read_bandwidth / 1e9},
        "rows": list(merged.values()),
    }
    path.write_text(json.dumps(data, indent=1))
    return path
