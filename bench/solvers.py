"""Solve-alone timing: weights(M) per method at several K (median), the K × K part of a step."""

from __future__ import annotations

import contextlib

import torch

import flatmtl_fast

from .common import Row, median_time

SUITE = "solvers"
GRAMIAN = ["MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "FairGrad", "UPGrad", "DualProj",
           "GradVac", "IMGrad", "RLW", "Mean"]  # fmt: skip


def implementations(device: torch.device) -> dict[str, str | None]:
    """Row label -> the backend the solves run under (None: ``auto``). On CUDA also the compiled solver kernels,
    which ``auto`` does not pick yet (it runs the on-device torch solvers there): these rows are what decides
    whether it should."""
    impls: dict[str, str | None] = {"flatmtl": None}
    if device.type == "cuda" and flatmtl_fast.backends()["cuda"] == "available":
        impls["flatmtl-cuda-kernels"] = "cuda"
    return impls


def run(device: torch.device, Ks: list[int], repeat: int) -> list[Row]:
    rows = []
    for K in Ks:
        G = torch.randn(K, 4 * K + 7, dtype=torch.float64, device=device)
        M = G @ G.T
        for impl, backend in implementations(device).items():
            with flatmtl_fast.use_backend(backend) if backend else contextlib.nullcontext():
                for name in GRAMIAN:
                    agg = getattr(flatmtl_fast, name)()
                    seconds = median_time(lambda agg=agg, M=M: agg.weights(M), device, repeat=repeat)
                    rows.append(Row(SUITE, f"{name}:solve", impl, K, 0, "float64", seconds, M.numel() * 8))
    return rows
