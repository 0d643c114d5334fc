"""Tests of the reference IMTLG (algorithms.md §2)."""

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import SCALES, assert_same_direction, random_matrix

from flatmtl_fast.reference import IMTLG


def test_hand_checked() -> None:
    # g₁ = (1, 0), g₂ = (0, 2): U = (1, −1), D = (1, −2), g₁Uᵀ = 1, DUᵀ = 3: α = (2/3, 1/3), d = (2/3, 2/3).
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(IMTLG().weights(G @ G.T), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(IMTLG()(G), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    # Golden J of §3: u₁ = (−4, 1, 1)/√18, u₂ = (6, 1, 1)/√38; equal projections d·u₁ = d·u₂ with Σα = 1.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    d = IMTLG()(J)
    torch.testing.assert_close(d @ J[0] / J[0].norm(), d @ J[1] / J[1].norm())


@pytest.mark.parametrize("K", [2, 3, 5])
def test_properties_and_torchjd(K: int) -> None:
    G = random_matrix(K, 10, K, seed=K)
    d = IMTLG()(G)
    projections = G @ d / G.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(K))
    torch.testing.assert_close(IMTLG().weights(G @ G.T).sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(IMTLG().weights(G @ G.T) @ G, d)
    torch.testing.assert_close(IMTLG()(G[torch.randperm(K)]), d)
    # torchjd's generalisation w ∝ M⁺‖g‖ equals IMTL-G's closed form when M is invertible.
    assert_same_direction(d, tjd.IMTLG()(G))
    torch.testing.assert_close(d, tjd.IMTLG()(G))


def test_k1() -> None:
    g = torch.randn(1, 4)
    assert torch.equal(IMTLG()(g), g[0])
    torch.testing.assert_close(IMTLG().weights(g @ g.T), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("scale", SCALES)
def test_scales_and_degenerate(scale: float) -> None:
    G = random_matrix(4, 6, 4, seed=2)
    g = G[:1]
    inputs = {
        "full": G,
        "rank2": random_matrix(4, 6, 2, seed=4),
        "duplicated": g.repeat(3, 1),
        "collinear": torch.cat([g, 3.3 * g, G[1:2]]),
        "zero row": torch.cat([G[:2], torch.zeros(1, 6, dtype=torch.float64)]),
        "zero": torch.zeros(3, 6, dtype=torch.float64),
    }
    for name, X in inputs.items():
        d = IMTLG()(scale * X)
        assert torch.isfinite(d).all(), name
        # atol: on "rank2" (4 unit directions in a plane) the only equal-projection point is d = 0 up to rounding.
        atol = 1e-12 * scale * float(X.norm()) + 1e-300
        torch.testing.assert_close(d, scale * IMTLG()(X), rtol=1e-7, atol=atol, msg=name)
        torch.testing.assert_close(IMTLG().weights(X @ X.T) @ X, IMTLG()(X), msg=name)
    # Collinear rows (u₁ = u₂) impose nothing beyond d·u₁ = d·u₃: still equal projections.
    X = inputs["collinear"]
    d = IMTLG()(X)
    torch.testing.assert_close(d @ X[0] / X[0].norm(), d @ X[2] / X[2].norm())
    torch.testing.assert_close(IMTLG()(inputs["duplicated"]), g[0])


@pytest.mark.parametrize("zero_rows", [[0], [1], [0, 3], [1, 2, 3]])
def test_a_task_without_gradient_does_not_stop_the_others(zero_rows: list[int]) -> None:
    """A zero g_i has no direction: it gets weight 0 and the others get IMTL-G's closed form on their own (equal
    projections, Σ α = 1) — not d = 0, which a zero u_i in the equal projections would force. torchjd's M⁺ form
    gives the same d (zero rows have weight 0 in it too)."""
    G = random_matrix(5, 9, 5, seed=11)
    G[zero_rows] = 0.0
    kept = [i for i in range(5) if i not in zero_rows]
    w = IMTLG().weights(G @ G.T)
    assert not w[zero_rows].any()
    torch.testing.assert_close(w[kept], IMTLG().weights(G[kept] @ G[kept].T), rtol=1e-12, atol=1e-15)
    d = IMTLG()(G)
    torch.testing.assert_close(d, IMTLG()(G[kept]), rtol=1e-12, atol=1e-15)
    projections = G[kept] @ d / G[kept].norm(dim=1)
    assert float(projections.abs().min()) > 1e-6 * float(G.norm())  # the old u_i = 0 gave d = 0 (~1e-15)
    torch.testing.assert_close(projections, projections[:1].expand(len(kept)))
    torch.testing.assert_close(d, tjd.IMTLG()(G))


def test_float32_collinear_matches_torchjd_direction() -> None:
    """A float32 copy of collinear rows is collinear only to float32 precision: cut off at that level."""
    g = torch.randn(1, 6)
    G = torch.cat([g, 3.3 * g, torch.randn(1, 6)])
    assert_same_direction(IMTLG()(G), tjd.IMTLG()(G))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        IMTLG()(torch.ones(2, 3), torch.ones(1))
    with pytest.raises(ValueError, match="square"):
        IMTLG().weights(torch.ones(3))
    with pytest.raises(ValueError, match=r"at least one row"):
        IMTLG()(torch.ones(0, 3))
