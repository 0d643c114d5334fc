"""The native K × K solvers (csrc/include/flatmtl/solvers/, bound as ``_C.solve_<name>``) against the
reference classes' ``weights(M)`` on fresh random Gramians: K = 1, 2, 3, 7, 40, 64 (and 128 for the
solvers whose cost grows fastest: UPGrad/DualProj, IMTL-G, CAGrad/IMGrad, Nash-MTL, FairGrad);
full-rank, rank-deficient, duplicated-row, collinear-row and zero G; scales 1e-10, 1, 1e10 (at K = 128,
where the references — a quadprog QP per row, cvxpy — take seconds: full and collinear G at scale 1).

Tolerances (the arithmetic behind each is in the comment where it is used) are stated relative to the
natural size of the quantity compared, mostly the rounding scale of the direction d = wᵀG:
``scale(w) = Σ_i |w_i| ‖g_i‖`` (a combination cannot be known better than eps · that).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import flatmtl_fast
from flatmtl_fast import _native, solvers
from flatmtl_fast import reference as R
from flatmtl_fast.reference._simplex import FW_MAX_ITER, FW_STOP_CRIT
from flatmtl_fast.solvers import fair_weights, imtlg_weights, native

C = _native.module()
pytestmark = pytest.mark.skipif(C is None, reason=f"native module missing: {_native.load_error()}")

KS = (1, 2, 3, 7, 40, 64)
LARGE_KS = (*KS, 128)
#: "zero_rows": every third task (the first included) without gradient, the others random — a task absent from a
#: batch; "zero": all of them.
KINDS = ("full", "rank_deficient", "duplicated", "collinear", "zero_rows", "zero")
LARGE_K_KINDS = ("full", "collinear")  # at K = 128 (slow references)
SCALES = (1e-10, 1.0, 1e10)
EPS64 = torch.finfo(torch.float64).eps


def make_G(K: int, kind: str, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    N = 2 * K + 3
    if kind == "zero":
        return torch.zeros(K, N, dtype=torch.float64)
    if kind == "rank_deficient":
        r = max(1, K // 2)
        A = torch.randn(K, r, generator=gen, dtype=torch.float64)
        G = A @ torch.randn(r, N, generator=gen, dtype=torch.float64)
    elif kind == "collinear":
        # Each row a multiple ±[0.5, 2] of one of K/3 directions: conflicting (opposite) and agreeing copies.
        distinct = max(1, K // 3)
        base = torch.randn(distinct, N, generator=gen, dtype=torch.float64)[torch.arange(K) % distinct]
        factors = (torch.rand(K, 1, generator=gen, dtype=torch.float64) * 1.5 + 0.5) * (
            torch.randint(0, 2, (K, 1), generator=gen).to(torch.float64) * 2 - 1
        )
        G = base * factors
    else:
        distinct = max(1, 2 * K // 3) if kind == "duplicated" else K
        G = torch.randn(distinct, N, generator=gen, dtype=torch.float64)[torch.arange(K) % distinct]
        if kind == "zero_rows":
            G[torch.arange(K) % 3 == 0] = 0.0
    return G * scale


def seed_of(*key) -> int:
    """A seed per test case that does not depend on PYTHONHASHSEED."""
    return zlib.crc32(repr(key).encode())


def cases(kinds=KINDS, ks=KS, scales=SCALES):
    out = []
    for K in ks:
        for kind in kinds:
            if K > 64 and kind not in LARGE_K_KINDS:
                continue
            for scale in (1.0,) if kind == "zero" or K > 64 else scales:
                out.append(pytest.param(K, kind, scale, id=f"K{K}-{kind}-{scale:g}"))
    return out


def solve(name: str, M: torch.Tensor, *params) -> tuple[torch.Tensor, int, bool]:
    """Native weights, iterations, converged (float64 CPU tensors; raw addresses as the bindings take)."""
    K = M.shape[0]
    M = M.contiguous()
    w = torch.full((K,), float("nan"), dtype=torch.float64)
    work = torch.full((max(1, getattr(C, f"solve_{name}_work_size")(K)),), float("nan"), dtype=torch.float64)
    iterations, converged = getattr(C, f"solve_{name}")(M.data_ptr(), K, *params, w.data_ptr(), work.data_ptr())
    return w, iterations, converged


def direction_scale(w: torch.Tensor, G: torch.Tensor) -> float:
    return float((w.abs() * G.norm(dim=1)).sum())


def assert_same_direction(w: torch.Tensor, w_ref: torch.Tensor, G: torch.Tensor, rtol: float) -> None:
    """‖(w − w_ref)ᵀG‖ ≤ rtol · Σ|w_ref,i|‖g_i‖ (+ the smallest normal, for G = 0)."""
    assert torch.isfinite(w).all(), w
    error = float(((w - w_ref) @ G).norm())
    assert error <= rtol * direction_scale(w_ref, G) + 1e-300, (error, direction_scale(w_ref, G), w, w_ref)


# ---------------------------------------------------------------------------------------------- Mean / Sum


@pytest.mark.parametrize("K", KS)
def test_mean_sum(K):
    M = torch.eye(K, dtype=torch.float64)
    assert torch.equal(solve("mean", M)[0], R.Mean().weights(M))
    assert torch.equal(solve("sum", M)[0], R.Sum().weights(M))


# ---------------------------------------------------------------------------------------------------- MGDA

NORMALIZE_CODES = {"none": 0, "l2": 1, "loss": 2, "loss+": 3}


@pytest.mark.parametrize(("K", "kind", "scale"), cases())
@pytest.mark.parametrize("normalize", list(NORMALIZE_CODES))
def test_mgda(K, kind, scale, normalize):
    seed = seed_of(K, kind, scale, normalize)
    G = make_G(K, kind, scale, seed)
    M = G @ G.T
    losses = torch.rand(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    w_ref = R.MGDA(normalize=normalize).weights(M, losses if normalize.startswith("loss") else None)
    w, iterations, converged = solve(
        "mgda", M, NORMALIZE_CODES[normalize], losses.data_ptr(), FW_MAX_ITER, FW_STOP_CRIT
    )
    # Same Frank–Wolfe steps in the same order; only the summation order inside M w and wᵀMw differs
    # (≈ K eps relative per step), and each step is a convex combination, so the iterates stay within
    # a few hundred eps of the reference's after 250 steps: 1e-10 leaves room for K = 64.
    assert_same_direction(w, w_ref, G, 1e-10)
    assert 0 <= iterations <= FW_MAX_ITER
    assert converged == (K == 1 or iterations < FW_MAX_ITER)


def test_mgda_budget_and_stop_rule():
    G = make_G(7, "full", 1.0, 3)
    M = G @ G.T
    losses = torch.ones(7, dtype=torch.float64)
    w, iterations, converged = solve("mgda", M, 0, losses.data_ptr(), 0, FW_STOP_CRIT)
    assert (iterations, converged) == (0, False)  # the best-pair start alone
    assert torch.allclose(w, R.MGDA(max_iter=0).weights(M), rtol=0, atol=1e-15)
    w, iterations, converged = solve("mgda", M, 0, losses.data_ptr(), 5, 1e9)
    assert (iterations, converged) == (0, True)  # every step is below a huge stop_crit
    w, iterations, converged = solve("mgda", M, 0, losses.data_ptr(), 10_000, 1e-12)
    assert converged and 0 < iterations < 10_000
    assert_same_direction(w, R.MGDA(max_iter=10_000, stop_crit=1e-12).weights(M), G, 1e-10)
    # Golden value of algorithms.md §3: J = [[-4, 1, 1], [6, 1, 1]] → weights [0.6, 0.4].
    J = torch.tensor([[-4.0, 1, 1], [6.0, 1, 1]], dtype=torch.float64)
    assert torch.allclose(solve("mgda", J @ J.T, 0, 0, 250, 1e-5)[0], torch.tensor([0.6, 0.4], dtype=torch.float64))


# -------------------------------------------------------------------------------------------- PCGrad / GradVac


@pytest.mark.parametrize(("K", "kind", "scale"), cases())
def test_pcgrad(K, kind, scale):
    seed = seed_of(K, kind, scale)
    G = make_G(K, kind, scale, seed)
    M = G @ G.T
    gen = torch.Generator().manual_seed(seed)
    reference = R.PCGrad(generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the draws of consecutive calls
        keys = torch.rand((K, K), generator=gen, dtype=torch.float64)  # the reference's one draw per call
        w, iterations, converged = solve("pcgrad", M, keys.data_ptr())
        # Same projections in the same order; every inner product is a K-term sum read from M (here
        # updated incrementally, there recomputed), so each coefficient agrees to ~K eps of the terms
        # it cancels. Collinear / duplicated rows cancel g_i' down to rounding noise in both, which
        # is why the bound is relative to Σ|w_i|‖g_i‖ rather than to ‖d‖.
        assert_same_direction(w, reference.weights(M), G, 1e-11)
        assert (iterations, converged) == (0, True)


@pytest.mark.parametrize(("K", "kind", "scale"), cases())
def test_gradvac(K, kind, scale):
    seed = seed_of(K, kind, scale, "gv")
    G = make_G(K, kind, scale, seed)
    M = G @ G.T
    gen = torch.Generator().manual_seed(seed)
    reference = R.GradVac(beta=0.5, generator=torch.Generator().manual_seed(seed))
    phi_hat = torch.zeros(K, K, dtype=torch.float64)
    for call in range(3):  # the targets start at 0 and then drive the corrections
        keys = torch.rand((K, K), generator=gen, dtype=torch.float64)
        w, _, _ = solve("gradvac", M, keys.data_ptr(), phi_hat.data_ptr(), 0.5, 1e-8)
        w_ref = reference.weights(M)
        assert torch.isfinite(w).all()
        # Same arithmetic as PCGrad plus ‖g_i'‖ (a K-term dot) and a few square roots: each cosine agrees
        # to ~K eps. For collinear or duplicated rows the cosine of a cancelled g_i' is rounding noise
        # divided by ‖g_i'‖‖g_j‖ + eps in both implementations (the reference even reaches φ̂ ≈ 1e13
        # there), so such targets, and the later calls they drive, are compared on full-rank G only.
        if kind == "full" or call == 0:
            assert_same_direction(w, w_ref, G, 1e-10)
        if kind == "full":
            assert torch.allclose(phi_hat, reference.phi_hat, rtol=0, atol=1e-9)


def test_pcgrad_order_ties_go_to_lower_index():
    # g_1 conflicts with g_0 and g_2 differently depending on the order; equal keys → ascending j.
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    M = G @ G.T
    keys = torch.zeros(3, 3, dtype=torch.float64)
    w, _, _ = solve("pcgrad", M, keys.data_ptr())
    # Row-by-row by hand with orders [1, 2], [0, 2], [0, 1] (what a stable argsort of equal keys gives).
    expected = torch.zeros(3, dtype=torch.float64)
    for i, order in enumerate(([1, 2], [0, 2], [0, 1])):
        g = G[i].clone()
        c = torch.zeros(3, dtype=torch.float64)
        c[i] = 1
        for j in order:
            dot = float(g @ G[j])
            if dot < 0:
                g -= dot / float(G[j] @ G[j]) * G[j]
                c[j] -= dot / float(G[j] @ G[j])
        expected += c
    assert torch.allclose(w, expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------- IMTL-G


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
def test_imtlg(K, kind, scale):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, "imtl"))
    M = G @ G.T
    w_ref = R.IMTLG().weights(M)
    w, _, converged = solve("imtlg", M, EPS64)
    # The closed form is (g_1 Uᵀ)(D Uᵀ)⁺ with the same cut-off; torch's pinv (LAPACK SVD) and the
    # pivoted QR (or Jacobi SVD) here each have backward error ~ n eps ‖D Uᵀ‖, so α agrees to about
    # n eps cond(D Uᵀ) (measured ≤ 2e-14 relative up to K = 128). Singular values that are pure rounding
    # (duplicated / collinear rows) lie orders of magnitude below the cut-off 4 K eps max‖g_i‖ in both.
    assert converged
    assert torch.isfinite(w).all()
    assert float((w - w_ref).abs().max()) <= 1e-8 * max(1.0, float(w_ref.abs().max())), (w, w_ref)
    # The torch solver (the GPU's without the native module): LAPACK's SVD, the same argument.
    w_torch = imtlg_weights(M, torch.float64)
    assert float((w_torch - w_ref).abs().max()) <= 1e-8 * max(1.0, float(w_ref.abs().max())), (w_torch, w_ref)
    # A task without gradient takes no part: weight exactly 0 (in every solver), the others' weights sum to 1.
    zero = M.diagonal() == 0
    if not zero.all():
        assert not w[zero].any() and not w_torch[zero].any() and not w_ref[zero].any()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_imtlg_singular_values_near_the_cutoff():
    """Three near-duplicate pairs g_j = g_i + δ e (e orthonormal) give three singular values ∝ δ² that
    cross the float32 cut-off 4 K eps32 max‖g_i‖ as δ sweeps: the pivoted QR proves the rank when its
    bounds (σ_r ≥ 1/‖R11⁻¹‖_F, σ_{r+1} ≤ ‖R22‖_F) separate from the cut-off and the Jacobi SVD decides
    otherwise (reported as its sweeps > 0); both must give the truncated pseudo-inverse of the torch
    solver. Kept singular values exceed the cut-off, so cond ≤ ‖D Uᵀ‖/cut-off ≲ 1/eps32 and the two
    agree to n eps64 / eps32 ≈ 1e-8 relative at worst (measured ≤ 1e-9)."""
    K = 7
    gen = torch.Generator().manual_seed(0)
    G0 = torch.randn(K, 20, generator=gen, dtype=torch.float64)
    E = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=torch.float64))[0].T
    paths = set()
    for delta in torch.logspace(-2.5, -1.5, 11).tolist():
        G = G0.clone()
        for a, (i, j) in enumerate([(1, 4), (2, 5), (3, 6)]):
            G[j] = G[i] + delta * E[a]
        M = G @ G.T
        w, sweeps, converged = solve("imtlg", M, torch.finfo(torch.float32).eps)
        w_ref = imtlg_weights(M, torch.float32)
        assert converged
        assert float((w - w_ref).abs().max()) <= 1e-7 * max(1.0, float(w_ref.abs().max())), (delta, w, w_ref)
        paths.add(sweeps > 0)
        # Both paths on a team of CPU threads, as the CUDA kernel runs them: the single worker's bits.
        w_team, status_team, _ = _run("imtlg", M, (torch.finfo(torch.float32).eps,), 3, 3)
        assert torch.equal(w_team, w) and status_team == (sweeps, converged), delta
    assert paths == {False, True}  # both the QR and the Jacobi path ran


# -------------------------------------------------------------------------------------------- Aligned-MTL

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
def test_aligned_mtl(K, kind, scale):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, "aligned"))
    M = G @ G.T
    w, sweeps, converged = solve("aligned_mtl", M, EPS32)
    # Both compute the same spectral function w = √λ_min f(M)𝟏, f(λ) = λ^(-1/2) on the kept eigenvalues, whatever
    # the eigenvectors of repeated eigenvalues. Backward errors: LAPACK's eigh ~ K eps ‖M‖; the pivoted Cholesky
    # (its dropped Schur complement) and the rotations here ~ K eps max M_ii. Such a perturbation moves w by about
    # its size over λ_min relative, and λ_min > K eps32 λ_max: ≤ eps64 / eps32 ≈ 2e-9 (measured ≤ 5e-14). The
    # eigenvalues of rank-deficient, duplicated and collinear G are either O(1) λ_max or rounding, far from the
    # cut-off K eps32 λ_max, so both keep the same ones.
    assert converged and 0 <= sweeps < 64
    w_ref = R.AlignedMTL().weights(M)
    assert float((w - w_ref).abs().max()) <= 1e-8 * float(w_ref.abs().max()), (w, w_ref)


@pytest.mark.parametrize("K", [1, 2, 3, 7, 40])
def test_aligned_mtl_of_a_symmetric_matrix_that_is_not_a_gram(K):
    """Not positive semidefinite beyond rounding: the Cholesky factor would misrepresent M, so Jacobi runs on M
    itself and gives the reference's answer (its negative eigenvalues are dropped, as any below the cut-off),
    on a team of CPU threads too."""
    G = make_G(K, "full", 1.0, seed_of(K, "indefinite"))
    # Shifted by the mean eigenvalue: some eigenvalues are negative, the largest positive.
    M = G @ G.T - float(G.norm(dim=1).square().mean()) * torch.eye(K, dtype=torch.float64)
    if K == 1:
        M = -(G @ G.T)  # no eigenvalue kept: w = 𝟏
    assert float(torch.linalg.eigvalsh(M)[0]) < 0
    w, _, converged = solve("aligned_mtl", M, EPS32)
    w_ref = R.AlignedMTL().weights(M)
    assert converged
    # As test_aligned_mtl, with the symmetric Jacobi's backward error K eps max|M_ij|.
    assert float((w - w_ref).abs().max()) <= 1e-8 * float(w_ref.abs().max()), (w, w_ref)
    for threads in (2, 3, K + 2):
        assert torch.equal(_run("aligned_mtl", M, (EPS32,), threads, threads)[0], w)


# --------------------------------------------------------------------------------------- UPGrad / DualProj


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
@pytest.mark.parametrize("method", ["upgrad", "dualproj"])
def test_dual_cone(K, kind, scale, method):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, method))
    M = G @ G.T
    cls = {"upgrad": R.UPGrad, "dualproj": R.DualProj}[method]
    # Both solve the same strictly convex QP exactly (active sets, to rounding); the normalised P has
    # eigenvalues in [1e-4, 1 + 1e-4], so the solutions agree to ~cond(P) K eps ≈ 1e-10 relative.
    w, iterations, converged = solve(method, M, 0, 0.0, 1e-4)
    w_ref = cls().weights(M)
    assert converged and iterations >= 0
    assert float((w - w_ref).abs().max()) <= 1e-9 * float(w_ref.abs().max()), (w, w_ref)
    if K > 64:
        return  # the reference's K quadprog calls take a second here; the contract below is K-independent
    # A preference vector and torchjd's norm_eps: same contract.
    pref = torch.rand(K, generator=torch.Generator().manual_seed(K), dtype=torch.float64) + 0.5
    w, _, converged = solve(method, M, pref.data_ptr(), 1e-4, 1e-4)
    w_ref = cls(pref, norm_eps=1e-4).weights(M)
    assert converged
    assert float((w - w_ref).abs().max()) <= 1e-9 * float(w_ref.abs().max()), (w, w_ref)


def test_upgrad_golden_value():
    J = torch.tensor([[-4.0, 1, 1], [6.0, 1, 1]], dtype=torch.float64)
    w, _, _ = solve("upgrad", J @ J.T, 0, 0.0, 1e-4)
    assert torch.allclose(w @ J, torch.tensor([0.2929, 1.9004, 1.9004], dtype=torch.float64), atol=1e-4)


# ------------------------------------------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
def test_nash_mtl(K, kind, scale):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, "nash"))
    M = G @ G.T
    reference = R.NashMTL(update_weights_every=2)
    alpha = torch.ones(K, dtype=torch.float64)
    for step in range(3):  # solve, reuse (update_weights_every = 2), solve again from the warm start
        w, _, converged = solve("nash_mtl", M, alpha.data_ptr(), 100, 1.0, step % 2 == 0, EPS64)
        w_ref = reference.weights(M)
        # Newton to max_i|α_i(Mα)_i − 1| ≤ 1e-10 in both; from there one more (quadratic) step would
        # move α by less than that, so α agrees to ~1e-10 relative up to the conditioning of M + diag(α⁻²).
        assert torch.allclose(w, w_ref, rtol=1e-8, atol=0), (w, w_ref)
        assert torch.allclose(alpha, reference._alpha, rtol=1e-8, atol=0)
        if kind == "full":  # M nonsingular: a solution exists and Newton finds it
            assert converged


def test_nash_mtl_no_solution_keeps_alpha():
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # opposite rows: Mα = 1/α is infeasible
    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64)
    w, iterations, converged = solve("nash_mtl", G @ G.T, alpha.data_ptr(), 100, 0.0, True, EPS64)
    assert not converged and iterations >= 1
    assert torch.equal(alpha, torch.tensor([0.3, 0.7], dtype=torch.float64)) and torch.equal(w, alpha)


# ------------------------------------------------------------------------------------------------- FairGrad


def fairgrad_cases():
    """α = 1 on every case (K = 128: full G only — without a solution the reference runs its whole budget
    of Newton steps and halvings in Python, seconds), other α on a few."""
    out = [pytest.param(*case.values, 1.0, id=f"{case.id}-a1") for case in cases(ks=LARGE_KS)]
    out = [case for case in out if case.values[0] <= 64 or case.values[1] == "full"]
    for case in cases(ks=(2, 7, 40), scales=(1.0,)):
        out += [pytest.param(*case.values, alpha, id=f"{case.id}-a{alpha:g}") for alpha in (0.5, 2.0)]
    return out


@pytest.mark.parametrize(("K", "kind", "scale", "alpha"), fairgrad_cases())
def test_fairgrad(K, kind, scale, alpha):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, alpha, "fair"))
    M = G @ G.T
    w, iterations, converged = solve("fairgrad", M, alpha, EPS64)
    # The reference's Newton iteration (same starts, line search, stop rule max_i|w_i^{1/α}(Mw)_i − 1| ≤ 1e-10)
    # up to summation order and Cholesky here vs LU there: the iterates agree to rounding times the
    # conditioning of M + diag(w^{−1/α−1}/α), and a stop one step apart moves w by less than the residual
    # 1e-10 (quadratic convergence), hence 1e-8 relative as for Nash-MTL (measured ≤ 1e-12). No solution
    # (opposite or collinear conflicting rows): 1/K in all three. The torch solver runs its full budget
    # of 101 Newton steps with 40 trial points each: compared up to K = 40 only (seconds beyond).
    others = [R.FairGrad(alpha).weights(M)] + ([fair_weights(M, alpha, EPS64)] if K <= 40 else [])
    for w_other in others:
        assert torch.allclose(w, w_other, rtol=1e-8, atol=0), (w, w_other)
    assert 0 <= iterations <= 101
    if kind == "full":  # M nonsingular: a solution exists and Newton finds it
        assert converged and bool((w > 0).all())


def test_fairgrad_no_solution_gives_uniform_and_zero_rows_weight_zero():
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # 0 = g_1 + g_2
    w, _, converged = solve("fairgrad", G @ G.T, 1.0, EPS64)
    assert not converged and torch.equal(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    G[1] = torch.tensor([0.0, 2.0])
    w, _, converged = solve("fairgrad", G @ G.T, 1.0, EPS64)
    # Orthogonal rows: w_i ‖g_i‖² = 1/w_i, w_i = 1/‖g_i‖; the zero row keeps weight 0.
    assert converged and torch.allclose(w, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)


def _nash_and_fairgrad_on_every_path(M: torch.Tensor, start: torch.Tensor, eps: float):
    """Nash-MTL (warm start ``start``) and FairGrad (α = 1) on M with unit roundoff ``eps``: the native
    (w, converged) of each, and {other path: (its weights, or None for no solution; the native w to match)}."""
    alpha = start.clone()  # the warm start, updated in place
    w, _, converged = solve("nash_mtl", M, alpha.data_ptr(), 100, 0.0, True, eps)
    w_fair, _, converged_fair = solve("fairgrad", M, 1.0, eps)
    others = {
        "reference nash": (R.nash_mtl.nash_weights(M, start, 100, eps), w),
        "torch nash": (solvers.nash_weights(M, start, 100, eps), w),
        "reference fairgrad": (R.fairgrad.fair_weights(M, 1.0, eps), w_fair),
        "torch fairgrad": (fair_weights(M, 1.0, eps), w_fair),
    }
    return (w, converged), (w_fair, converged_fair), others


def _assert_every_path_agrees(others: dict, G: torch.Tensor) -> None:
    for name, (other, native_w) in others.items():
        assert other is not None, name
        assert_same_direction(other, native_w, G, 1e-10)


@pytest.mark.parametrize("K", [3, 7])
@pytest.mark.parametrize("gap", [1e-3, 1e-4])
def test_nash_mtl_and_fairgrad_on_nearly_opposite_gradients(K, gap):
    """g_2 = −g_1 + gap·e (cond(M) ≈ 5e6 at gap 1e-3, 5e8 at 1e-4): α_i (Mα)_i cannot be evaluated better than
    about cond(M)·eps, so the residual stalls above 1e-10 (at ~1e-8 for gap 1e-4) and a stop test of 1e-10 alone
    discarded the solution ("no solution": Nash-MTL kept its previous α, FairGrad returned 1/K). All three paths
    stop where Newton stalls below 1e-6 and agree on d to rounding times cond(M) (measured ≤ 1e-12)."""
    gen = torch.Generator().manual_seed(seed_of(K, gap, "opposite"))
    G = torch.randn(K, 50, generator=gen, dtype=torch.float64)
    G[1] = -G[0] + gap * torch.randn(50, generator=gen, dtype=torch.float64)
    M = G @ G.T
    (w, converged), (w_fair, converged_fair), others = _nash_and_fairgrad_on_every_path(
        M, torch.ones(K, dtype=torch.float64), EPS64
    )
    assert converged and converged_fair
    for solution in (w, w_fair):
        assert float((solution * (M @ solution) - 1.0).abs().max()) <= 1e-6
    _assert_every_path_agrees(others, G)


@pytest.mark.parametrize("K", [2, 3, 7, 64])
def test_a_solution_within_the_rounding_of_the_gram_counts_as_none(K):
    """g_2 = −0.7 g_1: no solution (0.7 g_1 + g_2 = 0). M + 1e-8·diag(M), what rounding a float32 accumulation
    leaves (unit roundoff 6e-8), is positive definite, and Newton converges on it with α ~ 600 on the pair:
    every path accepts that solution when M's unit roundoff is float64's (directions measured ≤ 2e-16 apart);
    with float32's, g_1·d and g_2·d are below their rounding eps·√M_ii·Σ_j α_j √M_jj and every path reports
    none: Nash-MTL keeps the previous α, FairGrad gives 1/K. (Such a pair of float32 gradients through the fused
    float32 Gram gave α ~ 5e3; with K = 64 and a shared component the earlier test on ‖d‖² alone, diluted by
    the other tasks, accepted it.)"""
    gen = torch.Generator().manual_seed(seed_of(K, "rounding"))
    G = torch.randn(K, 50, generator=gen, dtype=torch.float64) + 3 * torch.randn(
        1, 50, generator=gen, dtype=torch.float64
    )
    G[1] = -0.7 * G[0]
    M = G @ G.T
    M += 1e-8 * torch.diag(M.diagonal())
    start = torch.full((K,), 0.5, dtype=torch.float64)
    for eps, found in ((EPS64, True), (torch.finfo(torch.float32).eps, False)):
        (w, converged), (w_fair, converged_fair), others = _nash_and_fairgrad_on_every_path(M, start, eps)
        assert converged == found and converged_fair == found, eps
        if found:
            assert float(w.max()) > 1e2  # α along 0.7 g_1 + g_2 = 0 grows as the ridge shrinks
            _assert_every_path_agrees(others, G)
        else:
            uniform = torch.full((K,), 1.0 / K, dtype=torch.float64)
            assert torch.equal(w, start) and torch.equal(w_fair, uniform)
            assert others["reference nash"][0] is None and others["reference fairgrad"][0] is None
            assert torch.equal(others["torch nash"][0], start) and torch.equal(others["torch fairgrad"][0], uniform)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_fairgrad_and_nash_at_extreme_scales(scale):
    """Gradients at 1e±100 (Gram entries 1e±200, whose squares leave the double range): the solvers
    normalise by a scaled Frobenius norm, so w_i (Mw)_i = 1 (α = 1 for both) holds as at scale 1 — to the
    stop tolerance 1e-10 of the scale-free residual, plus rounding. (The reference gives up here.)"""
    G = make_G(5, "full", scale, 3)
    M = G @ G.T
    alpha = torch.ones(5, dtype=torch.float64)
    for name, params in (("fairgrad", (1.0, EPS64)), ("nash_mtl", (alpha.data_ptr(), 20, 0.0, True, EPS64))):
        w, _, converged = solve(name, M, *params)
        assert converged, name
        assert float((w * (M @ w) - 1.0).abs().max()) <= 1e-9, (name, w)


SCALE_FREE = ("MGDA", "PCGrad", "CAGrad", "IMTLG", "AlignedMTL", "UPGrad", "DualProj", "IMGrad")


@pytest.mark.parametrize("K", [2, 7, 40])
@pytest.mark.parametrize("exponent", [-1000, -500, 500, 1000])
def test_scale_free_solvers_at_the_ends_of_the_double_range(K, exponent):
    """The methods whose weights do not change when M is scaled, on M · 2^±1000 (Gram entries up to 1e±301, as
    float64 gradients of norm 1e±150 give): a power of two scales exactly, so any difference from the weights of
    M is a product or a square that left the double range. (Aligned-MTL's used to, above 1e153.)"""
    G = make_G(K, "full", 1.0, seed_of(K, "range"))
    M = G @ G.T

    def weights(name: str, M: torch.Tensor) -> torch.Tensor:
        kwargs = {"generator": torch.Generator().manual_seed(0)} if name == "PCGrad" else {}
        with flatmtl_fast.use_backend("cpp"):
            return getattr(flatmtl_fast, name)(**kwargs).weights(M)

    for name in SCALE_FREE:
        w, scaled = weights(name, M), weights(name, M * 2.0**exponent)
        # Iterative solvers stop on scale-free tests, so they take the same steps: rounding only.
        torch.testing.assert_close(scaled, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()), msg=name)


