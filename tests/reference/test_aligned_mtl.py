"""Tests of the reference AlignedMTL (algorithms.md §2)."""

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import SCALES, assert_finite_and_homogeneous, assert_same_direction, random_matrix

from flatmtl_fast.reference import AlignedMTL


def test_hand_checked() -> None:
    # Orthogonal rows g₁ = (1, 0), g₂ = (0, 2): M = diag(1, 4), B = √1 · diag(1, ½), w = (1, ½), d = (1, 1).
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL().weights(G @ G.T), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(AlignedMTL()(G), torch.tensor([1.0, 1.0], dtype=torch.float64))
    # Golden J of §3: the aligned rows B J are orthogonal with equal norms √λ_min.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    M = J @ J.T
    lam_min = torch.linalg.eigvalsh(M).min()
    from flatmtl_fast.reference.aligned_mtl import balance_transformation

    aligned = balance_transformation(M) @ J
    torch.testing.assert_close(aligned @ aligned.T, lam_min * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("K,rank", [(2, 2), (3, 3), (5, 5), (5, 2)])
def test_properties_and_torchjd(K: int, rank: int) -> None:
    """torchjd weights B with its default mean preference vector: its direction is ours / K."""
    G = random_matrix(K, 10, rank, seed=K + rank)
    d = AlignedMTL()(G)
    torch.testing.assert_close(AlignedMTL().weights(G @ G.T) @ G, d)
    torch.testing.assert_close(AlignedMTL()(G[torch.randperm(K)]), d)
    theirs = tjd.AlignedMTL()(G)
    assert_same_direction(d, theirs)
    torch.testing.assert_close(d / K, theirs)


def test_k1() -> None:
    g = torch.randn(1, 4)
    torch.testing.assert_close(AlignedMTL()(g), g[0])


@pytest.mark.parametrize("scale", SCALES)
def test_scales_and_degenerate(scale: float) -> None:
    G = random_matrix(4, 6, 4, seed=2)
    assert_finite_and_homogeneous(AlignedMTL, G, scale, rtol=1e-7)
    # Duplicated rows: M = ‖g‖² 𝟏𝟏ᵀ has the one kept eigenpair (3‖g‖², 𝟏/√3), so B = 𝟏𝟏ᵀ/3, w = 𝟏, d = 3g.
    g = G[0]
    torch.testing.assert_close(AlignedMTL()(g.repeat(3, 1)), 3 * g)


def test_float32_duplicates_are_rank_deficient() -> None:
    g = torch.randn(1, 5)
    d = AlignedMTL()(torch.cat([g, g, torch.randn(1, 5)]))
    assert torch.isfinite(d).all() and d.dtype == torch.float32


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        AlignedMTL()(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        AlignedMTL().weights(torch.ones(2, 3))
