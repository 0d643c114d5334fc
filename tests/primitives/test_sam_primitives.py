"""F-MTL's per-task SAM primitives row_norms and perturb: every backend against an independent float64 oracle
on fresh random inputs of awkward sizes, exactness on small integers, determinism, aliasing, custom ops."""

from __future__ import annotations

import functools

import pytest
import torch
from support.cases import (
    ALL_CASES,
    CPU_CASES,
    NORM_SIZES,
    U32,
    exact_norms,
    fits_interpreter,
    norm_tolerance,
    norms64,
    scaled_rows,
)

import flatmtl_fast
from flatmtl_fast.primitives.ops import perturb_op, row_norms_op

DTYPES = [torch.float32, torch.bfloat16]
PERTURB_SIZES = [1, 7, 100_003, 1_000_003]
# Output rounding of perturb: out's dtype after the float32 result; bfloat16/float16 may round twice
# (float64 -> float32 -> 16 bits against the oracle's single rounding), so one full ulp, not half.
OUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Below the normal range the rounding is absolute: the spacing of out's subnormals (float16's start at 6e-5).
OUT_SUBNORMAL = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _supported(case, *dtypes: torch.dtype) -> bool:
    """The cpp backend reads float32 and bfloat16 only (test_bad_inputs checks that it says so): such
    combinations are left out at collection, not skipped."""
    return not (case.backend == "cpp" and torch.float16 in dtypes)


def _case_dtype_params(dtype_tuples) -> list:
    """ALL_CASES × ``dtype_tuples`` (each a tuple of dtypes) less what the case's backend does not read."""
    return [
        pytest.param(param.values[0], *dtypes, id=f"{param.id}-{'-'.join(map(_dtype_id, dtypes))}", marks=param.marks)
        for dtypes in dtype_tuples
        for param in ALL_CASES
        if _supported(param.values[0], *dtypes)
    ]