# ------------------------------------------------------------------------------------------ CAGrad / IMGrad


def _objective(w, q, M, beta, squared):
    quad = max(float(w @ M @ w), 0.0)
    return float(q @ w) + beta * (quad if squared else math.sqrt(quad))


def _check_conflict_averse(w, w_ref, G, M, factor, q, beta, squared):
    """w = factor (1/K + λ w*): w* must be at least as good as the reference's (CLARABEL, ~1e-8), and the
    directions close. An objective error ε of the reference moves its w* by O(√ε) along the flat
    directions of the problem, hence the loose direction bound (measured ≤ 1e-4)."""
    K = M.shape[0]
    assert_same_direction(w, w_ref, G, 1e-3)
    lam, lam_ref = float((w / factor - 1 / K).sum()), float((w_ref / factor - 1 / K).sum())
    if lam > 0 and lam_ref > 0:
        star, star_ref = (w / factor - 1 / K) / lam, (w_ref / factor - 1 / K) / lam_ref
        size = float(q.abs().max()) + beta * (float(M.trace()) if squared else math.sqrt(float(M.trace())))
        assert _objective(star, q, M, beta, squared) <= _objective(star_ref, q, M, beta, squared) + 1e-9 * size


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
@pytest.mark.parametrize(("c", "rescale", "sum_scale"), [(0.4, 1, False), (2.0, 2, True)])
def test_cagrad(K, kind, scale, c, rescale, sum_scale):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, c))
    M = G @ G.T
    reference = R.CAGrad(c=c, rescale=rescale, sum_scale=sum_scale)
    w, _, converged = solve("cagrad", M, c, rescale, sum_scale)
    assert converged
    b = M.sum(dim=1) / K
    radius = c * max(float(b.sum()) / K, 0.0) ** 0.5
    _check_conflict_averse(w, reference.weights(M), G, M, reference._output_factor(K), b, radius, False)


