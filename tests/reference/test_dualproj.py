"""Reference DualProj: hand-checked values, torchjd's properties, agreement with torchjd 0.18."""

from __future__ import annotations

import pytest
import torch
from support.matrices import (
    DualConeProperties,
)

from flatmtl_fast.reference import DualProj


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


class TestProperties(DualConeProperties):
    method = DualProj


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
