"""Fused aggregators: no host sync, out=, state round trips, properties, NaN, bad inputs, solver edges,
no heavy solver imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fused._util import ALL, GRAMIAN, RANDOMISED, SYNC_ON_CUDA, losses_for, make, random_G
from support.host_sync import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

import flatmtl_fast
from flatmtl_fast import solvers
from flatmtl_fast.primitives import MAX_K


@pytest.mark.parametrize("backend", ["cpp", "reference"], ids=["native-solver", "torch-solver"])
def test_no_host_synchronisation(backend: str) -> None:
    """Every fused aggregator runs with the sync-prone Tensor methods and the aten ops that synchronise on CUDA
    made to raise (CPU proxy for torch.cuda.set_sync_debug_mode('error')), on both solve paths; the only
    exceptions are the documented ones of the torch solvers (``SYNC_ON_CUDA``)."""
    G = random_G(5, 257)
    aggregators = {name: make(name) for name in ALL}
    torch_solved = set(SYNC_ON_CUDA) if backend == "reference" else set()  # native solvers for IMTL-G, Aligned-MTL
    results = {}
    with flatmtl_fast.use_backend(backend):
        for name, agg in aggregators.items():  # warm-up outside the guard (caches, first-call state)
            agg(G, losses_for(name, 5))
        for name, agg in aggregators.items():
            with forbid_host_sync(allowed=[SYNC_ON_CUDA[name]] if name in torch_solved else []):
                results[name] = agg(G, losses_for(name, 5))
    for name, d in results.items():
        assert d.shape == (257,), name
        assert bool(torch.isfinite(d).all()), name


@pytest.mark.parametrize("name", ALL)
def test_out_writes_only_the_view(name: str) -> None:
    G = random_G(3, 101, seed=1)
    expected = make(name)(G, losses_for(name, 3))
    flat = torch.full((301,), 7.0)
    view = flat[100:201]
    returned = make(name)(G, losses_for(name, 3), out=view)
    assert returned.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view, expected, rtol=0, atol=0)
    assert bool((flat[:100] == 7).all()) and bool((flat[201:] == 7).all())
    bf16 = torch.empty(101, dtype=torch.bfloat16)
    assert make(name)(G, losses_for(name, 3), out=bf16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", [*RANDOMISED, "NashMTL", "DBMTL"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    Gs = [random_G(4, 33, seed=s) for s in range(4)]
    losses = losses_for(name, 4)
    agg = make(name)
    for G in Gs[:2]:
        agg(G, losses)
    state = agg.state_dict()
    first = [agg(G, losses) for G in Gs[2:]]
    agg2 = make(name, seed=99)
    agg2.load_state_dict(state)
    second = [agg2(G, losses) for G in Gs[2:]]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    agg.reset()
    torch.testing.assert_close(agg(Gs[0], losses), make(name)(Gs[0], losses), rtol=0, atol=0)


SOLVE_PATHS = pytest.mark.parametrize("backend", ["cpp", "reference"], ids=["native-solver", "torch-solver"])


@SOLVE_PATHS
@pytest.mark.parametrize("name", ["GradVac", "NashMTL"])
def test_state_matches_reference_over_steps(name: str, backend: str) -> None:
    fused, ref = make(name), make(name, fused=False)
    for s in range(3):
        G = random_G(4, 60, seed=s)
        with flatmtl_fast.use_backend(backend):
            d = fused(G)
        torch.testing.assert_close(d.double(), ref(G).double(), rtol=1e-4, atol=1e-6)
    key = "phi_hat" if name == "GradVac" else "_alpha"
    torch.testing.assert_close(fused.state_dict()[key], ref.state_dict()[key], rtol=1e-5, atol=1e-7)


@SOLVE_PATHS
@pytest.mark.parametrize("name", ["GradVac", "NashMTL", "DBMTL"])
def test_state_tensors_advance_in_place(name: str, backend: str) -> None:
    """After the first step each state tensor stays the same tensor and is advanced in place — what a CUDA graph
    replay needs to carry the state to the next replay (a reassigned attribute would leave the graph reading
    the state it was captured with, step after step)."""
    agg, losses = make(name), losses_for(name, 4)
    with flatmtl_fast.use_backend(backend):
        agg(random_G(4, 33, seed=0), losses)
        keys = [key for key in agg._state_attributes if isinstance(vars(agg).get(key), torch.Tensor)]
        state = {key: getattr(agg, key) for key in keys}
        before = {key: tensor.clone() for key, tensor in state.items()}
        agg(random_G(4, 33, seed=1), losses)
    assert state, "no state tensor to check"
    for key, tensor in state.items():
        assert getattr(agg, key) is tensor, f"{key} was replaced"
        assert not torch.equal(tensor, before[key]), f"{key} did not change"


def test_dbmtl_continues_from_a_reference_state() -> None:
    """The reference's state (float64 buffer, int step) loads into the fused DB-MTL, which continues as the
    reference does (to float32 rounding of its buffer) with its step count a device tensor."""
    ref, losses = make("DBMTL", fused=False), losses_for("DBMTL", 4)
    for s in range(2):
        ref(random_G(4, 60, seed=s), losses)
    fused = make("DBMTL")
    fused.load_state_dict(ref.state_dict())
    for s in range(2, 4):
        G = random_G(4, 60, seed=s)
        torch.testing.assert_close(fused(G, losses).double(), ref(G, losses).double(), rtol=1e-5, atol=1e-6)
    assert isinstance(fused.step, torch.Tensor) and fused.step.dtype == torch.float64
    assert float(fused.step) == ref.step == 4


@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "MGDA", "FairGrad"])
def test_non_conflicting(name: str) -> None:
    G = random_G(5, 40, seed=3)
    d = make(name)(G).double()
    products = G.double() @ d
    assert float(products.min()) >= -1e-4 * float(G.double().norm(dim=1).max() * d.norm())


@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "MGDA", "AlignedMTL", "IMTLG", "Mean", "Sum"])
def test_permutation_invariance(name: str) -> None:
    G = random_G(5, 40, seed=4)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(make(name)(G[permutation]), make(name)(G), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["UPGrad", "Mean", "Sum"])
def test_linear_under_scaling(name: str) -> None:
    G = random_G(4, 30, seed=5).double()
    c1 = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    c2 = torch.tensor([2.0, 0.3, 1.0, 1.5], dtype=torch.float64)
    kwargs = {"reg_eps": 1e-12} if name == "UPGrad" else {}
    combined = make(name, **kwargs)((torch.diag(2 * c1 + 3 * c2) @ G).float()).double()
    parts = (
        2 * make(name, **kwargs)((torch.diag(c1) @ G).float()).double()
        + 3 * make(name, **kwargs)((torch.diag(c2) @ G).float()).double()
    )
    # UPGrad is linear only without its ridge (reg_eps relative to tr M, which changes with c): 1e-12.
    tol = 1e-4 if name == "UPGrad" else 1e-5
    torch.testing.assert_close(combined, parts, rtol=tol, atol=tol * float(parts.abs().max()))


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("GradDrop", "DBMTL", "Mean", "Sum", "RLW")])
def test_nan_input_gives_nan_direction_or_raises(name: str) -> None:
    G = random_G(3, 20, seed=6)
    G[1, 5] = torch.nan
    assert bool(torch.isnan(make(name)(G)).all())
    with pytest.raises(FloatingPointError):
        make(name)(G, check_finite=True)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("GradDrop", "DBMTL")])
def test_check_finite_is_a_flag(name: str) -> None:
    """A truthy string would silently mean True (a host synchronisation per step): refused, naming the flag."""
    with pytest.raises(TypeError, match=f"{name}: check_finite must be True or False"):
        make(name)(random_G(3, 20), check_finite="no")


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_dbmtl_recovers_from_an_overflowed_step(backend: str) -> None:
    """Under a GradScaler a step whose G overflowed gives a NaN direction (the scaler skips it) and leaves Inf/NaN
    in DB-MTL's EMA buffer; those entries restart at the next step instead of poisoning every later step (which
    stopped training for good: the scaler skipped every step and shrank its scale to 0). The continuation equals
    the reference's, whose buffer restarts the same way, and restarted entries are ĝ (1 − β/t^σ), as at t = 1."""
    K, N = 3, 5_003
    Gs = [random_G(K, N, seed=s) for s in range(4)]
    Gs[1][:, : N // 2] = torch.inf  # half the columns overflowed: those entries restart, the others keep their EMA
    losses = losses_for("DBMTL", K)
    fused, oracle = make("DBMTL"), make("DBMTL", fused=False)
    with flatmtl_fast.use_backend(backend):
        directions = [fused(G, losses) for G in Gs]
    expected = [oracle(G.double(), losses) for G in Gs]
    assert bool(torch.isnan(directions[1]).all())
    for got, want in zip(directions[2:], expected[2:], strict=True):
        assert bool(torch.isfinite(got).all())
        # float32 EMA entries (a few roundings each) against the float64 reference, then a K-term combination.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    restarted = Gs[2][:, : N // 2].double() / losses.unsqueeze(1) * (1 - 0.9 / 3**0.5)
    torch.testing.assert_close(oracle.buffer[:, : N // 2], Gs[3][:, : N // 2].double() / losses.unsqueeze(1) * (
        1 - 0.9 / 4**0.5) + 0.9 / 4**0.5 * restarted)  # fmt: skip


@pytest.mark.parametrize("scale", [1e-12, 1e-14, 1e-16])
@pytest.mark.parametrize("name", ["CAGrad", "IMGrad"])
def test_a_nearly_vanished_task_gradient_gives_the_reference_direction(name: str, scale: float) -> None:
    """A task whose gradient has almost vanished (a saturated loss) can leave the compiled simplex solver's inner
    QPs too ill-conditioned to converge: it says so — also where the active set stopped at a worse point than a
    vertex of the simplex while reporting success (a final check) — and the torch solver decides. Before, those
    weights were used: CAGrad's step came out 40 % too long for c = 0.4. Tolerance: the solvers' own
    (WEIGHT_RTOL), through G."""
    unconverged = 0
    for seed in range(6):
        G = random_G(3, 200, seed=seed)
        G[0] *= scale
        want = make(name, fused=False)(G.double())
        torch.testing.assert_close(make(name)(G).double(), want, rtol=0, atol=1e-3 * float(want.norm()))
        M = flatmtl_fast.gram(G, dtype=torch.float64)
        solver, parameters = make(name)._native_solver(M, None, G.dtype)
        unconverged += solvers.native._CPU.solve(solver, M, parameters)[1] is False
    assert unconverged > 0 or name == "IMGrad"  # CAGrad's cases exercise the fallback; IMGrad's converge


@SOLVE_PATHS
@pytest.mark.parametrize("K", [3, 70])
@pytest.mark.parametrize("name", [n for n in ALL if n not in ("GradDrop", "DBMTL")])
def test_a_nonfinite_gram_is_solved_as_zero(name: str, K: int, backend: str) -> None:
    """The non-finite policy, applied inside the native solve call or around the torch solver: NaN weights, and
    the aggregator's state (generator, GradVac's targets, Nash-MTL's α) moves exactly as for M = 0, so the
    next steps are those after a step on M = 0. K = 70: the row-parallel native solvers run on threads."""
    M = (lambda G: G.double() @ G.double().T)(random_G(K, 3 * K, seed=K))
    corrupted = M.clone()
    corrupted[1, 0] = torch.inf
    hit, clean = make(name), make(name)
    with flatmtl_fast.use_backend(backend):
        assert bool(hit.weights(corrupted).isnan().all())
        assert not bool(clean.weights(torch.zeros_like(M)).isnan().any())
        for _ in range(2):
            assert torch.equal(hit.weights(M), clean.weights(M))


@SOLVE_PATHS
@pytest.mark.parametrize("normalize", ["loss", "loss+"])
def test_mgda_losses_nonfinite_or_tracked_by_autograd(normalize: str, backend: str) -> None:
    """A NaN/Inf loss the divisors use gives NaN weights (the non-finite policy; it used to become D_i = 1, or
    all-zero weights for Inf), and losses that require grad give constant weights on every solve path."""
    G = random_G(3, 50, seed=1)
    aggregator = flatmtl_fast.MGDA(normalize=normalize)
    with flatmtl_fast.use_backend(backend):
        M = flatmtl_fast.gram(G, dtype=torch.float64)  # as the aggregator forms it on this backend
        for bad in (torch.nan, torch.inf):
            losses = torch.tensor([1.0, bad, 2.0])
            assert bool(aggregator.weights(M, losses).isnan().all())
            assert bool(aggregator(G, losses).isnan().all())
        losses = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
        w = aggregator.weights(M, losses)
        assert not w.requires_grad
        torch.testing.assert_close(aggregator(G, losses), flatmtl_fast.combine(w, G), rtol=0, atol=0)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", GRAMIAN)
def test_a_step_with_a_native_solver_is_a_handful_of_torch_ops(name: str) -> None:
    """gram, one solver call, combine and the few tiny tensors around them (on a GPU, each op is a launch, and the
    GPU target leaves room for a handful): no guard of the non-finite policy around the solve (the solver applies
    it inside its call), no K × K work in torch, no conversion of the float64 weights (combine rounds them as it
    reads them) and no fill of UPGrad's and DualProj's default preference vector (the solver's own 1/K)."""
    G, out = random_G(5, 1001, seed=2), torch.empty(1001)
    agg = make(name)
    agg(G, out=out)
    with flatmtl_fast.use_backend("cpp"), _CountOps() as counted:
        agg(G, out=out)
    assert len(counted.ops) <= 6 and "_to_copy" not in counted.ops, counted.ops
    if name in ("UPGrad", "DualProj"):
        assert "full" not in counted.ops, counted.ops


def test_nan_propagates_per_column_in_elementwise_methods() -> None:
    G = random_G(3, 20, seed=6)
    G[1, 5] = torch.nan
    for name in ("GradDrop", "Mean", "Sum", "RLW"):
        d = make(name)(G)
        assert bool(torch.isnan(d[5])) and bool(torch.isfinite(d[:5]).all()), name
    # DB-MTL: the NaN enters row 1's buffer norm, hence every α (max over norms) — as in the reference.
    assert bool(torch.isnan(make("DBMTL")(G, losses_for("DBMTL", 3))).all())


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_clearly(name: str) -> None:
    agg = make(name)
    with pytest.raises(ValueError, match="shape"):
        agg(torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        agg(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="losses"):
        agg(random_G(3, 4), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError):
        agg(random_G(3, 4), losses_for(name, 3), out=torch.empty(5))
    if name == "DBMTL":
        with pytest.raises(ValueError, match="needs the task losses"):
            agg(random_G(3, 4))
    with pytest.raises(ValueError, match=r"G requires grad, but aggregators are not differentiable"):
        agg(random_G(3, 4).requires_grad_(), losses_for(name, 3))
    with pytest.raises(ValueError, match=r"G requires grad, but aggregators are not differentiable"):
        make(name, fused=False)(random_G(3, 4).requires_grad_(), losses_for(name, 3))  # not a NumPy error


def _state_copy(agg) -> dict:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in agg.state_dict().items()}


@pytest.mark.parametrize("name", ALL)
def test_a_rejected_call_leaves_the_state_as_it_was(name: str) -> None:
    """G's layout and K limit, out=, and whether the chosen backend can run these dtypes are checked before anything
    advances (generators, EMA buffers, warm starts, step counters): a call that raises is as if it never happened,
    and the next step is the one an untouched aggregator takes."""
    G, losses = random_G(3, 40, seed=1), losses_for(name, 3)
    agg, untouched = make(name), make(name)
    agg(G, losses)
    untouched(G, losses)
    before = _state_copy(agg)
    G2 = random_G(3, 40, seed=2)
    bad_calls = {  # what: (G, losses, out, backend)
        "out's shape": (G2, losses, torch.empty(39), "auto"),
        "out's stride": (G2, losses, torch.empty(80)[::2], "auto"),
        "out's dtype": (G2, losses, torch.empty(40, dtype=torch.int32), "auto"),
        "out requires grad": (G2, losses, torch.empty(40, requires_grad=True), "auto"),
        "out aliases G": (G2, losses, G2[1], "auto"),
        "G's rows not contiguous": (random_G(40, 3, seed=2).t(), losses, None, "auto"),
        "K over the kernels' limit": (random_G(MAX_K + 1, 2), losses_for(name, MAX_K + 1), None, "auto"),
        "out's dtype not the backend's": (G2, losses, torch.empty(40, dtype=torch.float16), "cpp"),
        "G's dtype not the backend's": (G2.double(), losses, None, "cpp"),
    }
    if name == "DBMTL":
        bad_calls["G aliases the EMA buffer"] = (agg.buffer, losses, None, "auto")
    for what, (bad_G, bad_losses, out, backend) in bad_calls.items():
        if name == "DBMTL" and bad_G.shape != G.shape:
            continue  # refused for its shape (the buffer's), before anything else
        with flatmtl_fast.use_backend(backend), pytest.raises((ValueError, TypeError, RuntimeError)):
            agg(bad_G, bad_losses, out=out)
        after = _state_copy(agg)
        assert after.keys() == before.keys(), what
        for key, value in before.items():
            assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value, what
    torch.testing.assert_close(agg(G, losses), untouched(G, losses), rtol=0, atol=0)


def test_dbmtl_out_may_not_alias_its_buffer() -> None:
    agg = make("DBMTL")
    G, losses = random_G(3, 8), losses_for("DBMTL", 3)
    agg(G, losses)
    with pytest.raises(ValueError, match="out overlaps the aggregator's EMA buffer"):
        agg(G, losses, out=agg.buffer[1])


def test_dbmtl_takes_a_loaded_buffer_of_any_layout() -> None:
    """A buffer saved transposed (or sliced) continues as the same values stored contiguously would."""
    G, losses = random_G(3, 40, seed=3), losses_for("DBMTL", 3)
    saved = make("DBMTL")
    saved(G, losses)
    state = saved.state_dict()
    transposed = {**state, "buffer": state["buffer"].t().contiguous().t()}
    agg = make("DBMTL")
    agg.load_state_dict(transposed)
    torch.testing.assert_close(agg(G, losses), saved(G, losses), rtol=0, atol=0)


def test_graddrop_same_generator_state_same_kept_entries_triton() -> None:
    G = random_G(5, 3000, seed=2)
    expected = make("GradDrop", seed=4, fused=False)(G)
    with flatmtl_fast.use_backend("triton"):
        actual = make("GradDrop", seed=4)(G)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with flatmtl_fast.use_backend("triton"):
        assert not torch.equal(make("GradDrop", seed=5)(G), actual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_graddrop_blocks_cover_several_blocks(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The torch path (the fused GradDrop's reference backend, and float64's only one) over 16 blocks of 64
    columns and a partial one: block by block, the same stream and the same d as the one-pass reference."""
    from flatmtl_fast.aggregators import graddrop_kernels

    monkeypatch.setattr(graddrop_kernels, "block_columns", lambda device: 64)
    G = random_G(3, 1001, seed=3).to(dtype)
    with flatmtl_fast.use_backend("reference"):
        actual = make("GradDrop", seed=1)(G)
    torch.testing.assert_close(actual, make("GradDrop", seed=1, fused=False)(G), rtol=0, atol=0)


# Solver edge cases -----------------------------------------------------------------------------------


def _all_solvers(M: torch.Tensor) -> dict[str, torch.Tensor]:
    K = M.shape[0]
    q = M.sum(1) / K
    beta = torch.tensor(0.4, dtype=torch.float64)
    return {
        "min_norm": solvers.min_norm_weights(M),
        "linear_norm": solvers.argmin_linear_plus_norm(q, M, beta, squared=False),
        "linear_sq": solvers.argmin_linear_plus_norm(q, M, beta, squared=True),
        "dual_cone": solvers.project_weights(M, torch.eye(K, dtype=torch.float64), norm_eps=0.0, reg_eps=1e-4),
        "imtlg": solvers.imtlg_weights(M, torch.float64),
        "aligned": solvers.aligned_weights(M),
        "nash": solvers.nash_weights(M, torch.ones(K, dtype=torch.float64), 100, torch.finfo(torch.float64).eps),
        "fair": solvers.fair_weights(M, 1.0, torch.finfo(torch.float64).eps),
    }


@pytest.mark.parametrize("case", ["K1", "singular", "all_equal", "zero"])
def test_solver_edge_cases_are_finite(case: str) -> None:
    if case == "K1":
        M = torch.tensor([[4.0]], dtype=torch.float64)
    else:
        g = torch.randn(
            4, 2 if case == "singular" else 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        if case == "all_equal":
            g = g[:1].expand(4, -1)
        if case == "zero":
            g = torch.zeros(4, 3, dtype=torch.float64)
        M = g @ g.T
    for name, w in _all_solvers(M).items():
        assert bool(torch.isfinite(w).all()), name
    if case == "K1":
        results = _all_solvers(M)
        assert float(results["min_norm"][0]) == 1.0 and float(results["imtlg"][0]) == 1.0
        torch.testing.assert_close(results["nash"], torch.tensor([0.5], dtype=torch.float64))


# Import cost -------------------------------------------------------------------------------------------

#: The reference solvers' packages: the fused classes subclass the reference ones, whose modules import
#: these only inside the functions that solve.
HEAVY_PACKAGES = ("cvxpy", "quadprog", "scipy", "clarabel")


def test_import_does_not_load_the_reference_solvers() -> None:
    code = (
        "import sys, flatmtl_fast; "
        f"print(sorted({{name.partition('.')[0] for name in sys.modules}} & set({HEAVY_PACKAGES!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import flatmtl_fast loaded {result.stdout.strip()}"


BAD_HYPERPARAMETERS = [
    ("MGDA", {"max_iter": 1.5}, "max_iter must be an integer"),
    ("MGDA", {"max_iter": 2**40}, "max_iter must be an integer"),
    ("MGDA", {"stop_crit": float("inf")}, "stop_crit must be a finite real"),
    ("NashMTL", {"optim_niter": 2.5}, "optim_niter must be an integer"),
    ("NashMTL", {"update_weights_every": 1.5}, "update_weights_every must be an integer"),
    ("NashMTL", {"max_norm": float("nan")}, "max_norm"),
    ("CAGrad", {"c": float("inf")}, "c must be a finite real"),
    ("CAGrad", {"sum_scale": "no"}, "sum_scale must be True or False"),
    ("CAGrad", {"rescale": True}, "rescale must be 0, 1 or 2"),
    ("IMGrad", {"alpha": float("inf")}, "alpha must be a finite real"),
    ("GradVac", {"beta": True}, "beta must be a finite real"),
    ("GradVac", {"eps": float("inf")}, "eps must be a finite real"),
    ("FairGrad", {"alpha": 0.0}, "alpha must be > 0"),
    ("DBMTL", {"beta": 1.5}, r"beta must be ≥ 0 and ≤ 1"),
    ("UPGrad", {"reg_eps": float("inf")}, "reg_eps"),
    ("UPGrad", {"pref_vector": -torch.ones(3)}, "pref_vector must be finite and ≥ 0"),
    ("DualProj", {"pref_vector": torch.zeros(3)}, "pref_vector must be finite and ≥ 0 with a positive sum"),
    ("GradDrop", {"leak": "half"}, "leak must be a float, a sequence or a 1-D tensor"),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize(("name", "kwargs", "message"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_at_construction(name: str, kwargs: dict, message: str, fused: bool) -> None:
    """Inf, NaN, a string, a bool or a non-integer where a count goes: refused when the aggregator is made, naming
    it and the argument — not NaN weights, a binding's TypeError or a silent True at the first step."""
    module = flatmtl_fast if fused else flatmtl_fast.reference
    with pytest.raises((ValueError, TypeError), match=f"{name}: {message}"):
        getattr(module, name)(**kwargs)


def test_graddrop_takes_one_leak_per_task_as_a_sequence() -> None:
    G = random_G(3, 50, seed=4)
    as_list = make("GradDrop", leak=[0.5, 0.0, 1.0])(G)
    as_tensor = make("GradDrop", leak=torch.tensor([0.5, 0.0, 1.0]))(G)
    assert torch.equal(as_list, as_tensor)


BAD_STATES = [
    ("NashMTL", {"_alpha": torch.ones(3, 1), "_step": 1}, "_alpha must be None or a 1-D floating tensor"),
    ("NashMTL", {"_alpha": torch.tensor([1.0, float("nan"), 1.0]), "_step": 1}, "_alpha must be finite and > 0"),
    ("NashMTL", {"_alpha": -torch.ones(3), "_step": 1}, "_alpha must be finite and > 0"),
    ("NashMTL", {"_alpha": torch.ones(3), "_step": None}, None),  # consistent enough: the next step counts from 0
    ("NashMTL", {"_alpha": torch.ones(3), "_step": 1.5}, "step must be None or a count"),
    ("GradVac", {"phi_hat": torch.ones(3, 4), "_generator_state": None}, "phi_hat must be K × K"),
    (
        "GradVac",
        {"phi_hat": torch.ones(3, 3), "_generator_state": torch.zeros(3, dtype=torch.uint8)},
        "_generator_state is not a state of a cpu generator",
    ),
    ("PCGrad", {"_generator_state": "x"}, "_generator_state is not a state of a cpu generator"),
    (
        "DBMTL",
        {"buffer": torch.ones(3, 4, dtype=torch.int32), "step": 1, "rank": None},
        "buffer must be None or a K × N floating",
    ),
    ("DBMTL", {"buffer": torch.ones(3, 4), "step": None, "rank": None}, "buffer and step must both be None"),
    ("DBMTL", {"buffer": torch.ones(3, 4), "step": -1, "rank": None}, "step must be None or a count"),
    ("DBMTL", {"buffer": torch.ones(3, 4), "step": 1, "rank": True}, "rank must be None or an integer >= 0"),
    ("DBMTL", {"buffer": torch.ones(3, 4), "step": 1, "rank": -1}, "rank must be None or an integer >= 0"),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize(("name", "state", "message"), BAD_STATES)
def test_a_rejected_state_names_the_entry_and_changes_nothing(name: str, state: dict, message, fused: bool) -> None:
    """A state of the wrong kind (shape, dtype, NaN, a negative count) is refused at load, naming the entry, and the
    aggregator keeps its own — not a misleading error ("used with 3 tasks, now 3") or NaN at the next step."""
    agg = make(name, fused=fused)
    G, losses = random_G(3, 4, seed=9), losses_for(name, 3)
    agg(G, losses)
    before = _state_copy(agg)
    if message is None:
        agg.load_state_dict(state)
        return
    with pytest.raises(ValueError, match=f"{name}.load_state_dict: .*{message}"):
        agg.load_state_dict(state)
    after = _state_copy(agg)
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value, key


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_a_nash_mtl_state_cast_to_float32_continues(fused: bool) -> None:
    """A checkpoint whose tensors were cast to float32 (e.g. by a ``.half()``/``.float()`` sweep over the whole
    checkpoint) continues as the float64 state rounded to float32 would — not a dtype error at the next step."""
    G = random_G(3, 30, seed=4)
    saved = make("NashMTL", fused=fused)
    saved(G)
    state = saved.state_dict()
    rounded = {**state, "_alpha": state["_alpha"].float()}
    expected = make("NashMTL", fused=fused)
    expected.load_state_dict({**state, "_alpha": rounded["_alpha"].double()})
    agg = make("NashMTL", fused=fused)
    agg.load_state_dict(rounded)
    torch.testing.assert_close(agg(G), expected(G), rtol=0, atol=0)


def test_beyond_the_compiled_solvers_size_the_torch_solver_runs() -> None:
    """K above the native solvers' limit (4096): the torch solver takes over instead of a binding error."""
    K = solvers.native._native.module().solver_max_k + 1
    M = torch.eye(K, dtype=torch.float64)
    for name in ("Mean", "Sum"):
        torch.testing.assert_close(make(name).weights(M), make(name, fused=False).weights(M))