@pytest.mark.parametrize("K", [7, 9, 12, 16, 22])
def test_cagrad_tasks_of_very_different_scales(K):
    """‖g_i‖ spread over 1e-3 … 1e3: the inner QPs' ridge must be relative to each task's own ‖g_i‖²
    (one relative to tr(M) swamps the small tasks: objectives ~1e-7 · size above the reference's at
    K = 7, 9, 16, 22 with the previous solver)."""
    gen = torch.Generator().manual_seed(K)
    norms = torch.logspace(-3, 3, K, dtype=torch.float64)
    G = torch.randn(K, 2 * K, generator=gen, dtype=torch.float64) * norms[:, None]
    M = G @ G.T
    reference = R.CAGrad()
    w, _, converged = solve("cagrad", M, 0.4, 1, False)
    assert converged
    b = M.sum(dim=1) / K
    radius = 0.4 * max(float(b.sum()) / K, 0.0) ** 0.5
    _check_conflict_averse(w, reference.weights(M), G, M, reference._output_factor(K), b, radius, False)


@pytest.mark.parametrize(("K", "kind", "scale"), cases(ks=LARGE_KS))
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_imgrad(K, kind, scale, variant):
    G = make_G(K, kind, scale, seed_of(K, kind, scale, variant))
    M = G @ G.T
    w, _, converged = solve("imgrad", M, 0.8, variant == "paper")
    assert converged
    w_ref = R.IMGrad(alpha=0.8, variant=variant).weights(M)
    assert_same_direction(w, w_ref, G, 1e-3)  # the argument of _check_conflict_averse


