"""Tests of the reference CAGrad (algorithms.md §2)."""

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import SCALES, assert_finite_and_homogeneous, assert_same_direction, random_matrix

from flatmtl_fast.reference import CAGrad


def test_hand_checked() -> None:
    # Orthonormal rows: by symmetry w* = (½, ½), g_w = g₀, λ = c, d = (1 + c) g₀ / (1 + c²).
    G = torch.eye(2, dtype=torch.float64)
    g0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=0.4)(G), 1.4 / 1.16 * g0)
    torch.testing.assert_close(CAGrad(c=0.4, rescale=2)(G), g0)
    torch.testing.assert_close(CAGrad(c=0.4, rescale=0, sum_scale=True)(G), 2 * 1.4 * g0)
    # c = 0 is the mean gradient; golden J of §3 with c = 0.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(CAGrad(c=0.0)(J), J.mean(dim=0))


def test_k1() -> None:
    g = torch.randn(1, 6)
    torch.testing.assert_close(CAGrad()(g), g[0] * 1.4 / 1.16)
    torch.testing.assert_close(CAGrad(rescale=0)(g), g[0] * 1.4)
    assert CAGrad()(g).dtype == torch.float32


@pytest.mark.parametrize("K,rank", [(2, 2), (3, 3), (5, 5), (5, 2)])
def test_properties(K: int, rank: int) -> None:
    G = random_matrix(K, 9, rank, seed=K + 7 * rank)
    for c in (0.4, 1.0, 2.0):
        agg = CAGrad(c=c)
        d = agg(G)
        torch.testing.assert_close(agg.weights(G @ G.T) @ G, d)
        if c >= 1 and rank == K:
            # Non-conflicting when c ≥ 1 (then d = 0 lies in the ball ‖d − g₀‖ ≤ c‖g₀‖, so the optimal
            # min_i g_i·d is ≥ 0) and 0 ∉ hull (full rank); algorithms.md §3 says "c < 1", which is false:
            # c = 0.4 gives min_i g_i·d = -1.4 on the K = 3 case here.
            assert (G @ d >= -1e-6 * (G @ G.T).diagonal().max()).all()


@pytest.mark.parametrize("scale", SCALES)
def test_scales_and_degenerate(scale: float) -> None:
    G = random_matrix(4, 6, 4, seed=3)
    assert_finite_and_homogeneous(CAGrad, G, scale, rtol=1e-6)


def test_opposite_rows() -> None:
    """g₀ = (0, ⅓) and 0 in the hull: the objective is minimal at g_w = 0, so d = g₀ / (1 + c²)."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad()(G), G.mean(dim=0) / 1.16, atol=1e-7, rtol=0)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_matches_torchjd(K: int) -> None:
    """torchjd returns the weights 1/K + λw* (no rescale, no K): ours with rescale=0, same c.

    Values agree to ~1e-4 only: torchjd calls CLARABEL at its default tolerances on a differently
    conditioned problem (an SVD factor of the trace-normalised Gram), so w* differs at that level.
    """
    for seed in range(3):
        G = random_matrix(K, 12, K, seed=seed)
        theirs = tjd.CAGrad(c=0.5)(G)
        assert_same_direction(CAGrad(c=0.5)(G), theirs)
        torch.testing.assert_close(CAGrad(c=0.5, rescale=0)(G), theirs, rtol=1e-3, atol=1e-4)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="rescale must be"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        CAGrad()(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        CAGrad().weights(torch.ones(2, 3))
