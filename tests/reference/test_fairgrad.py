"""Tests of the reference FairGrad (algorithms.md §2)."""

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import POSITIVE_SCALES, assert_same_direction, random_matrix

from flatmtl_fast.reference import FairGrad, NashMTL


def test_hand_checked() -> None:
    # Orthogonal rows: M_ii w_i = w_i^{-1/α} → w_i = M_ii^{-α/(α+1)}; M = diag(1, 4).
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        expected = torch.tensor([1.0, 4.0 ** (-alpha / (alpha + 1))], dtype=torch.float64)
        torch.testing.assert_close(FairGrad(alpha).weights(G @ G.T), expected)
    # α = 1 is Nash-MTL's condition (without the clip).
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(FairGrad(1.0)(J), NashMTL(max_norm=0.0)(J))


def test_k1() -> None:
    g = torch.randn(1, 5, dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        torch.testing.assert_close(FairGrad(alpha)(g), g[0] * float(g @ g.T) ** (-alpha / (alpha + 1)))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_properties(alpha: float, K: int) -> None:
    for scale in POSITIVE_SCALES:
        G = scale * random_matrix(K, 12, K, seed=K)
        M = G @ G.T
        agg = FairGrad(alpha)
        w = agg.weights(M)
        d = agg(G)
        torch.testing.assert_close(w ** (1 / alpha) * (M @ w), torch.ones(K, dtype=torch.float64), rtol=0, atol=1e-8)
        torch.testing.assert_close(w @ G, d)
        assert (G @ d > 0).all()  # non-conflicting: g_i·d = w_i^{-1/α} > 0
        # Scale: d(sG) = s^{(1−α)/(1+α)} d(G).
        base = FairGrad(alpha)(G / scale)
        torch.testing.assert_close(d, scale ** ((1 - alpha) / (1 + alpha)) * base, rtol=1e-8, atol=0)


def test_degenerate() -> None:
    g, h = random_matrix(1, 6, 1, seed=3), random_matrix(1, 6, 1, seed=4)
    for X in (
        g.repeat(3, 1),
        torch.cat([g, 3.0 * g, h]),
        torch.cat([g, 0 * g, h]),
        torch.cat([g, -g, h]),
        torch.zeros(3, 6, dtype=torch.float64),
    ):
        assert torch.isfinite(FairGrad()(X)).all()
    torch.testing.assert_close(FairGrad()(torch.cat([g, 0 * g, h])), FairGrad()(torch.cat([g, h])))
    # No positive solution (opposite rows): the official start 𝟏/K.
    torch.testing.assert_close(FairGrad()(torch.cat([g, -g, h])), h[0] / 3)
    assert torch.equal(FairGrad()(torch.zeros(2, 6)), torch.zeros(6))


@pytest.mark.parametrize("K", [2, 3, 5])
def test_matches_torchjd(K: int) -> None:
    for seed in range(2):
        G = random_matrix(K, 12, K, seed=seed)
        for alpha in (1.0, 2.0):
            theirs = tjd.FairGrad(alpha=alpha)(G)
            ours = FairGrad(alpha)(G)
            assert_same_direction(ours, theirs)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FairGrad(alpha=0.0)
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        FairGrad()(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        FairGrad().weights(torch.ones(2, 3))
