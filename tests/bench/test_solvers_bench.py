"""The solve-alone suite (bench/solvers.py) runs end to end on the CPU at small K."""

from __future__ import annotations

import torch

from bench import solvers

CPU = torch.device("cpu")


def test_run_times_every_method_at_every_K() -> None:
    rows = solvers.run(CPU, [2, 5], repeat=1)
    assert [(r.op, r.K) for r in rows] == [(f"{name}:solve", K) for K in (2, 5) for name in solvers.GRAMIAN]
    assert all(r.impl == "flatmtl" and r.seconds > 0 and r.dtype == "float64" for r in rows)


def test_cuda_kernel_rows_only_where_the_cuda_backend_runs() -> None:
    # On CPU tensors auto is the only solver path; the CUDA kernels get their own rows on a GPU.
    assert solvers.implementations(CPU) == {"flatmtl": None}