# ------------------------------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    M = torch.eye(3, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64)
    work = torch.zeros(C.solve_upgrad_work_size(3), dtype=torch.float64)
    p, q, r = M.data_ptr(), w.data_ptr(), work.data_ptr()
    keys = torch.zeros(3, 3, dtype=torch.float64).data_ptr()
    for K in (0, -1, 10**6):
        with pytest.raises(ValueError, match="K must be in"):
            C.solve_mean(p, K, q, r)
    with pytest.raises(ValueError, match="M is a null pointer"):
        C.solve_upgrad(0, 3, 0, 0.0, 1e-4, q, r)
    with pytest.raises(ValueError, match="w is a null pointer"):
        C.solve_upgrad(p, 3, 0, 0.0, 1e-4, 0, r)
    with pytest.raises(ValueError, match="work is a null pointer"):
        C.solve_upgrad(p, 3, 0, 0.0, 1e-4, q, 0)
    C.solve_mean(p, 3, q, 0)  # needs no scratch
    with pytest.raises(ValueError, match="reg_eps"):
        C.solve_dualproj(p, 3, 0, 0.0, 0.0, q, r)
    with pytest.raises(ValueError, match="normalize"):
        C.solve_mgda(p, 3, 4, 0, 250, 1e-5, q, r)
    with pytest.raises(ValueError, match="losses is a null pointer"):
        C.solve_mgda(p, 3, 2, 0, 250, 1e-5, q, r)
    with pytest.raises(ValueError, match="stop_crit"):
        C.solve_mgda(p, 3, 0, 0, 250, 0.0, q, r)
    with pytest.raises(ValueError, match="keys is a null pointer"):
        C.solve_pcgrad(p, 3, 0, q, r)
    with pytest.raises(ValueError, match="phi_hat is a null pointer"):
        C.solve_gradvac(p, 3, keys, 0, 0.5, 1e-8, q, r)
    with pytest.raises(ValueError, match="beta"):
        C.solve_gradvac(p, 3, keys, keys, 1.5, 1e-8, q, r)
    with pytest.raises(ValueError, match="alpha is a null pointer"):
        C.solve_nash_mtl(p, 3, 0, 100, 1.0, True, EPS64, q, r)
    with pytest.raises(ValueError, match="gram_eps"):
        C.solve_nash_mtl(p, 3, keys, 100, 1.0, True, -1.0, q, r)
    with pytest.raises(ValueError, match="rescale"):
        C.solve_cagrad(p, 3, 0.4, 3, False, q, r)
    with pytest.raises(ValueError, match="dtype_eps"):
        C.solve_imtlg(p, 3, 0.0, q, r)
    with pytest.raises(ValueError, match="rank_eps"):
        C.solve_aligned_mtl(p, 3, 0.0, q, r)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        C.solve_fairgrad(p, 3, 0.0, EPS64, q, r)
    with pytest.raises(ValueError, match="gram_eps"):
        C.solve_fairgrad(p, 3, 1.0, float("nan"), q, r)
    with pytest.raises(ValueError, match="lanes must be in"):
        C.solve_pcgrad_threaded(p, 3, keys, q, r, 2, 3)
    with pytest.raises(ValueError, match="threads must be in"):
        C.solve_pcgrad_threaded(p, 3, keys, q, r, 129, 1)


