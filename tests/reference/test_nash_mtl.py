"""Tests of the reference NashMTL (algorithms.md §2)."""

import warnings

import pytest
import torch
import torchjd.aggregation as tjd
from support.matrices import POSITIVE_SCALES, assert_same_direction_and_norm, random_matrix

from flatmtl_fast.reference import NashMTL


def test_hand_checked() -> None:
    # Orthogonal rows: Mα = 1/α gives α_i = 1/‖g_i‖ = (1, ½), d = (1, 1), ‖d‖² = αᵀMα = K = 2.
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(NashMTL(max_norm=0.0).weights(G @ G.T), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(NashMTL(max_norm=0.0)(G), torch.tensor([1.0, 1.0], dtype=torch.float64))
    # Default clip to norm 1.
    torch.testing.assert_close(NashMTL()(G), torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5)
    # Golden J of §3 (K = 2): α_i ∝ 1/‖g_i‖ always (α₁²M₁₁ = α₂²M₂₂), here with α₁(Mα)₁ = 1.
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    M = J @ J.T
    alpha = NashMTL(max_norm=0.0).weights(M)
    torch.testing.assert_close(alpha[0] * J[0].norm(), alpha[1] * J[1].norm())
    torch.testing.assert_close(alpha * (M @ alpha), torch.ones(2, dtype=torch.float64))


def test_k1() -> None:
    g = torch.randn(1, 5)
    torch.testing.assert_close(NashMTL(max_norm=0.0)(g), g[0] / g[0].norm())


@pytest.mark.parametrize("scale", POSITIVE_SCALES)
@pytest.mark.parametrize("K", [2, 3, 5, 10])
def test_solves_nash_condition(K: int, scale: float) -> None:
    G = scale * random_matrix(K, 12, K, seed=K) * torch.logspace(-1, 1, K, dtype=torch.float64)[:, None]
    agg = NashMTL(max_norm=0.0)
    d = agg(G)
    alpha = agg.state_dict()["_alpha"]
    M = G @ G.T
    torch.testing.assert_close(alpha * (M @ alpha), torch.ones(K, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(float(d @ d), float(K), rtol=1e-8, atol=0)
    torch.testing.assert_close(NashMTL(max_norm=0.0).weights(M) @ G, d)


def test_state() -> None:
    G1, G2 = random_matrix(3, 8, 3, seed=1), random_matrix(3, 8, 3, seed=2)
    agg = NashMTL(update_weights_every=2)
    agg(G1)
    state = agg.state_dict()
    d2 = agg(G2)  # reuses α from G1 (step 1 is not an update step)
    torch.testing.assert_close(agg.state_dict()["_alpha"], state["_alpha"])
    assert agg.state_dict()["_step"] == 2
    fresh = NashMTL(update_weights_every=2)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(G2), d2)
    agg.reset()
    assert agg.state_dict() == {"_alpha": None, "_step": None}
    # Warm start does not change the (unique) solution.
    warm = NashMTL(max_norm=0.0)
    warm(G1)
    torch.testing.assert_close(warm(G2), NashMTL(max_norm=0.0)(G2))


def test_degenerate() -> None:
    g = random_matrix(1, 6, 1, seed=3)
    h = random_matrix(1, 6, 1, seed=4)
    # Duplicated rows: α_i = 1/(√K ‖g‖) and d = √K g/‖g‖.
    torch.testing.assert_close(NashMTL(max_norm=0.0)(g.repeat(3, 1)), 3**0.5 * g[0] / g[0].norm())
    # Collinear rows with the same sign: a solution exists.
    agg = NashMTL(max_norm=0.0)
    d = agg(torch.cat([g, 3.0 * g, h]))
    assert torch.isfinite(d).all() and abs(float(d @ d) - 3.0) < 1e-8
    # A zero row leaves the solve: the others are solved alone.
    torch.testing.assert_close(
        NashMTL(max_norm=0.0)(torch.cat([g, 0 * g, h])), NashMTL(max_norm=0.0)(torch.cat([g, h]))
    )
    # No solution (opposite rows): the previous α (𝟏 at first) is kept, as the official code does.
    agg = NashMTL(max_norm=0.0)
    torch.testing.assert_close(agg(torch.cat([g, -g, h])), h[0])
    # Zero matrix and scale 0.
    for X in (torch.zeros(3, 6, dtype=torch.float64), 0.0 * random_matrix(3, 6, 3, seed=5)):
        assert torch.equal(NashMTL()(X), torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("K", [2, 3, 5])
def test_matches_torchjd(K: int) -> None:
    for seed in range(2):
        G = random_matrix(K, 12, K, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = tjd.NashMTL(n_tasks=K)(G)
        ours = NashMTL()(G)
        assert_same_direction_and_norm(ours, theirs, rtol=1e-3)


def test_bad_inputs() -> None:
    agg = NashMTL()
    agg(torch.ones(2, 3))
    with pytest.raises(ValueError, match="call reset"):
        agg(torch.ones(3, 3))
    with pytest.raises(ValueError, match="max_norm must be"):
        NashMTL(max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every must be"):
        NashMTL(update_weights_every=0)
    with pytest.raises(KeyError, match="missing keys"):
        NashMTL().load_state_dict({"_alpha": None})
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        NashMTL()(torch.ones(2, 3), torch.ones(3))
