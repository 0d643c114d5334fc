"""Reference DB-MTL: two steps by hand, state round trip, loss checks, degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch
from support.matrices import POSITIVE_SCALES, generator

from flatmtl_fast.reference import DBMTL

G = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
LOSSES = torch.tensor([1.0, 2.0], dtype=torch.float64)


def test_two_steps_by_hand() -> None:
    # ĝ = g / L = (3, 4), (0, 1). Step 1 (t = 1, β/t^σ = 0.9): B = ĝ + 0.9 (0 − ĝ) = 0.1 ĝ, norms 0.5 and 0.1,
    # so d = 0.5 (B1/0.5 + B2/0.1) = (0.3, 0.4) + (0, 0.5).
    agg = DBMTL()
    torch.testing.assert_close(agg(G, LOSSES), torch.tensor([0.3, 0.9], dtype=torch.float64))
    # Step 2 (t = 2, f = 0.9/√2): B = ĝ + f (0.1 ĝ − ĝ) = (1 − 0.9 f) ĝ, directions unchanged, so
    # d = max‖B‖ (unit(ĝ1) + unit(ĝ2)) = 5 (1 − 0.9 f) (0.6, 1.8).
    shrink = 1 - 0.9 * 0.9 / math.sqrt(2)
    torch.testing.assert_close(agg(G, LOSSES), torch.tensor([3.0 * shrink, 9.0 * shrink], dtype=torch.float64))
    assert agg.step == 2


def test_balances_to_the_largest_buffered_norm() -> None:
    agg = DBMTL(beta=0.0)  # no memory: B = g / L
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 0.5]])
    torch.testing.assert_close(agg(G, torch.tensor([1.0, 2.0, 0.1])), torch.tensor([5.0, 5.0, 5.0]))


def test_single_task_is_the_buffered_log_gradient() -> None:
    g, loss = torch.tensor([[3.0, -1.0, 2.0]]), torch.tensor([2.0])
    torch.testing.assert_close(DBMTL()(g, loss), 0.1 * g[0] / 2.0)  # first call: (1 − β) g/L
    torch.testing.assert_close(DBMTL(beta=0.0)(g, loss), g[0] / 2.0)


def test_state_dict_round_trip_and_reset() -> None:
    gen = generator(0)
    steps = [(torch.randn(3, 5, generator=gen), torch.rand(3, generator=gen) + 0.1) for _ in range(4)]
    agg = DBMTL()
    first = agg(*steps[0])
    state = agg.state_dict()
    continued = [agg(*step) for step in steps[1:]]
    fresh = DBMTL()
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh(*step), d) for step, d in zip(steps[1:], continued, strict=True))
    agg.reset()
    assert agg.buffer is None and agg.step is None
    assert torch.equal(agg(*steps[0]), first)


def test_degenerate_inputs_and_scales() -> None:
    losses = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert torch.equal(DBMTL()(torch.zeros(3, 3, dtype=torch.float64), losses), torch.zeros(3, dtype=torch.float64))
    zero_row = DBMTL()(torch.stack([g, torch.zeros(3, dtype=torch.float64), -g]), losses)
    torch.testing.assert_close(zero_row, torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)  # ±g cancel
    G = torch.randn(3, 6, generator=generator(1), dtype=torch.float64)
    d = DBMTL()(G, losses)
    for scale in POSITIVE_SCALES:  # positively homogeneous in G
        torch.testing.assert_close(DBMTL()(scale * G, losses), scale * d)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="needs the task losses"):
        DBMTL()(G)
    with pytest.raises(ValueError, match="must be > 0"):
        DBMTL()(G, torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be finite"):
        DBMTL()(G, torch.tensor([1.0, float("nan")], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        DBMTL()(G, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta must be ≥ 0 and ≤ 1"):
        DBMTL(beta=-0.1)
    agg = DBMTL()
    agg(G, LOSSES)
    with pytest.raises(ValueError, match="call reset"):
        agg(torch.ones(2, 3, dtype=torch.float64), LOSSES)