def _vector(N: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _norm_params():
    out = []
    for K, N in NORM_SIZES:
        for dtype in DTYPES:
            for weighted in (False, True):
                for param in ALL_CASES:
                    case = param.values[0]
                    if fits_interpreter(case, K * N):
                        name = f"{case.id}-K{K}-N{N}-{_dtype_id(dtype)}-{'weighted' if weighted else 'plain'}"
                        out.append(pytest.param(case, K, N, dtype, weighted, id=name, marks=param.marks))
    return out


@functools.lru_cache(maxsize=1)
def _norms_problem(K: int, N: int, dtype: torch.dtype, weighted: bool) -> tuple:
    """Inputs and their oracle, shared by the backends of one shape (the parameters run backend-innermost)."""
    G = scaled_rows(K, N, dtype, seed=K * 1000 + N)
    weight = _vector(N, dtype, seed=N) if weighted else None
    return G, weight, norms64(G, weight)


@pytest.mark.parametrize(("case", "K", "N", "dtype", "weighted"), _norm_params())
def test_row_norms_match_float64(case, K, N, dtype, weighted):
    G, weight, expected = _norms_problem(K, N, dtype, weighted)
    G = G.to(case.device)
    weight = None if weight is None else weight.to(case.device)
    with case.active():
        norms = flatmtl_fast.row_norms(G, weight=weight)
    assert norms.dtype == torch.float64 and norms.shape == (K,) and norms.device == G.device
    err = (norms.cpu() - expected).abs()
    tol = norm_tolerance(expected)
    assert (err <= tol).all(), f"max error/tolerance {(err / tol).max().item():.3g}"


@pytest.mark.parametrize(
    ("case", "g_dtype", "w_dtype"),
    _case_dtype_params(
        [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
    ),
)
def test_row_norms_weight_of_another_dtype(case, g_dtype, w_dtype):
    K, N = 3, 10_007
    G = scaled_rows(K, N, g_dtype, seed=7).to(case.device)
    weight = _vector(N, w_dtype, seed=8).to(case.device)
    with case.active():
        norms = flatmtl_fast.row_norms(G, weight=weight)
    expected = norms64(G, weight)
    assert ((norms.cpu() - expected).abs() <= norm_tolerance(expected)).all()


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_row_norms_exact_on_small_integers(case, weighted, dtype):
    """Integers |g| ≤ 3, |w| ≤ 2: every square is ≤ 36 and exact, every float32 partial sum covers at most
    4096 squares (see norm_tolerance), so stays below 2²⁴ and is exact, and so is the float64 total. The
    result is then the correctly rounded square root of an integer: any dropped, repeated or misplaced
    element (which the relative tolerance above could miss at N ~ 1e6) changes it."""
    K, N = 5, 300_007
    gen = torch.Generator().manual_seed(12)
    G = torch.randint(-3, 4, (K, N), generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (N,), generator=gen).to(dtype) if weighted else None
    squares = G.long().square() * (1 if weight is None else weight.long().square())
    expected = exact_norms(squares, case.backend)
    with case.active():
        norms = flatmtl_fast.row_norms(G.to(case.device), weight=None if weight is None else weight.to(case.device))
    assert torch.equal(norms.cpu(), expected)


@pytest.mark.parametrize("case", ALL_CASES)
def test_row_norms_of_a_column_slice(case):
    full = scaled_rows(6, 5000, torch.float32, seed=5).to(case.device)
    G = full[:, 123:4567]  # rows contiguous, row stride 5000 > N
    weight = _vector(5000, torch.float32, seed=6).to(case.device)[123:4567]
    with case.active():
        norms = flatmtl_fast.row_norms(G, weight=weight)
    expected = norms64(G, weight)
    assert ((norms.cpu() - expected).abs() <= norm_tolerance(expected)).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_row_norms_non_finite_stays_in_its_row(case):
    G = scaled_rows(4, 1000, torch.float32, seed=4).to(case.device, copy=True)
    G[1, 17] = float("nan")
    G[3, 999] = float("inf")
    with case.active():
        norms = flatmtl_fast.row_norms(G).cpu()
    assert norms[1].isnan() and norms[3].isinf()
    assert norms[0].isfinite() and norms[2].isfinite()


@pytest.mark.parametrize("case", ALL_CASES)
def test_row_norms_are_deterministic(case):
    G = scaled_rows(9, 200_003, torch.float32, seed=9).to(case.device)
    weight = _vector(200_003, torch.float32, seed=10).to(case.device)
    with case.active():
        first = flatmtl_fast.row_norms(G, weight=weight)
        second = flatmtl_fast.row_norms(G, weight=weight)
    assert torch.equal(first, second)


def test_cpp_row_norms_do_not_depend_on_thread_count():
    G = scaled_rows(7, 1_000_003, torch.float32, seed=1)
    weight = _vector(1_000_003, torch.bfloat16, seed=2)
    previous = torch.get_num_threads()
    try:
        with flatmtl_fast.use_backend("cpp"):
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(flatmtl_fast.row_norms(G, weight=weight))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_cpp_row_offsets_past_int32():
    """Two rows 2³¹+4099 elements apart (address space only: unwritten pages cost no memory)."""
    N, stride = 1000, 2**31 + 4099
    storage = torch.empty(stride + N, dtype=torch.bfloat16)
    G = storage.as_strided((2, N), (stride, 1))
    G.copy_(scaled_rows(2, N, torch.bfloat16, seed=3))
    weight = _vector(N, torch.float32, seed=4)
    with flatmtl_fast.use_backend("cpp"):
        norms = flatmtl_fast.row_norms(G, weight=weight)
    expected = norms64(G, weight)
    assert ((norms - expected).abs() <= norm_tolerance(expected)).all()


# --------------------------------------------------------------------------------------------------
# perturb


def perturb64(base: torch.Tensor, direction: torch.Tensor, scale: float, adaptive: bool) -> tuple:
    """The oracle in float64 from the stored inputs: (expected, |scale · step|)."""
    b, d = base.cpu().double(), direction.cpu().double()
    step = scale * (b * b * d if adaptive else d)
    return b + step, step.abs()


def perturb_tolerance(expected: torch.Tensor, step: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Element-wise bound for |out − (b + s t)|, t = b² d (adaptive) or d.

    In float32: s rounds to float32 once, b² once, · d once, · s once (each relative to its own result,
    so ≤ 4u·|s t| together), + b once (u of the float32 result ≤ u·|b + s t| + u·4u|s t|); we allow
    6u·|s t| + 2u·|b + s t|. Then out's rounding of the result (OUT_ROUNDING, or OUT_SUBNORMAL if tiny).
    """
    return 6 * U32 * step + (2 * U32 + OUT_ROUNDING[out_dtype]) * expected.abs() + OUT_SUBNORMAL[out_dtype]


def _perturb_params():
    out = []
    for N in PERTURB_SIZES:
        for dtype in DTYPES:
            for dir_dtype in DTYPES:
                for adaptive in (False, True):
                    for param in ALL_CASES:
                        case = param.values[0]
                        if fits_interpreter(case, N):
                            name = (
                                f"{case.id}-N{N}-{_dtype_id(dtype)}-dir_{_dtype_id(dir_dtype)}-"
                                f"{'adaptive' if adaptive else 'plain'}"
                            )
                            out.append(pytest.param(case, N, dtype, dir_dtype, adaptive, id=name, marks=param.marks))
    return out


def _sam_inputs(N: int, dtype: torch.dtype, dir_dtype: torch.dtype, device: str):
    """A saved copy of θ, a task gradient as a row view of a K × N buffer, and per-task scales (K,) float64."""
    base = _vector(N, dtype, seed=N + 1).to(device)
    G = scaled_rows(3, N, dir_dtype, seed=N + 2).to(device)
    scales = torch.tensor([0.25, 0.7, 1.5], dtype=torch.float64, device=device)
    return base, G, scales


@functools.lru_cache(maxsize=1)
def _perturb_problem(N: int, dtype: torch.dtype, dir_dtype: torch.dtype, adaptive: bool) -> tuple:
    """Inputs and their oracle, shared by the backends of one case (the parameters run backend-innermost)."""
    base, G, scales = _sam_inputs(N, dtype, dir_dtype, "cpu")
    return base, G, scales, *perturb64(base, G[1], 0.7, adaptive)


@pytest.mark.parametrize(("case", "N", "dtype", "dir_dtype", "adaptive"), _perturb_params())
def test_perturb_matches_float64(case, N, dtype, dir_dtype, adaptive):
    base, G, scales, expected, step = _perturb_problem(N, dtype, dir_dtype, adaptive)
    base, G, scales = base.to(case.device, copy=True), G.to(case.device), scales.to(case.device)
    original = base.clone()
    out = torch.empty(N, dtype=dtype, device=case.device)
    with case.active():
        result = flatmtl_fast.perturb(base, G[1], scales[1:2], out=out, adaptive=adaptive)
    assert result is out and out.dtype == dtype
    assert torch.equal(base, original), "base is read only"
    err = (out.cpu().double() - expected).abs()
    tol = perturb_tolerance(expected, step, dtype)
    assert (err <= tol).all(), f"max error/tolerance {(err / tol).max().item():.3g}"


@pytest.mark.parametrize(("case", "dtype"), _case_dtype_params([(d,) for d in (*DTYPES, torch.float16)]))
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_perturb_in_place_equals_out_of_place(case, dtype, adaptive):
    """out = base (the live parameters updated in place) gives the same bits as a separate buffer."""
    N = 70_001
    base, G, scales = _sam_inputs(N, dtype, torch.float32, case.device)
    separate = torch.empty_like(base)
    live = base.clone()
    with case.active():
        flatmtl_fast.perturb(base, G[2], scales[2], out=separate, adaptive=adaptive)
        result = flatmtl_fast.perturb(live, G[2], scales[2], out=live, adaptive=adaptive)
    assert result is live
    assert torch.equal(live, separate)
    expected, step = perturb64(base, G[2], 1.5, adaptive)
    assert ((live.cpu().double() - expected).abs() <= perturb_tolerance(expected, step, dtype)).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_perturb_writes_only_its_view_and_restores_exactly(case):
    """The SAM round trip on a view of a larger flat buffer: perturb in place, restore with copy_."""
    N = 4099
    flat = _vector(N + 8, torch.float32, seed=3).to(case.device)
    original = flat.clone()
    live = flat[4 : 4 + N]
    saved = live.clone()
    G = scaled_rows(2, N, torch.bfloat16, seed=4).to(case.device)
    with case.active():
        flatmtl_fast.perturb(saved, G[0], torch.tensor(0.5, device=case.device), out=live, adaptive=True)
    assert torch.equal(flat[:4], original[:4]) and torch.equal(flat[4 + N :], original[4 + N :])
    assert not torch.equal(live, saved)
    live.copy_(saved)
    assert torch.equal(flat, original)


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize(
    "make_scale",
    [
        lambda d: torch.tensor(0.7, device=d),  # 0-d float32
        lambda d: torch.tensor([0.7], dtype=torch.float64, device=d),
        lambda d: torch.tensor([9.0, 0.7, 9.0], dtype=torch.float64, device=d)[1],  # an element of per-task scales
    ],
    ids=["0d-float32", "1-float64", "view-float64"],
)
def test_perturb_reads_every_scale_form(case, make_scale):
    N = 1001
    base, G, _ = _sam_inputs(N, torch.float32, torch.float32, case.device)
    out = torch.empty_like(base)
    with case.active():
        flatmtl_fast.perturb(base, G[0], make_scale(case.device), out=out)
    expected, step = perturb64(base, G[0], 0.7, adaptive=False)
    # 0.7 is rounded to float32 once more in the first form: within the 6u·|s t| already allowed
    assert ((out.cpu().double() - expected).abs() <= perturb_tolerance(expected, step, torch.float32)).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_perturb_is_deterministic(case):
    base, G, scales = _sam_inputs(300_001, torch.bfloat16, torch.float32, case.device)
    first, second = torch.empty_like(base), torch.empty_like(base)
    with case.active():
        flatmtl_fast.perturb(base, G[1], scales[1:2], out=first, adaptive=True)
        flatmtl_fast.perturb(base, G[1], scales[1:2], out=second, adaptive=True)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------------------------------
# custom ops

OP_BACKENDS = sorted({c.backend for c in CPU_CASES} - {"triton"})  # the interpreter cannot run opcheck's fake modes


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_opcheck(backend, dtype):
    G = torch.randn(5, 1003).to(dtype)
    weight = torch.randn(1003).to(dtype)
    base = torch.randn(1003).to(dtype)
    scale = torch.tensor([0.3], dtype=torch.float64)
    torch.library.opcheck(row_norms_op, (G, None, backend))
    torch.library.opcheck(row_norms_op, (G[:, 3:900], weight[3:900], backend))  # row stride > N
    for adaptive in (False, True):
        torch.library.opcheck(perturb_op, (base, G[2], scale, torch.empty_like(base), adaptive, backend))


def _sam_step(G: torch.Tensor, theta: torch.Tensor, saved: torch.Tensor, in_place: bool) -> torch.Tensor:
    """ASAM's move to task 1's perturbed weights: ε = ρ T² ⊙ g / ‖T ⊙ g‖, T = |θ|, ρ = 0.05 (from the saved
    copy into θ, or θ updated in place)."""
    norms = flatmtl_fast.row_norms(G, weight=theta)
    flatmtl_fast.perturb(theta if in_place else saved, G[1], 0.05 / norms[1:2], out=theta, adaptive=True)
    return norms


@pytest.mark.parametrize("in_place", [False, True], ids=["from_saved", "in_place"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(compiler, in_place):
    torch._dynamo.reset()
    G, saved = torch.randn(3, 2049), torch.randn(2049)
    compiled = torch.compile(_sam_step, fullgraph=True, backend=compiler)
    eager_theta, compiled_theta = saved.clone(), saved.clone()
    norms_eager = _sam_step(G, eager_theta, saved, in_place)
    norms_compiled = compiled(G, compiled_theta, saved, in_place)
    assert torch.equal(norms_eager, norms_compiled)
    assert torch.equal(eager_theta, compiled_theta)
    assert not torch.equal(compiled_theta, saved)
