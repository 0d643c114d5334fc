"""Benchmark of the aggregators: the full step (gram + solve + combine) and the solve alone, per method,
beside the reference backend and torchjd's aggregator of the same method, on the same matrix.

Bytes counted for the fused step: the two-read floor (G read by gram, G read again by combine, d
written once). Peak extra memory: on CUDA from the caching allocator's high-water mark around one step;
on the CPU separately, in a fresh process per case (see ``peak_extra_memory``), because the CPU allocator
offers no resettable high-water mark.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable

import torch

import flatmtl_fast

from .common import Row, cuda_peak_bytes, median_time, rotation

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


def _torchjd(name: str):
    return getattr(importlib.import_module("torchjd.aggregation"), name)


def torchjd_available() -> bool:
    return importlib.util.find_spec("torchjd") is not None


def _ours(name: str, impl: str):
    return getattr(flatmtl_fast.reference if impl == "reference" else flatmtl_fast, name)()


def measure_method(name: str, device: torch.device, K: int, N: int, repeat: int) -> list[Row]:
    """Full step for fused / reference / torchjd, and the weights-only solve for the fused path."""
    G = torch.randn(K, N, device=device)
    losses = torch.rand(K, device=device) + 0.5 if name in NEEDS_LOSSES else None
    inputs = rotation(G, torch.empty(N, device=device))
    two_reads = 2 * G.numel() * G.element_size() + N * 4
    rows: list[Row] = []

    def add(op: str, impl: str, fn: Callable, step_inputs: list, nbytes: int, repeat: int = repeat) -> None:
        row = Row(
            SUITE, f"{name}:{op}", impl, K, N, "float32", median_time(fn, device, step_inputs, repeat=repeat), nbytes
        )
        if device.type == "cuda" and op == "step":
            peak, base = cuda_peak_bytes(lambda: fn(*inputs[0]), device)
            row.extra["peak_extra_MB"] = (peak - base) / 1e6
        rows.append(row)

    fused = _ours(name, "fused")
    add("step", "flatmtl", lambda g, o: fused(g, losses, out=o), inputs, two_reads)
    if hasattr(fused, "weights"):
        M = flatmtl_fast.gram(G, dtype=torch.float64)
        add("solve", "flatmtl", lambda: fused.weights(M, losses), [()], M.numel() * 8)
    reference = _ours(name, "reference")
    add("step", "reference", lambda g, o: reference(g, losses), inputs[:2], two_reads, repeat=3)
    peer = TORCHJD_PEERS.get(name)
    if peer is not None and torchjd_available():
        jd = peer(K)
        add("step", "torchjd", lambda g, o: jd(g), inputs, two_reads)
    flat = next(r for r in rows if r.impl == "flatmtl" and r.op.endswith("step")).seconds
    for r in rows:
        if r.op.endswith("step") and r.impl != "flatmtl":
            r.extra["flatmtl_speedup"] = r.seconds / flat
    return rows


def peak_extra_memory(name: str, impl: str, K: int, N: int) -> int:
    """Bytes of memory the aggregation adds above its inputs, measured in a fresh CPU process.

    Uses VmHWM of /proc/self/status, reset through /proc/self/clear_refs right before the call
    (ru_maxrss would not do: a child inherits its parent's high-water mark at fork). Linux only.
    """
    code = f"""
import re, torch, flatmtl_fast, flatmtl_fast.reference
from bench.aggregators import TORCHJD_PEERS, NEEDS_LOSSES, _ours

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
base = status("VmRSS")  # inputs allocated and touched
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
call()
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        return -1
    return int(json.loads(result.stdout.strip().splitlines()[-1]))
