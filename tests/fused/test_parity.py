"""Every fused aggregator equals its reference (flatmtl_fast.reference) on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from fused._util import ALL, GRAMIAN, WEIGHT_RTOL, direction_tolerance, losses_for, make, random_G

import flatmtl_fast

SLOW_REFERENCE = ("UPGrad", "CAGrad", "IMGrad")  # quadprog per row / cvxpy: keep their K small enough


def _reference_weights(name: str, G: torch.Tensor) -> torch.Tensor:
    """The reference's weights on the exact float64 Gram of G (for the tolerance's magnitude m)."""
    G64 = G.double()
    if name in ("GradDrop", "DBMTL"):
        return torch.ones(G.shape[0], dtype=torch.float64) * (10.0 if name == "DBMTL" else 1.0)
    return make(name, fused=False).weights(G64 @ G64.T, losses_for(name, G.shape[0])).double()


def _check_direction(name: str, G: torch.Tensor, backend: str, out_dtype: torch.dtype | None = None) -> None:
    K = G.shape[0]
    losses = losses_for(name, K)
    expected = make(name, fused=False)(G, losses)
    with flatmtl_fast.use_backend(backend):
        actual = make(name)(G, losses)
    assert actual.shape == expected.shape and actual.dtype == G.dtype
    tolerance = direction_tolerance(name, _reference_weights(name, G), G, G.dtype)
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= tolerance).all()), f"{name} K={K}: max excess {float((err - tolerance).max())}"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 40, 64])
def test_direction_parity_cpu_backends(name: str, K: int) -> None:
    if name == "UPGrad" and K == 64:
        pytest.skip("64 quadprog QPs per reference call: covered at K = 40")
    N = 1001 if K < 40 else 2 * K + 1
    for backend, dtype in (("cpp", torch.float32), ("reference", torch.bfloat16)):
        _check_direction(name, random_G(K, N, seed=K).to(dtype), backend)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("K", [1, 3, 7])
def test_direction_parity_triton_interpreter(name: str, K: int) -> None:
    _check_direction(name, random_G(K, 1001, seed=10 + K), "triton")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [1e-10, 1e10])
def test_direction_parity_extreme_scales(name: str, scale: float) -> None:
    _check_direction(name, random_G(3, 7, scale=scale, seed=3), "cpp")


@pytest.mark.parametrize("name", GRAMIAN)
@pytest.mark.parametrize("K", [2, 3, 7, 40])
def test_weights_parity_on_the_same_gram(name: str, K: int) -> None:
    """weights(M) against the reference on one float64 M (no streaming error): the solver alone."""
    if name in SLOW_REFERENCE and K == 40:
        K = 12
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
    for K in (2, 5, 9):
        G = random_G(K, 50, seed=K).double()
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
    if (name, case) == ("IMGrad", "N1") or (name, case, backend) == ("CAGrad", "collinear", "reference"):
        # Known gap: the optimum sits where g_w = 0 at a non-vertex point of the simplex. The torch
        # interior-point solver approaches it too slowly for the reference's "g_w counts as zero" threshold
        # to fire alike (the native solver handles CAGrad's case); IMGrad with N = 1 differs on both paths.
        pytest.xfail("CAGrad/IMGrad optimum at the kink g_w = 0 (non-vertex): solver gap, see comment")
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
