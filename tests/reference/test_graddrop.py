"""Reference GradDrop: the sign rule by hand, the seed/Philox contract, leak, degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from support.matrices import SCALES, assert_default_generator_is_torchs_global_one, generator

from flatmtl_fast.reference import GradDrop
from flatmtl_fast.reference._philox import philox_uniform


def _uniforms(generator_seed: int, N: int) -> torch.Tensor:
    """The documented contract: one 62-bit seed drawn from the generator, then tl.rand(seed, n)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator(generator_seed)))
    return philox_uniform(seed, N).double()


@pytest.mark.parametrize("generator_seed", range(4))
def test_sign_rule_by_hand(generator_seed: int) -> None:
    # Columns: (2, −1) has P = ½(1 + 1/3) = 2/3; (1, −3) has P = ¼; (4, 5) has P = 1 (both kept since
    # U < 1); (−1, −2) has P = 0 (both kept when U > 0); (0, 0) gives 0. The positive entries of a
    # mixed column are kept when P > U, the negative ones when P < U.
    G = torch.tensor([[2.0, 1.0, 4.0, -1.0, 0.0], [-1.0, -3.0, 5.0, -2.0, 0.0]], dtype=torch.float64)
    U = _uniforms(generator_seed, 5)
    expected = torch.tensor(
        [
            2.0 if 2 / 3 > U[0] else -1.0,
            1.0 if 0.25 > U[1] else -3.0,
            9.0,
            -3.0 if U[3] > 0 else 0.0,
            0.0,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(GradDrop(generator=generator(generator_seed))(G), expected, rtol=0, atol=0)


def test_agrees_with_the_formula_on_random_input() -> None:
    G = torch.randn(4, 1000, generator=generator(0), dtype=torch.float64)
    U = _uniforms(9, 1000)
    P = 0.5 * (1 + G.sum(0) / G.abs().sum(0))
    keep = ((P > U) & (G > 0)) | ((P < U) & (G < 0))
    torch.testing.assert_close(GradDrop(generator=generator(9))(G), (keep * G).sum(0), rtol=0, atol=0)
    # A per-task leak lets that fraction of each gradient through regardless of the mask.
    leak = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    expected = ((leak[:, None] + (1 - leak[:, None]) * keep) * G).sum(0)
    torch.testing.assert_close(GradDrop(leak=leak, generator=generator(9))(G), expected)


def test_full_leak_is_the_sum() -> None:
    G = torch.randn(3, 20, generator=generator(1))
    torch.testing.assert_close(GradDrop(leak=1.0)(G), G.sum(0))


def test_default_generator_is_torchs_global_one() -> None:
    assert_default_generator_is_torchs_global_one(GradDrop, torch.randn(5, 64, generator=generator(3)), seed=11)


def test_generator_reproducible_state_round_trip_and_reset() -> None:
    G = torch.randn(5, 256, generator=generator(2))
    a, b = GradDrop(generator=generator(5)), GradDrop(generator=generator(5))
    first = a(G)
    assert torch.equal(b(G), first)
    state = a.state_dict()
    continued = [a(G) for _ in range(3)]
    assert not torch.equal(continued[0], first)  # a fresh seed at every call
    a.load_state_dict(state)
    assert all(torch.equal(a(G), d) for d in continued)
    a.reset()
    assert torch.equal(a(G), first)


def test_degenerate_inputs_and_scales() -> None:
    assert torch.equal(GradDrop()(torch.zeros(3, 4)), torch.zeros(3, 4).sum(0))
    g = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    for G in [torch.stack([g, g, 2 * g]), torch.stack([g, torch.zeros_like(g)])]:  # one sign per column
        torch.testing.assert_close(GradDrop()(G), G.sum(0))
    G = torch.randn(4, 50, generator=generator(4), dtype=torch.float64)
    d = GradDrop(generator=generator(0))(G)
    for scale in SCALES:  # P is scale-free, so d is homogeneous
        torch.testing.assert_close(GradDrop(generator=generator(0))(scale * G), scale * d)


def test_single_task_and_dtype() -> None:
    g = torch.tensor([[3.0, -1.0, 0.0, 2.0]], dtype=torch.float16)
    d = GradDrop(generator=generator(0))(g)
    assert d.dtype == torch.float16 and torch.equal(d, g[0])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"leak must be .* in \[0, 1\]"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="leak has 3 entries but G has K = 2"):
        GradDrop(leak=torch.tensor([0.1, 0.2, 0.3]))(torch.ones(2, 4))
    with pytest.raises(TypeError, match="floating"):
        GradDrop()(torch.ones(2, 4, dtype=torch.int32))
