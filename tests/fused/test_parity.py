"""Every fused aggregator equals its reference (flatmtl_fast.reference) on fresh random inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from fused._util import (
    ALL,
    GRAMIAN,
    SOLVED,
    WEIGHT_RTOL,
    assert_paths_agree,
    direction_tolerance,
    losses_for,
    make,
    random_G,
)

import flatmtl_fast

BACKENDS = ("cpp", "triton", "reference")  # triton: its kernels in the interpreter (tests/conftest.py)
DTYPES = (torch.float32, torch.bfloat16)
KS = (1, 2, 3, 7, 40, 64)
# N = 1001 at every K: the cost of a case is the reference's explicit-vector loops and the solvers (cvxpy,
# quadprog, the torch solvers the triton backend solves with), not the interpreted kernels, which stream
# 64 × 1001 entries in a few Triton programs (measured: every backend and dtype at K = 40 and 64 ≈ 10 s).


def _reference_weights(name: str, G: torch.Tensor) -> torch.Tensor:
    """The reference's effective weights w (d_ref = wᵀG) on the exact float64 G, for the tolerance's
    magnitude m = |w|ᵀ|G|.

    GradDrop keeps each g_k[n] with a factor in [0, 1]: |d_n| ≤ Σ_k |g_k[n]|, so w = 1 bounds it.
    DB-MTL's first step has B_i = (1 − β) g_i / L_i and d = Σ α_i B_i: w_i = α_i c_i with c_i = B_i / g_i read
    off the reference's own buffer (least squares of B_i on g_i, exact here since B_i ∥ g_i) and α_i from its
    norms — 0.07–0.3 here (β = 0.9, losses in [0.5, 2]), not 1."""
    G64 = G.double()
    K = G.shape[0]
    if name == "GradDrop":
        return torch.ones(K, dtype=torch.float64)
    if name == "DBMTL":
        reference = make(name, fused=False)
        reference(G64, losses_for(name, K))
        B = reference.buffer
        norms = B.norm(dim=1)
        alpha = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        return alpha * (B * G64).sum(dim=1) / (G64 * G64).sum(dim=1).clamp_min(1e-300)
    return make(name, fused=False).weights(G64 @ G64.T, losses_for(name, K)).double()


@functools.cache
def _reference_direction(name: str, K: int, N: int, seed: int, scale: float, dtype: torch.dtype) -> tuple:
    """(G, the reference's d, its effective weights w), shared by the three backends of one case."""
    G = random_G(K, N, scale=scale, seed=seed).to(dtype)
    expected = make(name, fused=False)(G, losses_for(name, K))
    return G, expected, _reference_weights(name, G)


def _weight_error(name: str, G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A bound on |w_fused − w| per task, measured rather than argued: the fused solver runs on the fused Gram
    M_f, not on the exact M, so |w_fused − w| ≤ |w_ref(M_f) − w_ref(M)| (the problem's own sensitivity to
    the Gram's rounding, read off the reference) + |w_fused(M_f) − w_ref(M_f)| (≤ WEIGHT_RTOL · max|w|, the
    solvers' agreement on one M, test_weights_parity_on_the_same_gram). Called under the backend tested, whose
    ``gram`` is the aggregator's own (same call, deterministic)."""
    if name not in SOLVED:
        return torch.zeros_like(w)
    K = G.shape[0]
    w_on_fused_gram = make(name, fused=False).weights(flatmtl_fast.gram(G, dtype=torch.float64), losses_for(name, K))
    return (w_on_fused_gram.double() - w).abs() + WEIGHT_RTOL[name] * float(w.abs().max())


def _check_direction(name: str, K: int, N: int, backend: str, dtype: torch.dtype, *, seed: int, scale=1.0) -> None:
    G, expected, w = _reference_direction(name, K, N, seed, scale, dtype)
    with flatmtl_fast.use_backend(backend):
        actual = make(name)(G, losses_for(name, K))
        tolerance = direction_tolerance(name, w, G, dtype, _weight_error(name, G, w))
    assert actual.shape == expected.shape and actual.dtype == G.dtype
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= tolerance).all()), f"{name} K={K}: max excess {float((err - tolerance).max())}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("name", ALL)
def test_direction_parity(name: str, K: int, dtype: torch.dtype, backend: str) -> None:
    _check_direction(name, K, 1001, backend, dtype, seed=K)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("scale", [1e-10, 1e10])
@pytest.mark.parametrize("name", ALL)
def test_direction_parity_extreme_scales(name: str, scale: float, dtype: torch.dtype, backend: str) -> None:
    """Gram entries ~1e±20 and their products in the solvers stay inside float32's and float64's range;
    bfloat16 has float32's exponent range."""
    _check_direction(name, 3, 7, backend, dtype, seed=3, scale=scale)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("name", GRAMIAN)
def test_weights_parity_on_the_same_gram(name: str, K: int) -> None:
    """weights(M) against the reference on one float64 M (no streaming error): the solver alone. The
    reference's cost at K = 64 (measured): ≤ 0.15 s per call (GradVac's pair loop; CVXPY's CAGrad/IMGrad
    0.02 s once compiled)."""
    G = random_G(K, 3 * K, seed=100 + K).double()
    M = G @ G.T
    fused, ref = make(name), make(name, fused=False)
    w, w_ref = fused.weights(M), ref.weights(M)
    assert w.dtype == w_ref.dtype
    scale = w_ref.abs().max()
    torch.testing.assert_close(w, w_ref, rtol=0, atol=float(WEIGHT_RTOL[name] * scale))


@pytest.mark.parametrize("name", ["CAGrad", "IMGrad"])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_simplex_objective_not_worse_than_reference(name: str, variant: str) -> None:
    from flatmtl_fast.reference._simplex import argmin_linear_plus_norm as reference_solve
    from flatmtl_fast.solvers import argmin_linear_plus_norm

    squared = variant == "paper"
    # (7, 50, 4) and (3, 3, 5): optima with ‖g_w‖ a few % of max‖g_i‖, close to the kink g_w = 0, where
    # Newton steps on the norm itself oscillated (objectives 0.15–0.35 above the optimum).
    for K, N, seed in ((2, 50, 2), (5, 50, 5), (9, 50, 9), (7, 50, 4), (3, 3, 5)):
        G = random_G(K, N, seed=seed).double()
        M = G @ G.T
        q = M.sum(1) / K * (0.3 if squared else 1.0)
        beta = 0.4 * float(q.sum() / K) ** 0.5
        w = argmin_linear_plus_norm(q, M, torch.tensor(beta, dtype=torch.float64), squared=squared)
        w_ref = reference_solve(q, M, beta, squared=squared)

        def objective(v: torch.Tensor, M=M, q=q, beta=beta) -> float:
            quadratic = float(v @ M @ v)
            return float(q @ v) + beta * (quadratic if squared else quadratic**0.5)

        assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0
        assert objective(w) <= objective(w_ref) + 1e-12 * abs(objective(w_ref))


@pytest.mark.parametrize("name", GRAMIAN)
@pytest.mark.parametrize("case", ["rank_deficient", "duplicated", "collinear", "zero", "zero_row", "N1"])
@pytest.mark.parametrize("backend", ["cpp", "reference"], ids=["native-solver", "torch-solver"])
def test_degenerate_inputs_match_reference_direction(name: str, case: str, backend: str) -> None:
    """Degenerate Grams: weights need not be unique, so compare the directions, with a tolerance scaled
    by max‖g_i‖ (singular problems lose the per-entry accuracy argument). Both solve paths: the native
    C++ solver (``cpp``) and the on-device torch solver (``reference`` backend of the solve)."""
    K = 5
    G = random_G(K, 40, rank=2, seed=7)
    if case == "duplicated":
        G[3] = G[1]
    elif case == "collinear":
        G[2] = -3.0 * G[0]
        G[4] = 2.0 * G[0]
    elif case == "zero":
        G.zero_()
    elif case == "zero_row":
        G = random_G(K, 40, seed=8)
        G[2] = 0.0
    elif case == "N1":
        G = random_G(K, 1, seed=9)
    expected = make(name, fused=False)(G)
    with flatmtl_fast.use_backend(backend):
        actual = make(name)(G)
    assert bool(torch.isfinite(actual).all())
    size = float(G.double().norm(dim=1).max()) * K + 1e-30
    # UPGrad/DualProj on singular M: both solve the same strictly convex (ridged) QP, 1e-4 relative;
    # MGDA/IMGrad on ties: Frank–Wolfe replay can diverge at exact ties of Mw only through rounding.
    tol = 2e-3 if name in ("CAGrad", "IMGrad", "MGDA", "NashMTL", "FairGrad", "IMTLG", "AlignedMTL") else 1e-4
    scale_of_result = max(float(expected.double().abs().max()), size * 1e-6)
    assert float((actual.double() - expected.double()).abs().max()) <= tol * max(scale_of_result, 1e-30) + 1e-6 * size


def _zero_in_hull(K: int, where: str, seed: int) -> torch.Tensor:
    """G (K × (2K + 4), small integers: the Gram is exact in float32) whose convex hull holds 0: strictly
    inside (g_K = −Σ a_i g_i, a_i ≥ 1), or on the edge of g₁ = p v and g₂ = −(7 − p) v (p = 3 or 4: the
    min-norm weights 4/7, 3/7 are inexact, so Frank–Wolfe's g_m ends at rounding level, not 0) with the other
    rows beside it, along a u ⟂ v with ‖u‖ ≥ 3‖v‖ (plus ±1 noise on a fifth of the entries)."""
    gen = torch.Generator().manual_seed(seed)
    N = 2 * K + 4

    def integers(low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=gen).float()

    if where == "inside":
        G = integers(-4, 5, K, N)
        G[-1] = -integers(1, 4, K - 1) @ G[:-1]
        return G
    half = N // 2
    v = torch.cat([2.0 * integers(0, 2, half) - 1.0, torch.zeros(half)])  # ±1, then 0
    u = torch.cat([torch.zeros(half), (2.0 * integers(0, 2, half) - 1.0) * integers(3, 5, half)])  # 0, then ±3/±4
    p = integers(3, 5, 1)
    noise = integers(-1, 2, K - 2, N) * (torch.rand(K - 2, N, generator=gen) < 0.2)
    others = integers(1, 4, K - 2, 1) * u + noise
    return torch.cat([p * v[None], (p - 7.0) * v[None], others])


@pytest.mark.parametrize("K", [2, 3, 7])
@pytest.mark.parametrize("where", ["inside", "face"])
@pytest.mark.parametrize(
    ("name", "kwargs"), [("CAGrad", {}), ("CAGrad", {"c": 2.0}), ("IMGrad", {}), ("IMGrad", {"variant": "paper"})]
)
@pytest.mark.parametrize("backend", ["cpp", "reference"], ids=["native-solver", "torch-solver"])
def test_zero_in_hull_matches_reference(name: str, kwargs: dict, where: str, K: int, backend: str) -> None:
    """0 in the hull of the g_i makes g_w = 0 feasible. CAGrad's optimum is then the kink g_w = 0, at a
    non-vertex point of Δ, for c ≥ 1, and for c < 1 when 0 is on an edge the other rows lie beside; the
    reference drops the g_w term there (‖g_w‖ ≤ 1e-6 max‖g_i‖). IMGrad's g_m is 0, hence cos θ = 0. Weights
    (same M) and directions must match the reference's, kink decision included, on both solve paths.
    Integer entries keep the fused float32 Gram exact: its rounding alone would leave ‖g_w‖ ~1e-4 max‖g_i‖
    at the kink."""
    for seed in range(3):
        G = _zero_in_hull(K, where, seed)
        M = G.double() @ G.double().T
        reference = getattr(flatmtl_fast.reference, name)(**kwargs)
        w_ref, d_ref = reference.weights(M), reference(G)
        with flatmtl_fast.use_backend(backend):
            fused = getattr(flatmtl_fast, name)(**kwargs)
            w, d = fused.weights(M), fused(G)
        if name == "CAGrad" and (kwargs or (where == "face" and K > 2)):
            assert bool((w_ref == w_ref[0]).all()), "not a kink case: the reference keeps the g_w term"
        atol = WEIGHT_RTOL[name] * float(w_ref.abs().max())
        torch.testing.assert_close(w, w_ref, rtol=0, atol=atol)
        torch.testing.assert_close(d, d_ref, rtol=0, atol=atol * float(G.abs().sum(dim=0).max()))


@pytest.mark.parametrize("K", [2, 7, 40])
@pytest.mark.parametrize("name", GRAMIAN)
def test_two_fused_paths_agree(name: str, K: int) -> None:
    """The check of the GPU test (each CUDA backend against the CPU path) run on the CPU, so CI exercises its
    measured tolerance: the torch solvers behind torch's Gram (``reference`` backend) against the cpp path."""
    G = random_G(K, 20_011, seed=K)
    assert_paths_agree(name, G, ("cpp", G), ("reference", G))
