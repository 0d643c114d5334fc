"""Reference UPGrad: hand-checked values, torchjd's properties, agreement with torchjd 0.18."""

from __future__ import annotations

import pytest
import torch
from support.matrices import (
    RANKED,
    SPECIAL,
    DualConeProperties,
    generator,
)
from torch import Tensor

from flatmtl_fast.reference import UPGrad


def test_golden_value() -> None:
    # algorithms.md §3 (torchjd's value, computed with its ridge reg_eps = 1e-4).
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(UPGrad()(J), torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0)


def test_hand_computed_projection_without_ridge() -> None:
    # g1·g2 = −22, ‖g1‖² = 18, ‖g2‖² = 38: each row conflicts with the other only, so its projection
    # onto the dual cone removes the conflicting component: π(g1) = g1 + 22/38 g2, π(g2) = g2 + 22/18 g1.
    g1, g2 = torch.tensor([-4.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([6.0, 1.0, 1.0], dtype=torch.float64)
    expected = ((g1 + 22 / 38 * g2) + (g2 + 22 / 18 * g1)) / 2
    torch.testing.assert_close(UPGrad(reg_eps=1e-12)(torch.stack([g1, g2])), expected, atol=1e-9, rtol=0)


def test_non_conflicting_rows_give_the_mean() -> None:
    G = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad(reg_eps=1e-12)(G), G.mean(dim=0), atol=1e-9, rtol=0)


@pytest.mark.parametrize("reg_eps", [1e-4, 1e-10])
@pytest.mark.parametrize("G", RANKED + SPECIAL[1:])
def test_linear_under_scaling(G: Tensor, reg_eps: float) -> None:
    # A(diag(a c1 + b c2) G) = a A(diag(c1) G) + b A(diag(c2) G) holds for the exact projection. The ridge
    # is relative to tr(M), which the row scaling changes, and perturbs the projection by up to
    # O(√reg_eps) relative when M is singular (K > rank): hence the tolerance 10 √reg_eps ‖G‖
    # (torchjd's own test uses atol = 1e-2 on matrices of norm ~1 with reg_eps = 1e-4).
    agg, gen = UPGrad(reg_eps=reg_eps), generator(1)
    for _ in range(3):
        c1, c2 = torch.rand(2, G.shape[0], generator=gen, dtype=torch.float64)
        a, b = torch.rand(2, generator=gen, dtype=torch.float64)
        expected = a * agg(torch.diag(c1) @ G) + b * agg(torch.diag(c2) @ G)
        actual = agg(torch.diag(a * c1 + b * c2) @ G)
        torch.testing.assert_close(actual, expected, atol=10 * reg_eps**0.5 * float(G.norm()), rtol=0)


class TestProperties(DualConeProperties):
    method = UPGrad
    torchjd_variants = ({}, {"norm_eps": 1e-4})  # tr(M) > 1e-4 there: both conventions coincide


def test_torchjd_small_scale_convention() -> None:
    # With norm_eps = 1e-4 (torchjd's), a G with ‖G‖²_F < 1e-4 is treated as zero: d = the mean of rows.
    G = 1e-3 * torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad(norm_eps=1e-4)(G), G.mean(dim=0))
    assert float((G @ UPGrad()(G)).min()) >= 0  # the default keeps projecting


def test_pref_vector_and_float32() -> None:
    G = RANKED[3].to(torch.float32)
    d = UPGrad(pref_vector=torch.full((9,), 2.0))(G)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, 2 * 9 * UPGrad()(G), rtol=1e-5, atol=1e-5)  # p = 2·𝟏 is 18× p = 𝟏/9


def test_single_task_returns_the_gradient() -> None:
    g = torch.tensor([[3.0, -1.0, 2.0]])
    torch.testing.assert_close(UPGrad()(g), g[0])
    torch.testing.assert_close(UPGrad().weights(g @ g.T), torch.tensor([1.0]))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        UPGrad()(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        UPGrad()(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        UPGrad().weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite"):
        UPGrad()(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(2,\)"):
        UPGrad(pref_vector=torch.ones(3))(torch.ones(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        UPGrad(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError, match="reg_eps must be > 0"):
        UPGrad(reg_eps=0.0)
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        UPGrad()(torch.ones(2, 3), losses=torch.ones(3))


@pytest.mark.parametrize("G", RANKED + SPECIAL)
def test_projections_satisfy_their_optimality_conditions(G: Tensor) -> None:
    """Each π(g_i) solves min_{v ≥ e_i} vᵀPv (P = M/tr M + reg_eps I): checked through the KKT conditions, not
    against the same code — feasibility v ≥ e_i, the multiplier λ = Pv ≥ 0, and complementarity λ_k (v_k − e_k) = 0,
    each to rounding (quadprog's dual active set is exact up to float64 on these small, well-conditioned P)."""
    from flatmtl_fast.reference._dual_cone import project_weights

    M = G.double() @ G.double().T
    K = M.shape[0]
    V = project_weights(M, torch.eye(K, dtype=torch.float64), norm_eps=0.0, reg_eps=1e-4)
    trace = float(M.diagonal().sum())
    P = (M / trace if trace > 0 else torch.zeros_like(M)) + 1e-4 * torch.eye(K, dtype=torch.float64)
    tol = 1e-9 * (1.0 + float(V.abs().max()))
    for i, v in enumerate(V):
        slack = v - torch.eye(K, dtype=torch.float64)[i]
        multiplier = P @ v
        assert float(slack.min()) >= -tol, (i, slack)
        assert float(multiplier.min()) >= -tol, (i, multiplier)
        assert float((multiplier * slack).abs().max()) <= tol * (1.0 + float(multiplier.abs().max())), i
