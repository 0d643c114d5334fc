"""The solve-alone suite (bench/solvers.py) runs end to end on the CPU at small K, with the reference and torchjd
rows beside ours."""

from __future__ import annotations

import pytest
import torch

from bench import aggregators, solvers

CPU = torch.device("cpu")
NO_TORCHJD_PEER = {"IMGrad"}
TORCHJD_GIVEN_G = {"NashMTL", "Mean", "RLW"}  # torchjd weights the matrix itself, not its Gramian


def cases(rows: list[solvers.Row]) -> dict[tuple[str, int], dict[str, solvers.Row]]:
    """(method, K) -> impl -> row."""
    out: dict[tuple[str, int], dict[str, solvers.Row]] = {}
    for r in rows:
        out.setdefault((r.op.removesuffix(":solve"), r.K), {})[r.impl] = r
    return out


def test_run_times_every_method_at_every_K_beside_reference_and_torchjd() -> None:
    rows = solvers.run(CPU, [2, 5], repeat=1, seconds=0.0)
    assert all(r.op.endswith(":solve") and r.seconds > 0 and r.dtype == "float64" for r in rows)
    by_case = cases(rows)
    assert list(by_case) == [(name, K) for K in (2, 5) for name in solvers.GRAMIAN]
    with_torchjd = aggregators.torchjd_available()
    for (name, K), impls in by_case.items():
        expected = ["flatmtl", "reference"] + (["torchjd"] if with_torchjd and name not in NO_TORCHJD_PEER else [])
        assert list(impls) == expected, (name, K)
        flat = impls.pop("flatmtl")
        assert "flatmtl_speedup" not in flat.extra
        for impl, r in impls.items():
            assert r.extra["flatmtl_speedup"] == pytest.approx(r.seconds / flat.seconds), (name, K, impl)
        if "torchjd" in impls:
            given_G = name in TORCHJD_GIVEN_G
            assert impls["torchjd"].extra.get("input") == ("G" if given_G else None), name
            assert impls["torchjd"].bytes == K * (4 * K + 7 if given_G else K) * 8, name


def test_without_torchjd_only_our_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregators, "torchjd_available", lambda: False)
    rows = solvers.run(CPU, [3], repeat=1, seconds=0.0)
    assert [(r.op, r.impl) for r in rows] == [
        (f"{name}:solve", impl) for name in solvers.GRAMIAN for impl in ("flatmtl", "reference")
    ]


def test_torchjd_weighting_is_the_gramian_one_where_torchjd_has_it() -> None:
    pytest.importorskip("torchjd")
    for name in solvers.GRAMIAN:
        peer = solvers.torchjd_weighting(name, 4)
        assert (peer is None) == (name in NO_TORCHJD_PEER), name
        if peer is not None:
            assert peer[1] == (name in TORCHJD_GIVEN_G), name


def test_cuda_kernel_rows_only_where_the_cuda_backend_runs() -> None:
    # On CPU tensors auto is the only solver path; the CUDA kernels get their own rows on a GPU.
    assert solvers.implementations(CPU) == {"flatmtl": None}
