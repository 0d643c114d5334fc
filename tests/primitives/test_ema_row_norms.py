"""DB-MTL's streaming primitive ema_row_norms: every backend against an independent float64 oracle on fresh
random inputs of awkward sizes, exactness on small integers, its tie to row_norms, aliasing, determinism and
the custom op."""

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
from flatmtl_fast.primitives.ops import ema_row_norms_op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DECAY = 0.9 / 3**0.5  # DB-MTL's β / t^σ at t = 3: not a float32 number, so its rounding counts


def _supported(case, dtype: torch.dtype) -> bool:
    """The cpp backend reads float32 and bfloat16 only (test_bad_inputs checks that it says so): such
    combinations are left out at collection, not skipped."""
    return not (case.backend == "cpp" and dtype == torch.float16)


def _case_dtype_params():
    return [
        pytest.param(param.values[0], dtype, id=f"{param.id}-{str(dtype)[6:]}", marks=param.marks)
        for dtype in DTYPES
        for param in ALL_CASES
        if _supported(param.values[0], dtype)
    ]


def _gain(K: int, seed: int) -> torch.Tensor:
    """Per-row factors of very different sizes, as (1 − decay) / L_i for losses over four decades."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.logspace(1, -3, K) * (0.5 + torch.rand(K, generator=gen))).float()


def ema64(buffer: torch.Tensor, G: torch.Tensor, decay: float, gain: torch.Tensor) -> tuple:
    """The oracle from the stored inputs, in float64 with decay exact: (exact update, |decay·b| + |gain_i·g|)."""
    b, g, c = buffer.cpu().double(), G.cpu().double(), gain.cpu().double().unsqueeze(1)
    return decay * b + c * g, decay * b.abs() + c * g.abs()


def ema_tolerance(magnitude: torch.Tensor) -> torch.Tensor:
    """Entry-wise bound for |b̂ − (decay·b + gain_i·g)|.

    decay rounds to float32 (≤ u|decay·b|), each product rounds once (≤ u of itself; 16-bit g widens exactly),
    the sum once (≤ u(|decay·b| + |gain_i·g|)); a fused multiply-add only drops roundings. Together
    ≤ 3u(|decay·b| + |gain_i·g|) to first order; the reference's one rounding of the float64 update is within
    that too. Below float32's normal range the last rounding is absolute: one subnormal spacing.
    """
    return 3 * U32 * (1 + 4 * U32) * magnitude + 2.0**-149


def _params():
    out = []
    for K, N in NORM_SIZES:
        for dtype in DTYPES:
            for param in ALL_CASES:
                case = param.values[0]
                if fits_interpreter(case, 2 * K * N) and _supported(case, dtype):
                    name = f"{case.id}-K{K}-N{N}-{str(dtype)[6:]}"
                    out.append(pytest.param(case, K, N, dtype, id=name, marks=param.marks))
    return out


@functools.lru_cache(maxsize=1)
def _problem(K: int, N: int, dtype: torch.dtype) -> tuple:
    """A buffer and G whose rows have scales over four decades (a row mixed up with another shows), the
    gains, and the oracle; shared by the backends of one shape (the parameters run backend-innermost)."""
    G = scaled_rows(K, N, dtype, seed=K * 1000 + N)
    buffer = scaled_rows(K, N, torch.float32, seed=K * 1000 + N + 1).flip(0).contiguous()
    gain = _gain(K, seed=N)
    return buffer, G, gain, *ema64(buffer, G, DECAY, gain)


@pytest.mark.parametrize(("case", "K", "N", "dtype"), _params())
def test_ema_row_norms_match_float64(case, K, N, dtype):
    buffer, G, gain, expected, magnitude = _problem(K, N, dtype)
    buffer = buffer.to(case.device, copy=True)
    with case.active():
        norms = flatmtl_fast.ema_row_norms(buffer, G.to(case.device), decay=DECAY, gain=gain.to(case.device))
    assert norms.dtype == torch.float64 and norms.shape == (K,) and norms.device == buffer.device
    err = (buffer.cpu().double() - expected).abs()
    tol = ema_tolerance(magnitude)
    assert (err <= tol).all(), f"buffer: max error/tolerance {(err / tol).max().item():.3g}"
    # The norms are of the stored entries, summed as row_norms sums them.
    stored = norms64(buffer, None)
    assert ((norms.cpu() - stored).abs() <= norm_tolerance(stored)).all()


@pytest.mark.parametrize(("case", "dtype"), _case_dtype_params())
def test_ema_row_norms_exact_on_small_integers(case, dtype):
    """b even in [−6, 6], g in [−3, 3], decay ½, gain 1 or 2: every update is an integer ≤ 9 in magnitude,
    every float32 partial sum of squares (≤ 4096 terms of ≤ 81) is exact, and so is the float64 total. Any
    dropped, repeated or misplaced element, in the buffer or in the norms, changes the result."""
    K, N = 5, 300_007
    gen = torch.Generator().manual_seed(21)
    buffer = (2 * torch.randint(-3, 4, (K, N), generator=gen)).float()
    G = torch.randint(-3, 4, (K, N), generator=gen)
    gain = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])
    expected = buffer.long() // 2 + gain.long().unsqueeze(1) * G
    buffer = buffer.to(case.device)
    with case.active():
        norms = flatmtl_fast.ema_row_norms(buffer, G.to(dtype).to(case.device), decay=0.5, gain=gain.to(case.device))
    assert torch.equal(buffer.cpu(), expected.float())
    assert torch.equal(norms.cpu(), exact_norms(expected.square(), case.backend))


@pytest.mark.parametrize("case", ALL_CASES)
def test_ema_without_memory_or_input_is_the_buffer_or_the_scaled_input(case):
    """decay 1, gain 0 leaves the buffer as it is and gives row_norms of it, bit for bit (same partition and
    sums); decay 0 gives gain_i·g_i, a single rounding of the product."""
    K, N = 7, 100_003
    G = scaled_rows(K, N, torch.bfloat16, seed=31).to(case.device)
    buffer = scaled_rows(K, N, torch.float32, seed=32).to(case.device, copy=True)
    kept = buffer.clone()
    with case.active():
        norms = flatmtl_fast.ema_row_norms(buffer, G, decay=1.0, gain=torch.zeros(K, device=case.device))
        assert torch.equal(buffer, kept)
        assert torch.equal(norms, flatmtl_fast.row_norms(kept))
        gain = _gain(K, seed=33).to(case.device)
        flatmtl_fast.ema_row_norms(buffer, G, decay=0.0, gain=gain)
    assert torch.equal(buffer, (gain.unsqueeze(1) * G.float()))


@pytest.mark.parametrize("case", ALL_CASES)
def test_a_decay_tensor_is_read_on_the_device_as_the_number_it_holds(case):
    """decay as a 1-element tensor on G's device (any floating dtype, any shape of one element) updates the
    buffer and gives the norms bit for bit as the same decay passed as a Python number; the kernel reads it at
    every call, so changing the tensor in place changes the next update (what a CUDA graph replay relies on)."""
    K, N = 3, 70_001
    G = scaled_rows(K, N, torch.float32, seed=41).to(case.device)
    start = scaled_rows(K, N, torch.float32, seed=42).to(case.device)
    gain = _gain(K, seed=43).to(case.device)
    by_number, by_tensor = start.clone(), start.clone()
    decay = torch.full((1, 1), 0.3, dtype=torch.float64, device=case.device)
    with case.active():
        for value in (0.3, 0.7):
            expected = flatmtl_fast.ema_row_norms(by_number, G, decay=value, gain=gain)
            got = flatmtl_fast.ema_row_norms(by_tensor, G, decay=decay, gain=gain)
            assert torch.equal(by_tensor, by_number) and torch.equal(got, expected), value
            decay.fill_(0.7)


@pytest.mark.parametrize("case", ALL_CASES)
def test_ema_on_column_slices_writes_only_its_view(case):
    """G a column slice (row stride > N) and the buffer a column slice of a larger buffer: the columns
    outside the view stay as they were."""
    full_G = scaled_rows(6, 5000, torch.float32, seed=41).to(case.device)
    full_buffer = scaled_rows(6, 5003, torch.float32, seed=42).to(case.device, copy=True)
    original = full_buffer.clone()
    G, buffer = full_G[:, 123:4567], full_buffer[:, 7:4451]
    gain = _gain(6, seed=43).to(case.device)
    expected, magnitude = ema64(buffer, G, DECAY, gain)
    with case.active():
        norms = flatmtl_fast.ema_row_norms(buffer, G, decay=DECAY, gain=gain)
    assert ((buffer.cpu().double() - expected).abs() <= ema_tolerance(magnitude)).all()
    assert torch.equal(full_buffer[:, :7], original[:, :7]) and torch.equal(full_buffer[:, 4451:], original[:, 4451:])
    stored = norms64(buffer, None)
    assert ((norms.cpu() - stored).abs() <= norm_tolerance(stored)).all()


@pytest.mark.parametrize("case", ALL_CASES)
def test_ema_non_finite_stays_in_its_row_and_a_non_finite_entry_restarts(case):
    """NaN in G or gain reaches the entry and its row's norm only; a NaN/Inf entry of the buffer (an overflowed
    step's) restarts from 0: it becomes gain · g exactly (decay · 0 + gain · g, one rounding of an exact product
    when gain = 1), in vector lanes and in the scalar tail (column 999 with 16 lanes: 1000 = 62 · 16 + 8)."""
    G = scaled_rows(4, 1000, torch.float32, seed=51).to(case.device, copy=True)
    G[1, 17] = float("nan")
    buffer = scaled_rows(4, 1000, torch.float32, seed=52).to(case.device, copy=True)
    buffer[3, 999] = float("inf")
    buffer[3, 8] = float("nan")
    buffer[0, 9] = -float("inf")
    gain = torch.ones(4, device=case.device)
    gain[2] = float("nan")
    with case.active():
        norms = flatmtl_fast.ema_row_norms(buffer, G, decay=0.5, gain=gain).cpu()
    assert norms[1].isnan() and norms[2].isnan() and norms[0].isfinite() and norms[3].isfinite()
    assert buffer[0].isfinite().all() and buffer[1].isfinite().sum() == 999 and buffer[2].isnan().all()
    assert buffer[3].isfinite().all()
    for row, column in ((3, 999), (3, 8), (0, 9)):
        assert buffer[row, column] == G[row, column], (row, column)


@pytest.mark.parametrize("case", ALL_CASES)
def test_ema_is_deterministic(case):
    G = scaled_rows(9, 200_003, torch.float32, seed=61).to(case.device)
    start = scaled_rows(9, 200_003, torch.float32, seed=62).to(case.device)
    gain = _gain(9, seed=63).to(case.device)
    first, second = start.clone(), start.clone()
    with case.active():
        norms = [flatmtl_fast.ema_row_norms(b, G, decay=DECAY, gain=gain) for b in (first, second)]
    assert torch.equal(first, second) and torch.equal(norms[0], norms[1])


def test_cpp_ema_does_not_depend_on_thread_count():
    G = scaled_rows(7, 1_000_003, torch.bfloat16, seed=71)
    start = scaled_rows(7, 1_000_003, torch.float32, seed=72)
    gain = _gain(7, seed=73)
    previous = torch.get_num_threads()
    results = []
    try:
        with flatmtl_fast.use_backend("cpp"):
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                buffer = start.clone()
                results.append((buffer, flatmtl_fast.ema_row_norms(buffer, G, decay=DECAY, gain=gain)))
    finally:
        torch.set_num_threads(previous)
    for buffer, norms in results[1:]:
        assert torch.equal(buffer, results[0][0]) and torch.equal(norms, results[0][1])


def test_cpp_ema_row_offsets_past_int32():
    """G's two rows 2³¹+4099 elements apart (address space only: unwritten pages cost no memory)."""
    N, stride = 1000, 2**31 + 4099
    storage = torch.empty(stride + N, dtype=torch.bfloat16)
    G = storage.as_strided((2, N), (stride, 1))
    G.copy_(scaled_rows(2, N, torch.bfloat16, seed=81))
    buffer = scaled_rows(2, N, torch.float32, seed=82).clone()
    gain = _gain(2, seed=83)
    expected, magnitude = ema64(buffer, G, DECAY, gain)
    with flatmtl_fast.use_backend("cpp"):
        flatmtl_fast.ema_row_norms(buffer, G, decay=DECAY, gain=gain)
    assert ((buffer.double() - expected).abs() <= ema_tolerance(magnitude)).all()


