"""min qᵀw + β‖g_w‖ over the simplex Δ (‖g_w‖ = √(wᵀMw), M PSD): CAGrad's and official IMGrad's problem,
as the second-order cone programme (as the reference states it for CLARABEL)

    min qᵀw + βt   subject to   𝟏ᵀw = 1,  w ≥ 0,  (t, Rᵀw) ∈ Q = {(t, y) : t ≥ ‖y‖},   RRᵀ = M,

solved by a primal–dual interior-point method (Mehrotra predictor–corrector, Nesterov–Todd scaling) with a
fixed iteration budget and convergence masks (no host synchronisation), then an exact polish on the support.

Why a cone: the optimum often lies at or near the kink g_w = 0 of the norm, where its Hessian
β(M − uuᵀ)/‖g_w‖ (u = Mw/‖g_w‖) blows up and degenerates along g_w; Newton steps on qᵀw + β‖g_w‖ itself then
jump across the kink and oscillate (measured: objective values up to 0.6 of the problem's scale above the
optimum, where ‖g_w‖ was a few % of max‖g_i‖). In Q the kink is the cone's apex, a boundary point that
interior-point steps approach without crossing.

R is a Cholesky factor of M + δ diag(M) (δ ≥ 1e-13, see ``_factor``): the reference's eigendecomposition
would synchronise with a CUDA device. The ridge moves ‖g_w‖ by at most √δ · max‖g_i‖ (3e-7 of it), below
the reference's "g_w counts as zero" threshold, and the polish works on M itself.
Problems are normalised by the caller (unit-trace M, |q|, β ≤ 1), so the tolerances are absolute.

Notation (cvxopt's): x = (w, t); the slacks are w ≥ 0 and s = Bᵀx = (t, Rᵀw) ∈ Q with B = [[0, R], [1, 0]];
the duals z_l ≥ 0, z ∈ Q and ν (of 𝟏ᵀw = 1); J = diag(1, −I), e = (1, 0) the identity of Q.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._interior import GAP_TOL, POLISH_MAX_MOVE, POLISH_TOL, STATIONARITY_TOL, _factor_kkt, _max_step

#: Mehrotra steps: the support is found within ~12 here (measured up to K = 128, kinks included); margin.
ITERATIONS = 20
#: Relative ridges 1e-13, 1e-10, …, 1e-1 tried for the Cholesky factor, smallest first: (K + 1) ε covers the
#: rounding of a float64 Gram; a Gram accumulated in float32 can be indefinite by ~1e-7 of its scale.
RIDGE_RANGE = (-13.0, -1.0, 5)  # torch.logspace arguments: made on the device, no host-to-device copy
_FRACTION_TO_BOUNDARY = 0.99


def _factor(M: Tensor) -> Tensor:
    """R with RRᵀ = M + δ diag(M) for the smallest δ of ``RIDGE_RANGE`` whose Cholesky factorisation succeeds,
    computed on the unit-diagonal correlation matrix (a ridge relative to each task's own ‖g_i‖², as the
    native solver's) and chosen by mask."""
    d = M.diagonal()
    d = torch.where(d > 0, d, d.mean().clamp_min(torch.finfo(M.dtype).tiny))  # a zero row: the mean scale
    root = d.sqrt()
    C = M / torch.outer(root, root)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    ridges = torch.logspace(*RIDGE_RANGE, dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(C + ridges[:, None, None] * eye)
    first = torch.argmax((info == 0).to(torch.int32))  # all failing (a non-finite M): the caller masks it
    return root[:, None] * L.index_select(0, first.reshape(1))[0]  # not L[first]: that reads first to the host


def _det(u: Tensor) -> Tensor:
    """u₀² − ‖u₁‖² of each row, factored to keep its accuracy near the cone's boundary."""
    norm = u[..., 1:].norm(dim=-1)
    return (u[..., 0] - norm) * (u[..., 0] + norm)


def _product(u: Tensor, v: Tensor, e: Tensor) -> Tensor:
    """The Jordan product u ∘ v = (uᵀv, u₀v₁ + v₀u₁)."""
    return u[0] * v + v[0] * u + ((u @ v) - 2.0 * u[0] * v[0]) * e


def _cone_steps(u: Tensor, du: Tensor) -> Tensor:
    """Largest t ≤ 1 with u + t du ∈ Q (u interior), for rows of u and du: the first positive root of
    det(u + t du), a quadratic, in its stable form."""
    a, c = _det(du), _det(u)
    b = 2.0 * (u[:, 0] * du[:, 0] - (u[:, 1:] * du[:, 1:]).sum(dim=1))
    disc = b * b - 4.0 * a * c
    never = (disc < 0) | ((a >= 0) & (b >= 0))
    return torch.where(never, 1.0, (2.0 * c / (-b + disc.clamp_min(0.0).sqrt())).clamp(0.0, 1.0)).min()


class _Problem(NamedTuple):
    B: Tensor
    cone_block: Tensor
    row: Tensor
    c: Tensor  # the cost (q, β) of x
    j: Tensor  # the diagonal of J
    e: Tensor


class _Iterate:
    """One iterate's Newton system, factored once for its predictor and corrector steps.

    Nesterov–Todd scaling W = η W̄ of Q at (s, z), W z = W⁻¹ s = λ, with W̄ = −J + ggᵀ/(1 + w̄₀), g = w̄ + e,
    for the w̄ of w̄ᵀJw̄ = 1 (so W̄⁻¹ = J W̄ J and W̄⁻² = 2(Jw̄)(Jw̄)ᵀ − J). With the slacks tied to x, the
    Newton equations reduce to [[B W⁻² Bᵀ + diag(z_l / w, 0), a], [aᵀ, 0]] (Δx, Δν) = ((u_l, 0) + B u − r, ·)
    for a target λ ∘ (W Δz + W⁻¹ Δs) = d, u = W⁻¹(λ \\ d), a = (𝟏, 0), r the dual residual.
    """

    def __init__(self, problem: _Problem, x: Tensor, z: Tensor) -> None:
        """At x = (w, t) and z = (z_l, z_q, ν)."""
        B, K = problem.B, problem.row.shape[1] - 1
        self.B, self.K, self.j, self.e = B, K, problem.j, problem.e
        self.w, self.z_l, self.z, nu = x[:K], z[:K], z[K:-1], z[-1]
        self.s = B.T @ x
        self.mu = (self.w @ self.z_l + self.s @ self.z) / (K + 1)
        self.residual = problem.c + nu * problem.row[0] - B @ self.z - torch.nn.functional.pad(self.z_l, (0, 1))
        pair = torch.stack([self.s, self.z])
        det = _det(pair)
        s_bar, z_bar = pair / det.sqrt().unsqueeze(1)
        w_bar = (s_bar + self.j * z_bar) / (2.0 + 2.0 * (s_bar @ z_bar)).sqrt()
        self.eta = (det[0] / det[1]).sqrt().sqrt()
        self.g, self.v = w_bar + self.e, self.j * w_bar
        self.jg, self.inv = self.j * self.g, 1.0 / (1.0 + w_bar[0])
        self.lam_l, self.lam = (self.w * self.z_l).sqrt(), self.scale(self.z)
        self.lam_det = _det(self.lam)
        h = B @ self.v
        H = (2.0 * torch.outer(h, h) + problem.cone_block) / (self.eta * self.eta)
        H.diagonal()[:K] += self.z_l / self.w
        self.solve = _factor_kkt(H.unsqueeze(0), problem.row, problem.row)

    def scale(self, u: Tensor) -> Tensor:
        """W u."""
        return self.eta * (self.g * ((self.g @ u) * self.inv) - self.j * u)

    def unscale(self, u: Tensor) -> Tensor:
        """W⁻¹ u."""
        return (self.jg * ((self.jg @ u) * self.inv) - self.j * u) / self.eta

    def direction(self, d_l: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Δx, Δν, Δs, Δz) for the target (d_l, d); Δz = (Δz_l, Δz_q)."""
        K, lam = self.K, self.lam
        u_l = d_l / self.w
        head = (self.j * lam) @ d / self.lam_det  # λ \ d: head, then tail (d₁ − head λ₁)/λ₀
        u = self.unscale((d - head * lam) / lam[0] + (2.0 * head - d[0] / lam[0]) * self.e)
        rhs = torch.nn.functional.pad(u_l, (0, 1)) + self.B @ u - self.residual
        (dx,), (dnu,) = self.solve(rhs.unsqueeze(0), (1.0 - self.w.sum()).reshape(1))
        ds = self.B.T @ dx
        dz = u - (2.0 * self.v * (self.v @ ds) - self.j * ds) / (self.eta * self.eta)
        return dx, dnu, ds, torch.cat([u_l - self.z_l * dx[:K] / self.w, dz])

    def longest(self, dx: Tensor, ds: Tensor, dz: Tensor) -> Tensor:
        """Largest step ≤ 1 along the direction that keeps the slacks and duals in their cones."""
        K = self.K
        linear = _max_step(torch.stack([self.w, self.z_l]), torch.stack([dx[:K], dz[:K]])).min()
        return torch.minimum(linear, _cone_steps(torch.stack([self.s, self.z]), torch.stack([ds, dz[K:]])))


def argmin_linear_plus_norm_cone(q: Tensor, beta: Tensor, M: Tensor) -> Tensor:
    """w ∈ Δ minimising qᵀw + β √(wᵀMw) for a normalised problem (see the module docstring)."""
    K = q.shape[0]
    R = _factor(M)
    B = torch.zeros(K + 1, K + 1, dtype=q.dtype, device=q.device)
    B[:K, 1:], B[K, 0] = R, 1.0
    e = torch.zeros(K + 1, dtype=q.dtype, device=q.device)
    e[0] = 1.0
    problem = _Problem(
        B,
        cone_block=torch.block_diag(R @ R.T, -B.new_ones(1, 1)),  # −B J Bᵀ = diag(RRᵀ, −1)
        row=torch.nn.functional.pad(torch.ones_like(q), (0, 1)).unsqueeze(0),  # a = (𝟏, 0): 𝟏ᵀw = 1
        c=torch.cat([q, beta.reshape(1)]),
        j=2.0 * e - 1.0,
        e=e,
    )
    x = torch.cat([torch.ones_like(q) / K, ((R.T @ torch.ones_like(q)).norm() / K + 1.0).reshape(1)])  # t > ‖Rᵀw‖
    z = torch.cat([torch.ones_like(q), torch.nn.functional.pad(q.new_ones(1), (0, K + 1))])  # z_l, z_q = e, ν
    done = torch.zeros((), dtype=torch.bool, device=q.device)

    for _ in range(ITERATIONS):
        it = _Iterate(problem, x, z)
        done = done | ((it.mu <= GAP_TOL) & (it.residual.abs().max() <= STATIONARITY_TOL))
        # Predictor (affine scaling), then the centring + second-order corrector.
        dx, _, ds, dz = it.direction(-it.lam_l * it.lam_l, -_product(it.lam, it.lam, e))
        t = it.longest(dx, ds, dz)
        slack = torch.cat([it.w, it.s]) + t * torch.cat([dx[:K], ds])
        sigma_mu = ((slack @ (z[:-1] + t * dz)) / (K + 1) / it.mu).clamp(0.0, 1.0).pow(3) * it.mu
        d_l = sigma_mu - it.lam_l * it.lam_l - dx[:K] * dz[:K]
        d = sigma_mu * e - _product(it.lam, it.lam, e) - _product(it.unscale(ds), it.scale(dz[K:]), e)
        dx, dnu, ds, dz = it.direction(d_l, d)
        step = _FRACTION_TO_BOUNDARY * it.longest(dx, ds, dz)
        x_new, z_new = x + step * dx, z + step * torch.cat([dz, dnu.reshape(1)])
        keep = done | ~(torch.isfinite(x_new).all() & torch.isfinite(z_new).all())
        x, z = torch.where(keep, x, x_new), torch.where(keep, z, z_new)

    return _polish(q, beta, M, x[:K], z[:K])


def _polish(q: Tensor, beta: Tensor, M: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """The exact optimum on the support F = {i : w_i > z_i} of the interior-point solution, for M itself.

    With r = ‖g_w‖/β the optimality conditions on F are those of min ½wᵀMw + r qᵀw on {w_F : 𝟏ᵀw_F = 1},
    so w = w₀ + r w₁ with w₀ the min-norm point of F (M_FF w₀ + ν₀𝟏 = 0, 𝟏ᵀw₀ = 1, so ν₀ = −w₀ᵀMw₀) and
    M_FF w₁ + q_F + ν₁𝟏 = 0, 𝟏ᵀw₁ = 0. Then ‖g_w‖² = w₀ᵀMw₀ + r² w₁ᵀMw₁ (the cross term −ν₀𝟏ᵀw₁ vanishes),
    and ‖g_w‖ = βr gives r = √(w₀ᵀMw₀ / (β² − w₁ᵀMw₁)): w = w₀ with g_w = 0 exactly when F's hull holds 0,
    the kink. Kept where w_F ≥ 0, the multipliers of the other indices, q_i + (Mw₁)_i + ν₁ + ((Mw₀)_i + ν₀)/r,
    are ≥ 0 (at the kink g_{w₀} = 0 makes the last term vanish) and the move is small.
    """
    K = q.shape[0]
    free = w > z
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    solve = _factor_kkt(torch.where(free.unsqueeze(1), M, eye).unsqueeze(0), free.to(q.dtype).unsqueeze(0))
    (w0,), (nu0,) = solve(torch.zeros_like(q).unsqueeze(0), q.new_ones(1))
    (w1,), (nu1,) = solve(torch.where(free, -q, 0.0).unsqueeze(0), q.new_zeros(1))
    Mw0, Mw1 = M @ w0, M @ w1
    slope = beta * beta - w1 @ Mw1
    r = ((w0 @ Mw0).clamp_min(0.0) / torch.where(slope > 0, slope, torch.ones_like(slope))).sqrt()
    polished = w0 + r * w1
    kink = r == 0
    multipliers = q + Mw1 + nu1 + torch.where(kink, 0.0, (Mw0 + nu0) / torch.where(kink, torch.ones_like(r), r))
    ok = (
        (slope > 0)
        & torch.isfinite(polished).all()
        & torch.isfinite(multipliers).all()
        & torch.where(free, polished >= -POLISH_TOL, multipliers >= -POLISH_TOL).all()
        & ((polished - w).abs().max() <= POLISH_MAX_MOVE)
    )
    w = torch.where(ok, polished, w).clamp_min(0.0)
    return w / w.sum()