# ------------------------------------------------------------------------------------------------ team solves
# The CUDA kernel runs a solve on the threads of its block. UPGrad, PCGrad and GradVac are K independent
# per-task problems spread over its threads (csrc/include/flatmtl/solvers/rows.h); the others are team solvers
# (team.h) that split the entries of each step. solve_<name>_threaded runs that very code on CPU threads, so
# the split, the task-ordered sum and the reductions are checked here: the result must be the single
# worker's, bit for bit, for any team (test_team_races.py checks the barriers under ThreadSanitizer).


def _team_problems(K: int, seed: int) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(K, K, generator=gen, dtype=torch.float64)
    pref = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    phi_hat = torch.rand(K, K, generator=gen, dtype=torch.float64) * 2 - 1  # non-zero targets drive corrections
    losses = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
    alpha = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5  # Nash-MTL's warm start, updated in place
    return {
        "upgrad": (0, 0.0, 1e-4),
        "upgrad_pref": (pref, 0.0, 1e-4),
        "pcgrad": (keys,),
        "gradvac": (keys, phi_hat, 0.5, 1e-8),
        "mgda": (0, 0, 250, 1e-5),
        "mgda_loss+": (3, losses, 250, 1e-5),
        "nash_mtl": (alpha, 20, 1.0, True, EPS64),
        "fairgrad": (1.0, EPS64),
        "fairgrad_half": (0.5, EPS64),
        "imtlg": (EPS64,),
        "imtlg_float32": (torch.finfo(torch.float32).eps,),
        "aligned_mtl": (torch.finfo(torch.float32).eps,),
        "dualproj": (0, 0.0, 1e-4),
        "dualproj_pref": (pref, 0.0, 1e-4),
        "cagrad": (0.4, 1, False),
        "cagrad_sum": (0.9, 0, True),
        "imgrad": (0.8, False),
        "imgrad_paper": (0.8, True),
        "affinity_propagation": (0, 0.5, 15, 200, 2, 7),
    }


