"""Tests of the reference Mean and Sum (algorithms.md §2: w = 𝟏/K, w = 𝟏)."""

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import SCALES, generator

from flatmtl_fast.reference import Mean, Sum


@pytest.fixture
def G() -> torch.Tensor:
    return torch.randn(4, 7, dtype=torch.float64, generator=generator(0))


def test_hand_checked() -> None:
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    assert torch.equal(Mean()(J), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(Sum()(J), torch.tensor([2.0, 2.0, 2.0]))
    M = J @ J.T
    assert torch.equal(Mean().weights(M), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(Sum().weights(M), torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("agg", [Mean(), Sum()])
def test_k1_weights_dtype_and_permutation(agg, G: torch.Tensor) -> None:
    g = G[:1].float()
    assert torch.equal(agg(g), g[0]) and agg(g).dtype == torch.float32
    d = agg(G)
    torch.testing.assert_close(agg.weights(G @ G.T) @ G, d)
    torch.testing.assert_close(agg(G[torch.randperm(4)]), d)


@pytest.mark.parametrize("agg", [Mean(), Sum()])
def test_linear(agg, G: torch.Tensor) -> None:
    c1, c2 = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    lhs = agg(torch.diag(2.0 * c1 - 3.0 * c2) @ G)
    torch.testing.assert_close(lhs, 2.0 * agg(torch.diag(c1) @ G) - 3.0 * agg(torch.diag(c2) @ G))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("agg", [Mean(), Sum()])
def test_scales_and_degenerate(agg, scale: float, G: torch.Tensor) -> None:
    for X in (G, G[:1].repeat(3, 1), torch.zeros(3, 7, dtype=torch.float64)):
        d = agg(scale * X)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, scale * agg(X), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_matches_torchjd(K: int) -> None:
    G = torch.randn(K, 11, dtype=torch.float64)
    torch.testing.assert_close(Mean()(G), tjd.Mean()(G))
    torch.testing.assert_close(Sum()(G), tjd.Sum()(G))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        Mean()(torch.ones(3))
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        Sum()(torch.ones(2, 3), losses=torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        Mean().weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        Sum()(torch.ones(2, 3, dtype=torch.int64))
