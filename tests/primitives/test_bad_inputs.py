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
    with pytest.raises(error, match=match):
        flatmtl_fast.row_norms(G)
    with pytest.raises(error, match=match):
        flatmtl_fast.ema_row_norms(torch.zeros(3, 10, device=case.device), G, decay=0.5, gain=torch.ones(3))


def test_no_columns_are_answered_without_a_kernel(case):
    """A rank's empty shard of the parameters (FSDP2, a small model): G is K × 0."""
    d = case.device
    G = torch.randn(3, 0, device=d)
    for dtype in (torch.float32, torch.float64):
        M = flatmtl_fast.gram(G, dtype=dtype, check_finite=True)
        assert M.dtype == dtype and torch.equal(M, torch.zeros(3, 3, dtype=dtype, device=d))
    assert flatmtl_fast.combine(torch.ones(3, device=d), G).shape == (0,)
    out = torch.empty(0, device=d)
    assert flatmtl_fast.combine(torch.ones(3, device=d), G, out=out, accumulate=True) is out
    zeros = torch.zeros(3, dtype=torch.float64, device=d)
    assert torch.equal(flatmtl_fast.row_norms(G, weight=torch.empty(0, device=d)), zeros)
    assert torch.equal(flatmtl_fast.ema_row_norms(torch.empty(3, 0, device=d), G, decay=0.5, gain=torch.ones(3)), zeros)
    base = torch.empty(0, device=d)
    assert flatmtl_fast.perturb(base, G[0], torch.ones(1, device=d), out=base) is base
    with pytest.raises(ValueError, match="G is empty"):  # the ops themselves still need a column
        torch.ops.flatmtl.gram(G, torch.float32, "reference")
    with pytest.raises(ValueError, match="base is empty"):
        torch.ops.flatmtl.perturb_(base, G[0], torch.ones(1, device=d), base, False, "reference")


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
        flatmtl_fast.combine(w, G, out=torch.empty(10, dtype=torch.int32, device=case.device))
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


def test_bad_row_norms_weight(case):
    G = _G(case)
    with pytest.raises(ValueError, match=r"row_norms: weight must have shape \(10,\) \(one entry per column of G\)"):
        flatmtl_fast.row_norms(G, weight=torch.ones(11, device=case.device))
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
        flatmtl_fast.row_norms(G, weight=torch.ones(1, 10, device=case.device))
    with pytest.raises(TypeError, match=r"row_norms: weight must have dtype float32, .*, got torch\.int32"):
        flatmtl_fast.row_norms(G, weight=torch.ones(10, dtype=torch.int32, device=case.device))
    with pytest.raises(ValueError, match="row_norms: weight must be contiguous"):
        flatmtl_fast.row_norms(G, weight=torch.ones(20, device=case.device)[::2])
    with pytest.raises(TypeError, match=r"row_norms: weight must be a torch\.Tensor"):
        flatmtl_fast.row_norms(G, weight=[1.0] * 10)


def _perturb_args(case, N=10, dtype=torch.float32):
    """Valid perturb arguments (base, direction, scale, out) for the bad-input tests to spoil one by one."""
    return (
        torch.randn(N, device=case.device).to(dtype),
        torch.randn(N, device=case.device),
        torch.tensor([0.5], device=case.device),
        torch.empty(N, device=case.device).to(dtype),
    )


def test_bad_perturb_vectors(case):
    base, direction, scale, out = _perturb_args(case)
    d = case.device
    with pytest.raises(ValueError, match=r"perturb: base must be a torch\.Tensor of shape \(N,\)"):
        flatmtl_fast.perturb(torch.randn(2, 5, device=d), direction, scale, out=out)
    with pytest.raises(ValueError, match=r"perturb: direction must have shape \(0,\)"):
        flatmtl_fast.perturb(torch.randn(0, device=d), direction, scale, out=out)
    with pytest.raises(ValueError, match=r"base must be a torch\.Tensor of shape \(N,\)"):
        flatmtl_fast.perturb([1.0] * 10, direction, scale, out=out)
    with pytest.raises(TypeError, match="perturb: base must have dtype"):
        flatmtl_fast.perturb(base.int(), direction, scale, out=out)
    with pytest.raises(ValueError, match="perturb: base must be contiguous"):
        flatmtl_fast.perturb(torch.randn(20, device=d)[::2], direction, scale, out=out)
    with pytest.raises(ValueError, match=r"perturb: direction must have shape \(10,\) \(one entry per parameter"):
        flatmtl_fast.perturb(base, torch.randn(11, device=d), scale, out=out)
    with pytest.raises(TypeError, match="perturb: direction must have dtype"):
        flatmtl_fast.perturb(base, direction.to(torch.int32), scale, out=out)
    with pytest.raises(ValueError, match="perturb: direction must be contiguous"):
        flatmtl_fast.perturb(base, torch.randn(10, 2, device=d)[:, 0], scale, out=out)
    with pytest.raises(ValueError, match="direction requires grad, but perturb is not differentiable"):
        flatmtl_fast.perturb(base, direction.requires_grad_(), scale, out=out)


