"""Parity of every backend's gram/combine with a float64 oracle on fresh random inputs of awkward sizes."""

from __future__ import annotations

import functools

import pytest
import torch
from support.cases import ALL_CASES, U32, combine_tolerance, gram64, gram_tolerance

import flatmtl_fast

DTYPES = [torch.float32, torch.bfloat16]
# Awkward sizes: N = 1, 7 and a prime past every block size; K across tile boundaries (1…256).
# The Triton interpreter runs K·N ≤ 7.1e6 here (it is ~1000× slower); larger shapes run on the
# compiled and reference backends, and Triton's on the GPU marker. K = 256, N = 1000003: test_large_gram_cpp.
SIZES = [(K, N) for K in (1, 2, 3, 7) for N in (1, 7, 1_000_003)] + [
    (K, N) for K in (40, 64, 256) for N in (1, 7, 100_003)
]
LARGE = [(40, 1_000_003), (64, 1_000_003)]
INTERPRETER_MAX_ELEMENTS = 7_100_000


def _params():
    out = []
    for K, N in SIZES + LARGE:
        for dtype in DTYPES:
            for case in ALL_CASES:
                c = case.values[0]
                if K * N > INTERPRETER_MAX_ELEMENTS and c.backend == "triton" and c.device == "cpu":
                    continue
                out.append(pytest.param(c, K, N, dtype, id=f"{c.id}-K{K}-N{N}-{str(dtype)[6:]}", marks=case.marks))
    return out


