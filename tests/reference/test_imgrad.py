"""Tests of the reference IMGrad (algorithms.md §1.3, both forms)."""

import math

import pytest
import torch
from support.matrices import SCALES, assert_finite_and_homogeneous, degenerate_inputs, random_matrix

from flatmtl_fast.reference import CAGrad, IMGrad


def test_k1() -> None:
    g = torch.randn(1, 5, dtype=torch.float64)
    torch.testing.assert_close(IMGrad()(g), g[0] * 1.8 / 1.64)  # K (1 + α) / (1 + α²), K = 1
    torch.testing.assert_close(IMGrad(variant="paper")(g), g[0] * 1.8)  # 1 + α
    assert IMGrad()(g.float()).dtype == torch.float32


def test_orthonormal_hand_checked() -> None:
    # g₀ = g_m = (½, ½): cos θ = 1, both objectives are symmetric and minimal at w = (½, ½), g_w = g₀.
    G = torch.eye(2, dtype=torch.float64)
    g0 = torch.full((2,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(IMGrad()(G), 2 * 1.8 / 1.64 * g0)
    torch.testing.assert_close(IMGrad(variant="paper")(G), 1.8 * g0)


def test_golden_j_paper_form() -> None:
    """J of §3: g₀ = (1, 1, 1), g_m = (0, 1, 1) (MGDA weights 0.6, 0.4), cos θ = 2/√6.

    With w = (t, 1 − t): g_w = (6 − 10t, 1, 1), g_w·g₀ = 8 − 10t, so the paper objective
    (1 − cos)(8 − 10t) + cos √φ ((6 − 10t)² + 2) is minimal at 6 − 10t = −(1 − cos)/(2 cos √φ).
    """
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    cos, sqrt_phi = 2 / math.sqrt(6), 0.8 * math.sqrt(3)
    gw = torch.tensor([-(1 - cos) / (2 * cos * sqrt_phi), 1.0, 1.0], dtype=torch.float64)
    expected = torch.ones(3, dtype=torch.float64) + sqrt_phi / gw.norm() * gw
    torch.testing.assert_close(IMGrad(variant="paper")(J), expected, rtol=1e-6, atol=1e-7)


def test_official_form_is_cagrad_with_mixed_objective() -> None:
    # When g₀ = g_m (cos θ = 1) the official objective is 0.5 wᵀM𝟏/K + c√(wᵀMw), i.e. CAGrad's with radius 2c.
    G = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)  # symmetric: g_m = g₀
    d = IMGrad(alpha=0.8)(G)
    cagrad = CAGrad(c=1.6, rescale=0)(G)  # g₀ + 2c‖g₀‖/‖g_w‖ g_w, with the same w* = (½, ½) here
    g0 = G.mean(dim=0)
    torch.testing.assert_close(d, 2 * (g0 + 0.8 * g0) / 1.64)
    torch.testing.assert_close(cagrad, g0 + 1.6 * g0)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("K,rank", [(2, 2), (3, 3), (5, 5), (5, 2)])
def test_weights_consistency(variant: str, K: int, rank: int) -> None:
    G = random_matrix(K, 9, rank, seed=3 * K + rank)
    agg = IMGrad(variant=variant)
    torch.testing.assert_close(agg.weights(G @ G.T) @ G, agg(G), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scale", SCALES)
def test_scales_and_degenerate(scale: float) -> None:
    G = random_matrix(3, 6, 3, seed=5)
    for X in degenerate_inputs(G):
        assert torch.isfinite(IMGrad(variant="paper")(scale * X)).all()
    # The official form is positively homogeneous (the paper form is not: √φ carries units). rtol 1e-4:
    # on the collinear input (g, 3g, h) we see 1.2e-5 at scales 1e-10 and 1e10 (CAGrad: 1e-10): the
    # interior-point answer moves with rounding there; not yet pinned down to one cause (MGDA's
    # Frank–Wolfe cos θ feeding the objective, or a flat optimum of the solve).
    assert_finite_and_homogeneous(IMGrad, G, scale, rtol=1e-4)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="variant must be"):
        IMGrad(variant="both")
    with pytest.raises(ValueError, match="alpha must be"):
        IMGrad(alpha=-0.1)
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        IMGrad()(torch.ones(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        IMGrad()(torch.ones(4))
