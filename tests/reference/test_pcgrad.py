"""Reference PCGrad: hand-checked projections, the generator contract, agreement with torchjd 0.18 (K = 2)."""

from __future__ import annotations

import pytest
import torch
from support.matrices import POSITIVE_SCALES, generator

from flatmtl_fast.reference import PCGrad


def test_two_tasks_by_hand() -> None:
    # g1·g2 = −1: g1' = g1 + ½ g2 = (0.5, 0.5), g2' = g2 + 1·g1 = (0, 1); d = g1' + g2'.
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(PCGrad()(G), torch.tensor([0.5, 1.5]))


# Three tasks where the visiting order matters. Hand-derived g_i' for each first-visited j
# (g1 = (1, 0), g2 = (−1, 2), g3 = (−1, −1); every pair conflicts at every step):
#   row 1: 2 then 3 -> (1,0) + 1/5 g2 = (0.8, 0.4); ·g3 = −1.2 -> + 0.6 g3 = (0.2, −0.2)
#          3 then 2 -> (1,0) + 1/2 g3 = (0.5, −0.5); ·g2 = −1.5 -> + 0.3 g2 = (0.2, 0.1)
#   row 2: 1 then 3 -> g2 + g1 = (0, 2); ·g3 = −2 -> + 1 g3 = (−1, 1)
#          3 then 1 -> g2 + 1/2 g3 = (−1.5, 1.5); ·g1 = −1.5 -> + 1.5 g1 = (0, 1.5)
#   row 3: 1 then 2 -> g3 + g1 = (0, −1); ·g2 = −2 -> + 0.4 g2 = (−0.4, −0.2)
#          2 then 1 -> g3 + 1/5 g2 = (−1.2, −0.6); ·g1 = −1.2 -> + 1.2 g1 = (0, −0.6)
THREE_TASKS = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
CORRECTED_ROW = {
    (0, 1): (0.2, -0.2),
    (0, 2): (0.2, 0.1),
    (1, 0): (-1.0, 1.0),
    (1, 2): (0.0, 1.5),
    (2, 0): (-0.4, -0.2),
    (2, 1): (0.0, -0.6),
}


def _first_visited(keys: torch.Tensor, i: int) -> int:
    """The documented contract: row i visits the j ≠ i by ascending keys[i, j] (stable)."""
    return next(j for j in torch.argsort(keys[i], stable=True).tolist() if j != i)


@pytest.mark.parametrize("seed", range(8))
def test_three_tasks_follow_the_documented_order(seed: int) -> None:
    keys = torch.rand((3, 3), generator=generator(seed), dtype=torch.float64)
    expected = sum(torch.tensor(CORRECTED_ROW[(i, _first_visited(keys, i))], dtype=torch.float64) for i in range(3))
    torch.testing.assert_close(PCGrad(generator=generator(seed))(THREE_TASKS), expected)
    w = PCGrad(generator=generator(seed)).weights(THREE_TASKS @ THREE_TASKS.T)
    torch.testing.assert_close(w @ THREE_TASKS, expected)


def test_non_conflicting_rows_are_summed() -> None:
    G = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(PCGrad()(G), G.sum(dim=0))


def test_default_generator_is_torchs_global_one() -> None:
    G = torch.randn(5, 8, generator=generator(3))
    torch.manual_seed(11)
    d = PCGrad()(G)
    torch.testing.assert_close(d, PCGrad(generator=generator(11))(G), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_generator_reproducible_and_gram_form_agrees(seed: int) -> None:
    G = torch.randn(6, 10, generator=generator(100 + seed), dtype=torch.float64)
    a, b, c = (PCGrad(generator=generator(seed)) for _ in range(3))
    for _ in range(3):  # successive calls keep consuming the generators identically
        d = a(G)
        torch.testing.assert_close(b(G), d, rtol=0, atol=0)
        torch.testing.assert_close(c.weights(G @ G.T) @ G, d)


def test_state_dict_round_trip_and_reset() -> None:
    G = torch.randn(5, 7, generator=generator(0))
    agg = PCGrad(generator=generator(4))
    first = agg(G)
    state = agg.state_dict()
    continued = [agg(G) for _ in range(3)]
    agg.load_state_dict(state)
    assert all(torch.equal(agg(G), d) for d in continued)
    other = PCGrad(generator=generator(999))
    other.load_state_dict(state)
    assert torch.equal(other(G), continued[0])
    agg.reset()  # rewinds the generator to its state at construction
    assert torch.equal(agg(G), first)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_torchjd_on_two_tasks(seed: int) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    G = torch.randn(2, 12, generator=generator(seed), dtype=torch.float64)
    d, expected = PCGrad()(G), torchjd_aggregation.PCGrad()(G)
    assert float(torch.nn.functional.cosine_similarity(d, expected, dim=0)) >= 0.999
    torch.testing.assert_close(d.norm(), expected.norm())  # both sum the corrected rows


def test_degenerate_rows_and_scales() -> None:
    g, zero = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    # Opposite rows cancel: g1' = g1 + g2 = 0 and g2' = 0. A zero row is neither projected nor projected against.
    torch.testing.assert_close(PCGrad()(torch.stack([g, -g])), zero)
    torch.testing.assert_close(PCGrad()(torch.stack([g, zero, -g])), zero)
    torch.testing.assert_close(PCGrad()(torch.stack([g, g, 2 * g])), 4 * g)
    assert torch.equal(PCGrad()(torch.zeros(4, 3)), torch.zeros(3))
    assert torch.equal(PCGrad().weights(torch.zeros(4, 4)), torch.ones(4))
    G = torch.randn(6, 9, generator=generator(5), dtype=torch.float64)
    d = PCGrad(generator=generator(1))(G)
    for scale in POSITIVE_SCALES:  # the decisions are scale-free: d is homogeneous
        torch.testing.assert_close(PCGrad(generator=generator(1))(scale * G) / scale, d)


def test_single_task_and_dtype() -> None:
    g = torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.bfloat16)
    assert torch.equal(PCGrad()(g), g[0])
    torch.testing.assert_close(PCGrad().weights(torch.ones(1, 1)), torch.ones(1))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"shape \(K, N\)"):
        PCGrad()(torch.ones(3))
    with pytest.raises(ValueError, match="at least one row"):
        PCGrad()(torch.ones(0, 3))
    with pytest.raises(ValueError, match="square"):
        PCGrad().weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        PCGrad(generator=0)
    with pytest.raises(ValueError, match="without a generator"):
        PCGrad().load_state_dict(PCGrad(generator=generator(0)).state_dict())
