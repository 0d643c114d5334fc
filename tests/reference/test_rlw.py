"""Reference RLW: the documented draw, its scale, the generator state."""

from __future__ import annotations

import pytest
import torch
from support.matrices import assert_default_generator_is_torchs_global_one, generator

from flatmtl_fast.reference import RLW


@pytest.mark.parametrize("seed", range(3))
def test_weights_are_the_softmax_of_the_documented_draw(seed: int) -> None:
    G = torch.randn(4, 6, generator=generator(10 + seed), dtype=torch.float64)
    z = torch.randn(4, generator=generator(seed), dtype=torch.float64)
    w = torch.exp(z) / torch.exp(z).sum()
    torch.testing.assert_close(RLW(generator=generator(seed))(G), w @ G)
    torch.testing.assert_close(RLW(generator=generator(seed)).weights(G @ G.T), w)


def test_weights_form_a_convex_combination_and_ignore_the_gram() -> None:
    agg = RLW(generator=generator(0))
    for M in [torch.zeros(5, 5), 1e15 * torch.eye(5), torch.ones(5, 5)]:
        w = agg.weights(M)
        assert bool((w > 0).all())
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_default_generator_is_torchs_global_one() -> None:
    assert_default_generator_is_torchs_global_one(RLW, torch.randn(3, 5, generator=generator(1)), seed=21)


def test_gram_form_state_round_trip_and_reset() -> None:
    G = torch.randn(5, 7, generator=generator(2), dtype=torch.float64)
    a, b = RLW(generator=generator(3)), RLW(generator=generator(3))
    first = a(G)
    torch.testing.assert_close(b.weights(G @ G.T) @ G, first)
    state = a.state_dict()
    continued = [a(G) for _ in range(3)]
    a.load_state_dict(state)
    assert all(torch.equal(a(G), d) for d in continued)
    a.reset()
    assert torch.equal(a(G), first)


def test_degenerate_inputs_single_task_and_dtype() -> None:
    assert torch.equal(RLW()(torch.zeros(3, 4)), torch.zeros(4))
    for scale in [1e-10, 1e15]:
        assert bool(torch.isfinite(RLW()(scale * torch.randn(3, 4))).all())
    g = torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.bfloat16)
    d = RLW()(g)
    assert d.dtype == torch.bfloat16 and torch.equal(d, g[0])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        RLW()(torch.ones(3))
    with pytest.raises(ValueError, match="square"):
        RLW().weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        RLW(generator="cpu")