@functools.lru_cache(maxsize=4)
def _problem(K: int, N: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh inputs (seeded per shape) and their float64 Gram, shared by the backends of one shape."""
    gen = torch.Generator().manual_seed(seed)
    # Rows with different scales and a common component, so the Gram has structure (not ~diagonal).
    base = torch.randn(1, N, generator=gen)
    scales = torch.logspace(-2, 2, K).unsqueeze(1)
    G = (scales * (torch.randn(K, N, generator=gen) + 0.5 * base)).to(dtype)
    return G, gram64(G)


def _fresh(K: int, N: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    return _problem(K, N, dtype, seed)[0].to(device, copy=True)


@pytest.mark.parametrize(("case", "K", "N", "dtype"), _params())
def test_gram_matches_float64(case, K, N, dtype):
    G, expected = _problem(K, N, dtype, seed=K * 1000 + N)
    G = G.to(case.device)
    with case.active():
        M = flatmtl_fast.gram(G)
        M64 = flatmtl_fast.gram(G, dtype=torch.float64)
    assert M.dtype == torch.float32 and M.shape == (K, K)
    assert torch.equal(M, M.T), "gram must be exactly symmetric"
    assert torch.equal(M64.float(), M), "the float32 result is the float64 one rounded"
    err = (M64.cpu() - expected).abs()
    tol = gram_tolerance(G.cpu())
    assert (err <= tol).all(), f"max error/tolerance {(err / tol).max().item():.3g}"


@pytest.mark.parametrize(("case", "K", "N", "dtype"), _params())
def test_combine_matches_float64(case, K, N, dtype):
    G, _ = _problem(K, N, dtype, seed=K * 1000 + N)
    G = G.to(case.device)
    w = torch.randn(K, generator=torch.Generator().manual_seed(N)).to(case.device)
    with case.active():
        d = flatmtl_fast.combine(w, G)
    assert d.dtype == dtype and d.shape == (N,)
    expected = w.double().cpu() @ G.double().cpu()
    err = (d.double().cpu() - expected).abs()
    tol = combine_tolerance(w.cpu(), G.cpu(), dtype)
    assert (err <= tol).all(), f"max error/tolerance {(err / tol).max().item():.3g}"


def test_large_gram_cpp():
    """K = 256, N = 1000003 (1 GB of float32) on the compiled CPU kernels with the best instruction set."""
    G = torch.randn(256, 1_000_003)
    with flatmtl_fast.use_backend("cpp"):
        M = flatmtl_fast.gram(G, dtype=torch.float64)
    expected = gram64(G)
    assert ((M - expected).abs() <= gram_tolerance(G)).all()


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=str)
def test_combine_into_out_with_accumulate_and_alpha(case, out_dtype, g_dtype):
    K, N = 5, 10_007
    G = _fresh(K, N, g_dtype, case.device, seed=3)
    w = torch.randn(K).to(case.device)
    flat_grad = torch.randn(N + 10, dtype=out_dtype, device=case.device)
    original = flat_grad.clone()
    out = flat_grad[3 : 3 + N]  # a view into a larger flat .grad buffer
    with case.active():
        result = flatmtl_fast.combine(w, G, out=out, accumulate=True, alpha=-0.25)
    assert result.data_ptr() == out.data_ptr()
    expected = original[3 : 3 + N].double().cpu() - 0.25 * (w.double().cpu() @ G.double().cpu())
    # the accumulation adds one float32 rounding of the sum (u·|result|) before the output rounding
    tol = combine_tolerance(w.cpu(), G.cpu(), out_dtype, alpha=0.25) + 2 * U32 * expected.abs()
    tol += {torch.float32: 0.0, torch.bfloat16: 2.0**-8}[out_dtype] * expected.abs()
    assert ((out.double().cpu() - expected).abs() <= tol).all()
    assert torch.equal(flat_grad[:3], original[:3]) and torch.equal(flat_grad[3 + N :], original[3 + N :])


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [1, 3, 7, 40])
def test_a_float64_w_is_its_float32_rounding(case, out_dtype, K):
    """The solvers' float64 weights go in as they are (no conversion op, a launch on a GPU): each backend rounds
    them to float32 as it reads them, which gives the bits of combining the rounded weights. The weights carry
    bits below float32's, and some halfway cases, so a backend that kept them in float64 or truncated would
    differ."""
    N = 1009
    G = _fresh(K, N, torch.float32, case.device, seed=K)
    w = torch.randn(K, dtype=torch.float64, generator=torch.Generator().manual_seed(K)).to(case.device)
    w[0] = 1.0 + 2.0**-24  # halfway between two float32s: rounds to even (1.0), truncation and float64 do not
    w[-1] = w[-1] + 2.0**-30 * w[-1]
    out = torch.full((N,), 0.5, dtype=out_dtype, device=case.device)
    expected = out.clone()
    with case.active():
        flatmtl_fast.combine(w, G, out=out, accumulate=True, alpha=0.75)
        flatmtl_fast.combine(w.float(), G, out=expected, accumulate=True, alpha=0.75)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", ALL_CASES)
def test_combine_writes_only_its_view(case):
    N = 4099
    G = _fresh(3, N, torch.float32, case.device, seed=11)
    buffer = torch.full((N + 8,), 7.0, device=case.device)
    with case.active():
        flatmtl_fast.combine(torch.ones(3, device=case.device), G, out=buffer[4 : 4 + N])
    assert torch.equal(buffer[:4], torch.full((4,), 7.0, device=case.device))
    assert torch.equal(buffer[4 + N :], torch.full((4,), 7.0, device=case.device))


@pytest.mark.parametrize("case", ALL_CASES)
def test_column_slice_with_row_stride(case):
    full = _fresh(6, 5000, torch.float32, case.device, seed=5)
    G = full[:, 123:4567]  # rows contiguous, row stride 5000 > N
    w = torch.randn(6, device=case.device)
    with case.active():
        M = flatmtl_fast.gram(G, dtype=torch.float64)
        d = flatmtl_fast.combine(w, G)
    assert ((M - gram64(G)).abs() <= gram_tolerance(G)).all()
    assert ((d.double() - w.double() @ G.double()).abs() <= combine_tolerance(w, G, torch.float32)).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_gram_is_deterministic(case):
    G = _fresh(9, 300_001, torch.float32, case.device, seed=9)
    with case.active():
        first = flatmtl_fast.gram(G, dtype=torch.float64)
        second = flatmtl_fast.gram(G, dtype=torch.float64)
    assert torch.equal(first, second)


def test_cpp_gram_does_not_depend_on_thread_count():
    G = _fresh(7, 1_000_003, torch.float32, "cpu", seed=1)
    previous = torch.get_num_threads()
    try:
        with flatmtl_fast.use_backend("cpp"):
            torch.set_num_threads(1)
            one = flatmtl_fast.gram(G, dtype=torch.float64)
            torch.set_num_threads(2)
            two = flatmtl_fast.gram(G, dtype=torch.float64)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_cpp_gram_accuracy_target():
    """Issue target: ≤ 1e-6 relative to float64 (norm-wise) at K = 10, N = 1e6."""
    G = _fresh(10, 1_000_000, torch.float32, "cpu", seed=2)
    with flatmtl_fast.use_backend("cpp"):
        M = flatmtl_fast.gram(G, dtype=torch.float64)
    expected = gram64(G)
    assert (M - expected).norm() / expected.norm() <= 1e-6


@pytest.mark.parametrize("case", ALL_CASES)
def test_non_finite_propagates_to_the_diagonal(case):
    G = _fresh(4, 1000, torch.float32, case.device, seed=4)
    G[1, 17] = float("nan")
    G[3, 999] = float("inf")
    with case.active():
        M = flatmtl_fast.gram(G)
        with pytest.raises(FloatingPointError, match=r"rows \[1, 3\]"):
            flatmtl_fast.gram(G, check_finite=True)
    assert not M[1, 1].isfinite() and not M[3, 3].isfinite()
    assert M[0, 0].isfinite() and M[2, 2].isfinite() and M[0, 2].isfinite()


def test_a_float64_G_is_served_in_float64():
    """float64 G (a float64 model): auto takes the reference primitives, every product and sum in float64 (w kept
    in float64 too), so the errors are float64 rounding: at most n·u·Σ|terms| for a sum of n terms. The compiled
    backends take 16- and 32-bit floats only and say so when chosen explicitly."""
    K, N = 7, 100_003
    G = torch.randn(K, N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w = torch.randn(K, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 1e-3
    u = 2.0**-53
    M = flatmtl_fast.gram(G, dtype=torch.float64)
    assert ((M - G @ G.T).abs() <= 2 * N * u * (G.abs() @ G.abs().T)).all()
    d = flatmtl_fast.combine(w, G)
    assert d.dtype == torch.float64
    assert ((d - w @ G).abs() <= 2 * K * u * (w.abs() @ G.abs())).all()  # w not rounded to float32 (~1e-8)
    norms = flatmtl_fast.row_norms(G)
    assert ((norms - G.norm(dim=1)).abs() <= 2 * N * u * norms).all()
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="float64"):
        flatmtl_fast.gram(G)
