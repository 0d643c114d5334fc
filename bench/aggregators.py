"""Benchmark of the aggregators: the full step (gram + solve + combine) and the solve alone, per method,
beside the reference backend and torchjd's aggregator of the same method, on the same matrix.

Bytes counted for the fused step: what the method must move at least (``floor_bytes``): for Gramian methods
the two-read floor (G read by gram, G read again by combine, d written once); GradDrop's one pass reads G
once; DB-MTL's EMA state B (K × N float32) is read and written by the update and read again by the combination.

Each step row also carries ``small_step_us``: the same step on a K × SMALL_N matrix, whose kernels take next to
nothing, so it is the host time (Python, dispatch, launches) below which a step cannot go; on a GPU, a step at large
N whose own time is near it is host-bound.

Peak extra memory: on CUDA from the caching allocator's high-water mark around one step; on the CPU
separately, in a fresh process per case (see ``peak_extra_memory``), because the CPU allocator offers no
resettable high-water mark.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable

import torch

import flatmtl_fast

from .common import Row, add_speedups, cuda_peak_bytes, median_time, rotation

SUITE = "aggregators"

# Our class name -> a factory of torchjd's aggregator of the same method (same hyper-parameters), or None.
TORCHJD_PEERS: dict[str, Callable[[int], object] | None] = {
    "Mean": lambda K: _torchjd("Mean")(),
    "Sum": lambda K: _torchjd("Sum")(),
    "MGDA": lambda K: _torchjd("MGDA")(),
    "PCGrad": lambda K: _torchjd("PCGrad")(),
    "CAGrad": lambda K: _torchjd("CAGrad")(c=0.4),
    "IMTLG": lambda K: _torchjd("IMTLG")(),
    "NashMTL": lambda K: _torchjd("NashMTL")(n_tasks=K),
    "AlignedMTL": lambda K: _torchjd("AlignedMTL")(),
    "FairGrad": lambda K: _torchjd("FairGrad")(alpha=1.0),
    "UPGrad": lambda K: _torchjd("UPGrad")(),
    "DualProj": lambda K: _torchjd("DualProj")(),
    "GradVac": lambda K: _torchjd("GradVac")(beta=0.01),
    "GradDrop": lambda K: _torchjd("GradDrop")(),
    "RLW": lambda K: _torchjd("Random")(),
    "DBMTL": None,
    "IMGrad": None,
}
NEEDS_LOSSES = {"DBMTL"}
SMALL_N = 256
SMALL_REPEAT = 101
KEEPS_KN_STATE = {"DBMTL"}  # its EMA buffer, allocated at the first step


def _torchjd(name: str):
    return getattr(importlib.import_module("torchjd.aggregation"), name)


def torchjd_available() -> bool:
    return importlib.util.find_spec("torchjd") is not None


def _ours(name: str, impl: str):
    return getattr(flatmtl_fast.reference if impl == "reference" else flatmtl_fast, name)()


def floor_bytes(name: str, G: torch.Tensor) -> int:
    """Bytes the step of method ``name`` must move on G (K × N), d (N float32) included (see the module doc)."""
    g_bytes, d_bytes = G.numel() * G.element_size(), G.shape[1] * 4
    if name == "GradDrop":
        return g_bytes + d_bytes
    if name == "DBMTL":
        return g_bytes + 3 * G.numel() * 4 + d_bytes
    return 2 * g_bytes + d_bytes


def measure_method(name: str, device: torch.device, K: int, N: int, repeat: int) -> list[Row]:
    """Full step for fused / reference / torchjd, and the weights-only solve for the fused path."""
    G = torch.randn(K, N, device=device)
    losses = torch.rand(K, device=device) + 0.5 if name in NEEDS_LOSSES else None
    inputs = rotation(G, torch.empty(N, device=device))
    small = [(torch.randn(K, SMALL_N, device=device), torch.empty(SMALL_N, device=device))]
    floor = floor_bytes(name, G)
    rows: list[Row] = []

    def step_of(impl: str) -> Callable:
        """The step (G, out) of a fresh aggregator of ``impl``: state kept between steps (DB-MTL's K × N buffer)
        belongs to one N."""
        if impl == "torchjd":
            jd = TORCHJD_PEERS[name](K)
            return lambda g, o: jd(g)
        agg = _ours(name, impl)
        return (lambda g, o: agg(g, losses)) if impl == "reference" else (lambda g, o: agg(g, losses, out=o))

    def add_step(impl: str, repeat: int = repeat) -> None:
        step = step_of(impl)
        seconds = median_time(step, device, inputs if impl != "reference" else inputs[:2], repeat=repeat)
        row = Row(SUITE, f"{name}:step", impl, K, N, "float32", seconds, floor)
        row.extra["small_step_us"] = median_time(step_of(impl), device, small, repeat=SMALL_REPEAT) * 1e6
        if device.type == "cuda":
            peak, base = cuda_peak_bytes(lambda: step(*inputs[0]), device)
            row.extra["peak_extra_MB"] = (peak - base) / 1e6
        rows.append(row)

    add_step("flatmtl")
    fused = _ours(name, "flatmtl")
    if hasattr(fused, "weights"):
        M = flatmtl_fast.gram(G, dtype=torch.float64)
        seconds = median_time(lambda: fused.weights(M, losses), device, repeat=repeat)
        rows.append(Row(SUITE, f"{name}:solve", "flatmtl", K, N, "float32", seconds, M.numel() * 8, streaming=False))
    add_step("reference", repeat=3)
    if TORCHJD_PEERS.get(name) is not None and torchjd_available():
        add_step("torchjd")
    add_speedups(rows)
    return rows


def peak_extra_memory(name: str, impl: str, K: int, N: int) -> int:
    """Bytes of memory one aggregation step adds above its inputs (and the state it keeps between steps: measured
    at the second step for KEEPS_KN_STATE), in a fresh CPU process. Only those methods take a first step before
    the measurement: the allocator could serve a second step from memory the first one freed.

    Uses VmHWM of /proc/self/status, reset through /proc/self/clear_refs right before the call
    (ru_maxrss would not do: a child inherits its parent's high-water mark at fork). Linux only.
    """
    code = f"""
import re, torch, flatmtl_fast, flatmtl_fast.reference
from bench.aggregators import KEEPS_KN_STATE, TORCHJD_PEERS, NEEDS_LOSSES, _ours

def run(K, N):
    G = torch.randn(K, N); out = torch.zeros(N)
    losses = torch.rand(K) + 0.5 if {name!r} in NEEDS_LOSSES else None
    agg = TORCHJD_PEERS[{name!r}](K) if {impl!r} == "torchjd" else _ours({name!r}, {impl!r})
    if {impl!r} == "torchjd":
        return G, lambda: agg(G)
    if {impl!r} == "reference":
        return G, lambda: agg(G, losses)
    return G, lambda: agg(G, losses, out=out)

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

run({K}, 4096)[1]()  # lazy imports and caches on a small problem, so they do not count
G, call = run({K}, {N})
if {name!r} in KEEPS_KN_STATE:
    call()  # a first step allocates the K x N state kept between steps: not per-step memory
base = status("VmRSS")  # inputs (and state) allocated and touched
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
call()
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        return -1
    return int(json.loads(result.stdout.strip().splitlines()[-1]))
