"""pytest-benchmark cases for gram and combine (``python -m pytest bench --benchmark-only``).

Not part of the test suite (testpaths = tests): they time, they never assert a timing.
"""

from __future__ import annotations

import pytest
import torch

import flatmtl_fast

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(K, N, dtype) for K in (2, 3, 10, 40) for N in (10**6, 10**7) for dtype in (torch.float32, torch.bfloat16)]


def _ids(case):
    K, N, dtype = case
    return f"K{K}-N{N:.0e}-{str(dtype)[6:]}"


@pytest.fixture(params=CASES, ids=_ids)
def problem(request):
    K, N, dtype = request.param
    G = torch.randn(K, N, device=DEVICE).to(dtype)
    return G, torch.randn(K, device=DEVICE), torch.empty(N, dtype=dtype, device=DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["flatmtl", "torch"])
def test_gram(benchmark, problem, impl):
    G, _, _ = problem
    fn = flatmtl_fast.gram if impl == "flatmtl" else (lambda g: g @ g.T)
    benchmark.extra_info["bytes"] = G.numel() * G.element_size()
    benchmark(lambda: (fn(G), _sync()))


@pytest.mark.parametrize("impl", ["flatmtl", "torch"])
def test_combine(benchmark, problem, impl):
    G, w, out = problem
    w_cast = w.to(G.dtype)
    if impl == "flatmtl":
        benchmark(lambda: (flatmtl_fast.combine(w, G, out=out), _sync()))
    else:
        benchmark(lambda: (torch.matmul(w_cast, G, out=out), _sync()))