def _solver_of(problem: str) -> str:
    """The solver a _team_problems entry runs ("upgrad_pref" -> "upgrad")."""
    return problem if problem in ("nash_mtl", "affinity_propagation", "aligned_mtl") else problem.split("_")[0]


def _run(
    name: str,
    M: torch.Tensor,
    params: tuple,
    threads: int | None = None,
    lanes: int | None = None,
    nan_if_nonfinite: bool = False,
):
    """(w, status, the state tensors after the call) of one solve on fresh copies of the state."""
    K = M.shape[0]
    name = _solver_of(name)
    copies = [p.clone() if isinstance(p, torch.Tensor) else p for p in params]
    args = [p.data_ptr() if isinstance(p, torch.Tensor) else p for p in copies]
    w = torch.full((K,), float("nan"), dtype=torch.float64)
    if threads is None:
        size = getattr(C, f"solve_{name}_work_size")(K)
        call, extra = getattr(C, f"solve_{name}"), ()
    else:
        size = getattr(C, f"solve_{name}_threaded_work_size")(K, lanes)
        call, extra = getattr(C, f"solve_{name}_threaded"), (threads, lanes)
    work = torch.full((max(1, size),), float("nan"), dtype=torch.float64)
    status = call(M.data_ptr(), K, *args, w.data_ptr(), work.data_ptr(), *extra, nan_if_nonfinite=nan_if_nonfinite)
    return w, status, [p for p in copies if isinstance(p, torch.Tensor)]