OP_BACKENDS = sorted({c.backend for c in CPU_CASES} - {"triton"})  # the interpreter cannot run opcheck's fake modes


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_opcheck(backend, dtype):
    G = torch.randn(5, 1003).to(dtype)
    gain = _gain(5, seed=91)
    decay = torch.tensor([DECAY], dtype=torch.float32)
    torch.library.opcheck(ema_row_norms_op, (torch.randn(5, 1003), G, decay, gain, backend))
    torch.library.opcheck(ema_row_norms_op, (torch.randn(5, 1003)[:, 2:899], G[:, 3:900], decay * 0, gain, backend))


def _dbmtl_step(buffer: torch.Tensor, G: torch.Tensor, losses: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    decay = 0.9 / step.sqrt()  # a tensor computed in the graph
    norms = flatmtl_fast.ema_row_norms(buffer, G, decay=decay, gain=((1 - decay) / losses).float())
    return flatmtl_fast.combine(norms.max() / norms, buffer)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(compiler):
    torch._dynamo.reset()
    G, start, losses = torch.randn(3, 2049), torch.randn(3, 2049), torch.tensor([0.5, 1.0, 3.0])
    compiled = torch.compile(_dbmtl_step, fullgraph=True, backend=compiler)
    eager_buffer, compiled_buffer = start.clone(), start.clone()
    step = torch.tensor(2.0, dtype=torch.float64)
    d_eager = _dbmtl_step(eager_buffer, G, losses, step)
    d_compiled = compiled(compiled_buffer, G, losses, step)
    assert torch.equal(eager_buffer, compiled_buffer)
    assert torch.allclose(d_eager, d_compiled, rtol=1e-6, atol=1e-6)
