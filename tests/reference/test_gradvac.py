"""Reference GradVac: hand-checked corrections and targets, state, generator contract, torchjd 0.18 (K = 2)."""

from __future__ import annotations

import math

import pytest
import torch
from support.matrices import SCALES, generator

from flatmtl_fast.reference import GradVac, PCGrad


def test_first_call_with_zero_eps_is_pcgrad() -> None:
    # With φ̂ = 0 the correction only fires when φ < 0 and then adds ‖g_i'‖(−φ)/‖g_j‖ g_j = −(g_i'·g_j)/‖g_j‖² g_j:
    # exactly PCGrad's projection, visiting the pairs in the same (generator-given) order.
    G = torch.randn(6, 9, generator=generator(0), dtype=torch.float64)
    torch.testing.assert_close(GradVac(eps=0.0, generator=generator(3))(G), PCGrad(generator=generator(3))(G))


def test_targets_follow_the_ema_of_measured_cosines() -> None:
    # g1 = (1, 0), g2 = (−1, 1): cos = −1/√2 for both pairs, measured before the correction.
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    agg = GradVac(beta=0.25, eps=0.0)
    torch.testing.assert_close(agg(G), torch.tensor([0.5, 1.5], dtype=torch.float64))  # = PCGrad (φ̂ = 0)
    expected_phi_hat = torch.tensor([[0.0, -0.25 / math.sqrt(2)], [-0.25 / math.sqrt(2), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(agg.phi_hat, expected_phi_hat)


def test_positive_target_by_hand() -> None:
    # β = 1: the target becomes the last measured cosine. Step 1: g2 = (1, 1), cos = 1/√2 ≥ 0 -> no change.
    # Step 2: orthogonal rows, φ = 0 < 1/√2: c = ‖g1‖ (1/√2 · 1 − 0) / (‖g2‖ · 1/√2) = 1, so g1' = (1, 1)
    # (its cosine with g2 is the target 1/√2), symmetrically g2' = (1, 1); d = (2, 2).
    agg = GradVac(beta=1.0)
    torch.testing.assert_close(agg(torch.tensor([[1.0, 0.0], [1.0, 1.0]])), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(agg(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(agg.phi_hat, torch.zeros(2, 2, dtype=torch.float64))  # β = 1: last φ = 0


@pytest.mark.parametrize("seed", range(3))
def test_generator_reproducible_and_gram_form_agrees(seed: int) -> None:
    gen = generator(50 + seed)
    steps = [torch.randn(5, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    a, b, c = (GradVac(beta=0.3, generator=generator(seed)) for _ in range(3))
    for G in steps:  # the targets evolve identically in all three
        d = a(G)
        torch.testing.assert_close(b(G), d, rtol=0, atol=0)
        torch.testing.assert_close(c.weights(G @ G.T) @ G, d)
    torch.testing.assert_close(c.phi_hat, a.phi_hat)


def test_state_dict_round_trip_and_reset() -> None:
    gen = generator(7)
    steps = [torch.randn(4, 6, generator=gen) for _ in range(4)]
    agg = GradVac(beta=0.5, generator=generator(1))
    first = agg(steps[0])
    state = agg.state_dict()
    continued = [agg(G) for G in steps[1:]]
    fresh = GradVac(beta=0.5, generator=generator(123))
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh(G), d) for G, d in zip(steps[1:], continued, strict=True))
    agg.reset()  # zero targets and the generator rewound: like a new instance
    assert agg.phi_hat is None
    assert torch.equal(agg(steps[0]), first)


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_torchjd_on_two_tasks(seed: int) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    theirs, ours = torchjd_aggregation.GradVac(beta=0.01), GradVac()  # same β, eps = 1e-8 in both
    gen = generator(seed)
    for _ in range(4):
        G = torch.randn(2, 10, generator=gen, dtype=torch.float64)
        d, expected = ours(G), theirs(G)
        assert float(torch.nn.functional.cosine_similarity(d, expected, dim=0)) >= 0.999
        torch.testing.assert_close(d.norm(), expected.norm())


def test_degenerate_rows_and_scales() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    for G in [torch.zeros(4, 3), torch.stack([g, zero, -g]), torch.stack([g, g, 2 * g]), torch.stack([g, -g])]:
        agg = GradVac(beta=0.5)
        for _ in range(3):
            assert bool(torch.isfinite(agg(G)).all()) and bool(torch.isfinite(agg.phi_hat).all())
    G = torch.randn(5, 7, generator=generator(2), dtype=torch.float64)
    for scale in SCALES:
        agg = GradVac(beta=0.5)
        for _ in range(3):
            d = agg(scale * G)
            assert bool(torch.isfinite(d).all())
    # Away from the eps damping, the method is scale-free.
    reference, scaled = GradVac(beta=0.5, generator=generator(0)), GradVac(beta=0.5, generator=generator(0))
    for _ in range(3):
        torch.testing.assert_close(scaled(1e10 * G) / 1e10, reference(G))


def test_single_task() -> None:
    g = torch.tensor([[3.0, -1.0, 2.0]])
    assert torch.equal(GradVac()(g), g[0])
    torch.testing.assert_close(GradVac().weights(g @ g.T), torch.ones(1))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="beta must be ≥ 0 and ≤ 1"):
        GradVac(beta=1.5)
    with pytest.raises(ValueError, match="eps must be ≥ 0"):
        GradVac(eps=-1.0)
    agg = GradVac()
    agg(torch.ones(3, 2))
    with pytest.raises(ValueError, match="call reset"):
        agg(torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        agg(torch.ones(2))
    with pytest.raises(KeyError, match="missing keys"):
        agg.load_state_dict({})