@pytest.mark.parametrize("K", [1, 2, 3, 7, 40, 64])
@pytest.mark.parametrize("kind", ["full", "rank_deficient", "collinear"])
def test_team_solve_gives_the_single_worker_result_exactly(K, kind):
    G = make_G(K, kind, 1.0, seed_of(K, kind, "rows"))
    M = G @ G.T
    for name, params in _team_problems(K, seed_of(K, kind)).items():
        w, status, state = _run(name, M, params)
        assert not torch.isnan(w).any(), name
        row_parallel = name.startswith(("upgrad", "pcgrad", "gradvac"))
        # Row-parallel: teams as the kernel runs them (fewer lanes than threads), one lane per thread, more
        # lanes than tasks. Team solvers take every thread: even, odd and larger-than-K teams.
        teams = (
            [(1, 1), (4, 3), (8, 8), (5, min(5, K + 2))]
            if row_parallel
            else [(1, 1), (2, 2), (3, 3), (8, 8), (K + 2, K + 2)]
        )
        for threads, lanes in teams:
            w_team, status_team, state_team = _run(name, M, params, threads, lanes)
            assert torch.equal(w_team, w), (name, threads, lanes, (w_team - w).abs().max())
            assert status_team == status, (name, threads, lanes)
            for before, after in zip(state, state_team, strict=True):
                assert torch.equal(before, after), (name, threads, lanes)  # GradVac's targets, Nash-MTL's α