def test_bad_perturb_out(case):
    base, direction, scale, out = _perturb_args(case)
    d = case.device
    with pytest.raises(ValueError, match=r"perturb: out must have shape \(10,\)"):
        flatmtl_fast.perturb(base, direction, scale, out=torch.empty(9, device=d))
    with pytest.raises(TypeError, match=r"perturb: out must be a torch\.Tensor"):
        flatmtl_fast.perturb(base, direction, scale, out=None)
    with pytest.raises(TypeError, match=r"perturb: out must have base's dtype torch\.float32, got torch\.bfloat16"):
        flatmtl_fast.perturb(base, direction, scale, out=out.bfloat16())
    with pytest.raises(ValueError, match="perturb: out must be contiguous"):
        flatmtl_fast.perturb(base, direction, scale, out=torch.empty(20, device=d)[::2])
    with pytest.raises(ValueError, match="perturb: out requires grad"):
        flatmtl_fast.perturb(base, direction, scale, out=torch.zeros(10, device=d, requires_grad=True))
    buffer = torch.zeros(13, device=d)
    with pytest.raises(ValueError, match="out partly overlaps base"):
        flatmtl_fast.perturb(buffer[:10], direction, scale, out=buffer[2:12])
    with pytest.raises(ValueError, match="out overlaps direction"):
        flatmtl_fast.perturb(base, buffer[:10], scale, out=buffer[:10])
    with pytest.raises(ValueError, match="out overlaps scale"):
        flatmtl_fast.perturb(base, direction, buffer[9:10], out=buffer[:10])
    with pytest.raises(TypeError, match="perturb: adaptive must be True or False"):
        flatmtl_fast.perturb(base, direction, scale, out=out, adaptive=1)


def test_bad_perturb_scale(case):
    base, direction, _, out = _perturb_args(case)
    d = case.device
    with pytest.raises(TypeError, match=r"perturb: scale must be a 1-element torch\.Tensor on base's device"):
        flatmtl_fast.perturb(base, direction, 0.5, out=out)
    with pytest.raises(ValueError, match=r"perturb: scale must have exactly 1 element, got shape \(2,\)"):
        flatmtl_fast.perturb(base, direction, torch.ones(2, device=d), out=out)
    with pytest.raises(ValueError, match=r"scale must have exactly 1 element, got shape \(0,\)"):
        flatmtl_fast.perturb(base, direction, torch.ones(0, device=d), out=out)
    with pytest.raises(TypeError, match=r"perturb: scale must have dtype float32, float64, got torch\.int64"):
        flatmtl_fast.perturb(base, direction, torch.tensor([1], device=d), out=out)
    with pytest.raises(TypeError, match=r"scale must have dtype float32, float64, got torch\.bfloat16"):
        flatmtl_fast.perturb(base, direction, torch.ones(1, dtype=torch.bfloat16, device=d), out=out)


def test_bad_ema_arguments(case):
    G, d = _G(case), case.device
    buffer, gain = torch.zeros(3, 10, device=d), torch.ones(3, device=d)

    def ema(buffer=buffer, decay=0.5, gain=gain):
        flatmtl_fast.ema_row_norms(buffer, G, decay=decay, gain=gain)

    with pytest.raises(TypeError, match=r"ema_row_norms: buffer must be a torch\.Tensor of shape \(3, 10\)"):
        ema(buffer=None)
    with pytest.raises(ValueError, match=r"ema_row_norms: buffer must have G's shape \(3, 10\), got shape \(3, 9\)"):
        ema(buffer=torch.zeros(3, 9, device=d))
    with pytest.raises(TypeError, match=r"ema_row_norms: buffer must have dtype float32 .*, got torch\.bfloat16"):
        ema(buffer=buffer.bfloat16())
    with pytest.raises(ValueError, match="ema_row_norms: the rows of buffer must be contiguous and disjoint"):
        ema(buffer=torch.zeros(10, 3, device=d).T)
    with pytest.raises(ValueError, match="ema_row_norms: the rows of buffer must be contiguous and disjoint"):
        ema(buffer=torch.zeros(1, 10, device=d).expand(3, 10))
    with pytest.raises(ValueError, match="ema_row_norms: buffer requires grad"):
        ema(buffer=torch.zeros(3, 10, device=d, requires_grad=True))
    with pytest.raises(ValueError, match="ema_row_norms: buffer overlaps G in memory"):
        flatmtl_fast.ema_row_norms(G, G, decay=0.5, gain=gain)
    for decay in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"ema_row_norms: decay must be a real number in \[0, 1\], got"):
            ema(decay=decay)
    for decay in (True, "0.5", None):
        with pytest.raises(TypeError, match=r"ema_row_norms: decay must be a real number in \[0, 1\] or a 1-element"):
            ema(decay=decay)
    for decay in (torch.tensor([0.5, 0.5], device=d), torch.tensor(1, device=d), torch.ones(0, device=d)):
        with pytest.raises(ValueError, match=r"ema_row_norms: a decay tensor must be 1 floating-point element, got"):
            ema(decay=decay)
    with pytest.raises(ValueError, match="ema_row_norms: buffer overlaps decay in memory"):
        ema(decay=buffer[0, 4])
    with pytest.raises(TypeError, match=r"ema_row_norms: gain must be a torch\.Tensor of shape \(3,\)"):
        ema(gain=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"ema_row_norms: gain must have shape \(3,\) \(one factor per row of G\)"):
        ema(gain=torch.ones(1, 3, device=d))
    with pytest.raises(TypeError, match=r"ema_row_norms: gain must have dtype float32, got torch\.float64"):
        ema(gain=gain.double())
    with pytest.raises(ValueError, match="ema_row_norms: gain must be contiguous"):
        ema(gain=torch.ones(6, device=d)[::2])
    storage = torch.zeros(33, device=d)
    with pytest.raises(ValueError, match="ema_row_norms: buffer overlaps gain in memory"):
        ema(buffer=storage[:30].view(3, 10), gain=storage[28:31])
    assert torch.equal(buffer, torch.zeros(3, 10, device=d)), "nothing was written before the errors"


