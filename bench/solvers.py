"""Solve-alone timing: weights(M) per method at several K (median), the K × K part of a step."""

from __future__ import annotations

import torch

import flatmtl_fast

from .common import Row, median_time

SUITE = "solvers"
GRAMIAN = ["MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "FairGrad", "UPGrad", "DualProj",
           "GradVac", "IMGrad", "RLW", "Mean"]  # fmt: skip


def run(device: torch.device, Ks: list[int], repeat: int) -> list[Row]:
    rows = []
    for K in Ks:
        G = torch.randn(K, 4 * K + 7, dtype=torch.float64, device=device)
        M = G @ G.T
        for name in GRAMIAN:
            agg = getattr(flatmtl_fast, name)()
            seconds = median_time(lambda agg=agg, M=M: agg.weights(M), device, repeat=repeat)
            rows.append(Row(SUITE, f"{name}:solve", "flatmtl", K, 0, "float64", seconds, M.numel() * 8))
    return rows
