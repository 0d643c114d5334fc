"""Reference DualProj: hand-checked values, torchjd's properties, agreement with torchjd 0.18."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flatmtl_fast.reference import DualProj

_gen = torch.Generator().manual_seed(0)
# Random matrices of prescribed rank r: a (K × r) times an (r × N) Gaussian factor.
RANKED = [
    torch.randn(K, r, generator=_gen, dtype=torch.float64) @ torch.randn(r, N, generator=_gen, dtype=torch.float64)
    for K, N, r in [(4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9), (5, 3, 3)]
]
_g = torch.randn(1, 6, generator=_gen, dtype=torch.float64)
SPECIAL = [
    torch.zeros(4, 3, dtype=torch.float64),
    torch.cat([_g, _g, 2 * _g]),  # duplicated and collinear rows
    torch.cat([_g, -_g, torch.randn(1, 6, generator=_gen, dtype=torch.float64)]),  # opposite rows
]
MATRICES = RANKED + SPECIAL
SCALED = [scale * G for scale in [0.0, 1e-10, 1.0, 1e3, 1e5, 1e10, 1e15] for G in MATRICES]


def test_hand_computed_projection() -> None:
    # g0 = (1, 1, 1) conflicts with g1 only (g0·g1 = −2, g0·g2 = 8); removing its g1 component,
    # y = g0 + 2/18 g1 = (5/9, 10/9, 10/9), satisfies g2·y = 50/9 ≥ 0, so y is the projection.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([5 / 9, 10 / 9, 10 / 9], dtype=torch.float64)
    torch.testing.assert_close(DualProj(reg_eps=1e-12)(J), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(DualProj()(J), expected, atol=1e-3, rtol=0)  # the default ridge 1e-4


def test_non_conflicting_mean_is_kept() -> None:
    G = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(DualProj(reg_eps=1e-12)(G), G.mean(dim=0), atol=1e-9, rtol=0)


@pytest.mark.parametrize("G", SCALED)
def test_structure_and_non_conflicting(G: Tensor) -> None:
    agg = DualProj()
    d = agg(G)
    assert d.shape == (G.shape[1],) and bool(torch.isfinite(d).all())
    # The ridge's KKT conditions give M w ≥ −reg_eps · tr(M) · w.
    w, trace = agg.weights(G @ G.T), float(torch.trace(G @ G.T))
    assert bool((G @ d >= -(agg.reg_eps * trace * w.abs() + 1e-9 * trace * float(w.abs().sum()))).all())


@pytest.mark.parametrize("G", MATRICES)
def test_permutation_invariant(G: Tensor) -> None:
    agg = DualProj()
    d = agg(G)
    for seed in range(3):
        perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(agg(G[perm]), d, atol=1e-8 * float(d.norm()) + 1e-12, rtol=1e-7)


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e5, 1e15])
def test_positively_homogeneous(scale: float) -> None:
    G = RANKED[4]
    d = DualProj()(G)
    torch.testing.assert_close(DualProj()(scale * G) / scale, d, atol=1e-9 * float(d.norm()), rtol=1e-7)


@pytest.mark.parametrize("G", MATRICES)
def test_weights_agree_with_call(G: Tensor) -> None:
    agg = DualProj()
    torch.testing.assert_close(agg.weights(G @ G.T) @ G, agg(G), atol=1e-10 * float(G.norm() ** 2) + 1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_torchjd(seed: int) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    G = torch.randn(6, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = torchjd_aggregation.DualProj()(G)
    d = DualProj()(G)
    assert float(torch.nn.functional.cosine_similarity(d, expected, dim=0)) >= 0.999
    torch.testing.assert_close(d.norm(), expected.norm(), rtol=1e-6, atol=0)


def test_pref_vector() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Orthogonal rows: p·G is already in the dual cone when p ≥ 0.
    torch.testing.assert_close(DualProj(torch.tensor([3.0, 1.0]), reg_eps=1e-12)(G), torch.tensor([3.0, 1.0]).double())


def test_single_task_returns_the_gradient() -> None:
    g = torch.tensor([[3.0, -1.0, 2.0]])
    torch.testing.assert_close(DualProj()(g), g[0])
    assert DualProj()(g).dtype == torch.float32


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        DualProj()(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="finite"):
        DualProj()(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(2,\)"):
        DualProj(pref_vector=torch.ones(3))(torch.ones(2, 3))
    with pytest.raises(ValueError, match="norm_eps must be ≥ 0"):
        DualProj(norm_eps=-1.0)
    with pytest.raises(TypeError, match=r"losses must be a torch\.Tensor"):
        DualProj()(torch.ones(2, 3), losses=[1.0, 2.0])
