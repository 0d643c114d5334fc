"""Solve-alone timing: weights(M) per method at several K (median), the K × K part of a step, beside the reference
backend (``flatmtl_fast.reference``) and torchjd's weighting of the same method, on the same matrix in the same run.

torchjd (optional) is given M through its Gramian aggregators' ``gramian_weighting``; its NashMTL, Mean and Random
(our RLW) only weight the matrix itself, so those rows are given G (``extra["input"] = "G"``; torchjd's NashMTL then
forms G Gᵀ inside the timing). Its weightings accept float64: M and G go in as they are, no conversion. Every row but
flatmtl's carries ``flatmtl_speedup``: its time over the flatmtl row's, same method and K. Every call solves the
same M: NashMTL (ours and the reference) then starts from the previous call's solution, its steady state when M
changes little between steps, while torchjd's re-solves its cvxpy problem each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

import flatmtl_fast

from . import aggregators
from .common import Row, add_speedups, median_time

SUITE = "solvers"
GRAMIAN = ["MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "FairGrad", "UPGrad", "DualProj",
           "GradVac", "IMGrad", "RLW", "Mean"]  # fmt: skip
REFERENCE_REPEAT = 3  # the reference's literal loops take up to ~1 s a solve at K = 128


def implementations(device: torch.device) -> dict[str, str | None]:
    """Our row label -> the backend the solves run under (None: ``auto``). On CUDA also the compiled solver kernels,
    which ``auto`` does not pick yet (it runs the on-device torch solvers there): these rows are what decides
    whether it should. The reference and torchjd rows (see ``run``) come beside these."""
    impls: dict[str, str | None] = {"flatmtl": None}
    if device.type == "cuda" and flatmtl_fast.backends()["cuda"] == "available":
        impls["flatmtl-cuda-kernels"] = "cuda"
    return impls


def torchjd_weighting(name: str, K: int) -> tuple[Callable[[Tensor], Tensor], bool] | None:
    """torchjd's solve for method ``name`` (its aggregator from ``aggregators.TORCHJD_PEERS``) and whether it takes G
    rather than M; None where torchjd has no such method or is not installed."""
    peer = aggregators.TORCHJD_PEERS[name]
    if peer is None or not aggregators.torchjd_available():
        return None
    jd = peer(K)
    gramian_weighting = getattr(jd, "gramian_weighting", None)
    return (jd.weighting, True) if gramian_weighting is None else (gramian_weighting, False)


#: A solve row takes at least ``repeat`` calls and, when they are cheap, as many more as fit in ``seconds`` (default
#: SOLVE_SECONDS, up to MAX_SOLVE_REPEAT calls): a solve of tens of µs is then the median of hundreds, which a few
#: milliseconds of another process's load cannot move (on a shared 2-core machine a median of 7 moved by 10×).
SOLVE_SECONDS = 0.1
MAX_SOLVE_REPEAT = 1001


def solve_row(
    name: str, impl: str, solve: Callable[[Tensor], object], x: Tensor, repeat: int, seconds: float = SOLVE_SECONDS
) -> Row:
    """Median time of ``solve(x)`` (x: M, or G for torchjd's weightings of the matrix), as method ``name``'s row."""
    once = median_time(solve, x.device, [(x,)], warmup=1, repeat=1)
    affordable = int(seconds / max(once, 1e-6))
    median = median_time(solve, x.device, [(x,)], repeat=max(repeat, min(affordable, MAX_SOLVE_REPEAT)))
    dtype = str(x.dtype).removeprefix("torch.")
    nbytes = x.numel() * x.element_size()
    return Row(SUITE, f"{name}:solve", impl, x.shape[0], 0, dtype, median, nbytes, streaming=False)


def run(device: torch.device, Ks: list[int], repeat: int, seconds: float = SOLVE_SECONDS) -> list[Row]:
    rows: list[Row] = []
    for K in Ks:
        G = torch.randn(K, 4 * K + 7, dtype=torch.float64, device=device)
        M = G @ G.T
        for name in GRAMIAN:
            for impl, backend in implementations(device).items():
                with flatmtl_fast.use_backend(backend) if backend else contextlib.nullcontext():
                    rows.append(solve_row(name, impl, getattr(flatmtl_fast, name)().weights, M, repeat, seconds))
            reference = getattr(flatmtl_fast.reference, name)()
            rows.append(solve_row(name, "reference", reference.weights, M, min(repeat, REFERENCE_REPEAT), seconds))
            if (peer := torchjd_weighting(name, K)) is not None:
                weighting, takes_G = peer
                rows.append(solve_row(name, "torchjd", weighting, G if takes_G else M, repeat, seconds))
                if takes_G:
                    rows[-1].extra["input"] = "G"
    add_speedups(rows)
    return rows
