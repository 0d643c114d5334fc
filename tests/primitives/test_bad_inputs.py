"""Bad input raises a clear error naming the argument, before any kernel runs, on every backend."""

from __future__ import annotations

import pytest
import torch
from support.cases import ALL_CASES

import flatmtl_fast


@pytest.fixture(params=ALL_CASES)
def case(request):
    with request.param.active():
        yield request.param


def _G(case, K=3, N=10, dtype=torch.float32):
    return torch.randn(K, N, device=case.device).to(dtype)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda d: torch.randn(10, device=d), ValueError, r"G must have shape \(K, N\)"),
        (lambda d: torch.randn(2, 3, 4, device=d), ValueError, r"G must have shape \(K, N\)"),
        (lambda d: torch.randn(0, 10, device=d), ValueError, "G is empty"),
        (lambda d: torch.randn(3, 0, device=d), ValueError, "G is empty"),
        (lambda d: torch.randn(3, 10, device=d).double(), TypeError, "G must have dtype"),
        (lambda d: torch.ones(3, 10, dtype=torch.int32, device=d), TypeError, "G must have dtype"),
        (lambda d: torch.randn(10, 3, device=d).T, ValueError, "rows of G must be contiguous"),
        (lambda d: torch.randn(1, 10, device=d).expand(3, 10), ValueError, "rows of G overlap"),
        (lambda d: torch.randn(flatmtl_fast.MAX_K + 1, 2, device=d), ValueError, "at most K = 1024"),
        (lambda d: torch.randn(3, 10, device=d, requires_grad=True), ValueError, "not differentiable"),
        (lambda d: [[1.0, 2.0]], TypeError, "G must be a torch.Tensor"),
    ],
)
def test_bad_G(case, make, error, match):
    G = make(case.device)
    with pytest.raises(error, match=match):
        flatmtl_fast.gram(G)
    with pytest.raises(error, match=match):
        flatmtl_fast.combine(torch.ones(3, device=case.device), G)


def test_bad_gram_dtype(case):
    with pytest.raises(TypeError, match="gram: dtype must be"):
        flatmtl_fast.gram(_G(case), dtype=torch.bfloat16)


def test_bad_weights(case):
    G = _G(case)
    with pytest.raises(ValueError, match=r"w must have shape \(3,\)"):
        flatmtl_fast.combine(torch.ones(4, device=case.device), G)
    with pytest.raises(ValueError, match=r"w must have shape \(3,\)"):
        flatmtl_fast.combine(torch.ones(1, 3, device=case.device), G)
    with pytest.raises(TypeError, match="w must be a floating tensor"):
        flatmtl_fast.combine(torch.ones(3, dtype=torch.int64, device=case.device), G)
    with pytest.raises(TypeError, match=r"w must be a torch\.Tensor"):
        flatmtl_fast.combine([1.0, 1.0, 1.0], G)


def test_bad_out(case):
    G = _G(case)
    w = torch.ones(3, device=case.device)
    with pytest.raises(ValueError, match=r"out must have shape \(10,\)"):
        flatmtl_fast.combine(w, G, out=torch.empty(11, device=case.device))
    with pytest.raises(ValueError, match="out must be contiguous"):
        flatmtl_fast.combine(w, G, out=torch.empty(20, device=case.device)[::2])
    with pytest.raises(TypeError, match="out must have dtype"):
        flatmtl_fast.combine(w, G, out=torch.empty(10, dtype=torch.float64, device=case.device))
    with pytest.raises(ValueError, match="out overlaps G"):
        flatmtl_fast.combine(w, G, out=G[1])
    with pytest.raises(ValueError, match="out overlaps w"):
        buffer = torch.zeros(13, device=case.device)
        flatmtl_fast.combine(buffer[:3], G, out=buffer[2:12])
    with pytest.raises(ValueError, match="out requires grad"):
        flatmtl_fast.combine(w, G, out=torch.zeros(10, device=case.device, requires_grad=True))
    with pytest.raises(ValueError, match="accumulate=True needs an out buffer"):
        flatmtl_fast.combine(w, G, accumulate=True)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        flatmtl_fast.combine(w, G, alpha=torch.tensor(2.0))


def test_mismatched_devices():
    G = torch.randn(3, 10)
    with pytest.raises(ValueError, match="w is on meta but G is on cpu"):
        flatmtl_fast.combine(torch.ones(3, device="meta"), G)
    with pytest.raises(ValueError, match="out is on meta but G is on cpu"):
        flatmtl_fast.combine(torch.ones(3), G, out=torch.empty(10, device="meta"))


def test_explicit_backend_that_cannot_run_raises():
    G = torch.randn(3, 10)
    with flatmtl_fast.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run gram"):
        flatmtl_fast.gram(G)
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend reads and writes"):
        flatmtl_fast.gram(G.half())


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend\\(name\\) must be one of"):
        with flatmtl_fast.use_backend("fast"):
            pass