def test_mismatched_devices():
    G = torch.randn(3, 10)
    with pytest.raises(ValueError, match="w is on meta but G is on cpu"):
        flatmtl_fast.combine(torch.ones(3, device="meta"), G)
    with pytest.raises(ValueError, match="out is on meta but G is on cpu"):
        flatmtl_fast.combine(torch.ones(3), G, out=torch.empty(10, device="meta"))
    with pytest.raises(ValueError, match="row_norms: weight is on meta but G is on cpu"):
        flatmtl_fast.row_norms(G, weight=torch.ones(10, device="meta"))
    with pytest.raises(ValueError, match="ema_row_norms: buffer is on meta but G is on cpu"):
        flatmtl_fast.ema_row_norms(torch.zeros(3, 10, device="meta"), G, decay=0.5, gain=torch.ones(3))
    with pytest.raises(ValueError, match="ema_row_norms: gain is on meta but G is on cpu; it must be on G's device"):
        flatmtl_fast.ema_row_norms(torch.zeros(3, 10), G, decay=0.5, gain=torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="ema_row_norms: decay is on meta but G is on cpu; it must be on G's device"):
        flatmtl_fast.ema_row_norms(torch.zeros(3, 10), G, decay=torch.ones((), device="meta"), gain=torch.ones(3))
    base, scale = torch.randn(10), torch.tensor([0.5])
    with pytest.raises(ValueError, match="perturb: direction is on meta but base is on cpu"):
        flatmtl_fast.perturb(base, torch.ones(10, device="meta"), scale, out=torch.empty(10))
    with pytest.raises(ValueError, match="perturb: out is on meta but base is on cpu"):
        flatmtl_fast.perturb(base, G[0], scale, out=torch.empty(10, device="meta"))
    with pytest.raises(ValueError, match="perturb: scale is on meta but base is on cpu; it must be on base's device"):
        flatmtl_fast.perturb(base, G[0], torch.ones(1, device="meta"), out=torch.empty(10))


def test_explicit_backend_that_cannot_run_raises():
    G = torch.randn(3, 10)
    with flatmtl_fast.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run gram"):
        flatmtl_fast.gram(G)
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend reads and writes"):
        flatmtl_fast.gram(G.half())
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="cpp backend reads and writes"):
        flatmtl_fast.row_norms(G, weight=torch.ones(10, dtype=torch.float16))
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' cannot run ema_row_norms"):
        flatmtl_fast.ema_row_norms(torch.zeros(3, 10), G.half(), decay=0.5, gain=torch.ones(3))
    with flatmtl_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' cannot run perturb"):
        flatmtl_fast.perturb(torch.ones(10), G[0].half(), torch.ones(1), out=torch.empty(10))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend\\(name\\) must be one of"):
        with flatmtl_fast.use_backend("fast"):
            pass


def test_flags_must_be_bools():
    """A truthy string or an int where a flag goes would silently pick a mode: refused, naming the flag."""
    G = torch.ones(2, 8)
    with pytest.raises(TypeError, match="gram: check_finite must be True or False"):
        flatmtl_fast.gram(G, check_finite="no")
    with pytest.raises(TypeError, match="combine: accumulate must be True or False"):
        flatmtl_fast.combine(torch.ones(2), G, out=torch.zeros(8), accumulate=0)