@pytest.mark.parametrize("K", [1, 3, 40, 70])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_if_nonfinite_solves_on_zero_and_gives_nan(K, bad):
    """The aggregators' non-finite policy inside the solve call, on one worker and on teams: an M with a NaN or
    Inf gives NaN weights, and the status and updated state (GradVac's targets, Nash-MTL's α) of a solve on
    M = 0. A finite M is solved as without the flag."""
    G = make_G(K, "full", 1.0, seed_of(K, "policy"))
    M = G @ G.T
    corrupted = M.clone()
    corrupted[K // 2, K - 1] = bad
    zeros = torch.zeros(K, K, dtype=torch.float64)
    for name, params in _team_problems(K, seed_of(K, "policy")).items():
        row_parallel = name.startswith(("upgrad", "pcgrad", "gradvac"))
        for threads, lanes in [(None, None), (3, 2 if row_parallel else 3)]:
            _, status, state = _run(name, zeros, params, threads, lanes)
            w, status_nan, state_nan = _run(name, corrupted, params, threads, lanes, nan_if_nonfinite=True)
            assert torch.isnan(w).all(), (name, threads)
            assert status_nan == status, (name, threads)
            for on_zero, on_bad in zip(state, state_nan, strict=True):
                assert torch.equal(on_zero, on_bad), (name, threads)
            w_finite, _, _ = _run(name, M, params, threads, lanes)
            w_flagged, _, _ = _run(name, M, params, threads, lanes, nan_if_nonfinite=True)
            assert torch.equal(w_flagged, w_finite), (name, threads)


def test_team_solver_takes_every_thread():
    M = torch.eye(3, dtype=torch.float64)
    w = torch.empty(3, dtype=torch.float64)
    work = torch.empty(C.solve_mgda_work_size(3), dtype=torch.float64)
    with pytest.raises(ValueError, match="lanes = threads"):
        C.solve_mgda_threaded(M.data_ptr(), 3, 0, 0, 250, 1e-5, w.data_ptr(), work.data_ptr(), 4, 2)


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("K", [64, 97, 150])
@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "GradVac"])
def test_fused_row_parallel_solves_on_cpu_threads_keep_one_threads_bits(name, K):
    """From TASKS_PER_SOLVE_THREAD tasks a thread on, the fused path spreads a row-parallel solve over torch's
    threads: the weights (and GradVac's updated targets, seen through the second call) stay bit-identical."""
    G = make_G(K, "full", 1.0, seed=K)
    M = G @ G.T
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            expected_threads = min(threads, K // native.TASKS_PER_SOLVE_THREAD)
            assert native._cpu_threads(C, name.lower(), K) == expected_threads
            options = {} if name == "UPGrad" else {"generator": torch.Generator().manual_seed(5)}
            agg = getattr(flatmtl_fast, name)(**options)
            results.append([agg.weights(M), agg.weights(M)])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 3, 40, 64, 100])
def test_cuda_matches_cpu(K):
    """The kernels run the same header code: equal to the CPU solve up to FMA contraction."""
    G = make_G(K, "full", 1.0, K)
    M = G @ G.T
    keys = torch.rand(K, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    ones = torch.ones(K, dtype=torch.float64)
    problems = {
        "mgda": (1, ones, 250, 1e-5),
        "pcgrad": (keys,),
        "gradvac": (keys, torch.zeros(K, K, dtype=torch.float64), 0.5, 1e-8),
        "imtlg": (EPS64,),
        "aligned_mtl": (torch.finfo(torch.float32).eps,),
        "upgrad": (0, 0.0, 1e-4),
        "dualproj": (0, 0.0, 1e-4),
        "nash_mtl": (ones, 100, 1.0, True, EPS64),
        "fairgrad": (1.0, EPS64),
        "cagrad": (0.4, 1, False),
        "imgrad": (0.8, False),
    }
    for name, params in problems.items():
        w_cpu, _, _ = _run(name, M, params)
        w, status, _ = _cuda_run(name, M, params)
        assert torch.allclose(w, w_cpu, rtol=1e-6, atol=1e-9 * float(w_cpu.abs().max())), name
        assert int(status[1]) in (0, 1)


def _cuda_run(name: str, M: torch.Tensor, params: tuple, nan_if_nonfinite: bool = False):
    """(w, status, the state tensors after the call) of one CUDA solve on fresh device copies of the state, on the
    CPU."""
    K = M.shape[0]
    name = _solver_of(name)
    copies = [p.cuda() if isinstance(p, torch.Tensor) else p for p in params]
    args = [p.data_ptr() if isinstance(p, torch.Tensor) else p for p in copies]
    Md = M.cuda()
    w = torch.empty(K, dtype=torch.float64, device="cuda")
    work = torch.empty(max(1, getattr(C, f"cuda_solve_{name}_work_size")(K)), dtype=torch.float64, device="cuda")
    status = torch.zeros(2, dtype=torch.int32, device="cuda")
    getattr(C, f"cuda_solve_{name}")(
        Md.data_ptr(),
        K,
        *args,
        w.data_ptr(),
        work.data_ptr(),
        status.data_ptr(),
        Md.device.index,
        torch.cuda.current_stream().cuda_stream,
        nan_if_nonfinite=nan_if_nonfinite,
    )
    return w.cpu(), status.cpu(), [p.cpu() for p in copies if isinstance(p, torch.Tensor)]


@pytest.mark.gpu
@pytest.mark.parametrize("K", [3, 64, 100])
def test_cuda_nan_if_nonfinite_solves_on_zero_and_gives_nan(K):
    """The kernel's non-finite policy, on a staged M (K ≤ 64) and on one read from global memory (K = 100: the
    zeros come from the scratch): NaN weights, and the status and state of the same kernel run on M = 0."""
    M = (lambda G: G @ G.T)(make_G(K, "full", 1.0, seed_of(K, "cuda-policy")))
    corrupted = M.clone()
    corrupted[K - 1, K // 2] = float("nan")
    for name, params in _team_problems(K, seed_of(K, "cuda-policy")).items():
        w, status, state = _cuda_run(name, corrupted, params, nan_if_nonfinite=True)
        _, status_on_zero, state_on_zero = _cuda_run(name, torch.zeros_like(M), params)
        assert torch.isnan(w).all(), name
        assert torch.equal(status, status_on_zero), name
        for on_zero, on_bad in zip(state_on_zero, state, strict=True):
            assert torch.equal(on_zero, on_bad), name
        w_finite, _, _ = _cuda_run(name, M, params)
        w_flagged, _, _ = _cuda_run(name, M, params, nan_if_nonfinite=True)
        assert torch.equal(w_flagged, w_finite), name
