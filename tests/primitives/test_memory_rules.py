"""Memory rules of the primitives' outputs and inputs: overlaps found by address, weights that require grad and
inference tensors refused, and float32 products in every column of the Gram."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flatmtl_fast
from flatmtl_fast._memory import overlaps


def test_an_out_over_the_same_memory_through_another_storage_is_refused():
    memory = np.random.default_rng(0).standard_normal(4 * 50 + 1).astype(np.float32)
    G = torch.from_numpy(memory[:200]).view(4, 50)
    out = torch.from_numpy(memory[1:51])  # a second storage over G's first row
    assert G.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="combine: out overlaps G in memory"):
        flatmtl_fast.combine(torch.ones(4), G, out=out)


def test_tensors_without_memory_never_overlap():
    meta = torch.empty(4, 50, device="meta")
    assert not overlaps(meta, torch.empty(50, device="meta"))
    assert not overlaps(torch.empty(50), torch.empty(50, device="meta"))


def test_weights_that_require_grad_are_refused():
    """The gradient through w would silently be zero (the kernels are not differentiable), as for G."""
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"combine: w requires grad, but combine is not differentiable"):
        flatmtl_fast.combine(w, torch.randn(3, 8))
    torch.testing.assert_close(flatmtl_fast.combine(w.detach(), torch.ones(3, 8)), torch.full((8,), 3.0))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_an_inference_tensor_is_written_only_in_inference_mode(backend):
    """As torch's own in-place ops: refused outside inference mode, before anything is written."""
    with torch.inference_mode():
        out = torch.zeros(8)
    with flatmtl_fast.use_backend(backend):
        with pytest.raises(RuntimeError, match="combine: out is an inference tensor"):
            flatmtl_fast.combine(torch.ones(3), torch.ones(3, 8), out=out)
        assert not out.any()
        with torch.inference_mode():
            flatmtl_fast.combine(torch.ones(3), torch.ones(3, 8), out=out)
    assert torch.equal(out, torch.full((8,), 3.0))


@pytest.mark.parametrize("column", [0, 18, 19])
def test_a_square_overflows_float32_in_any_column(column):
    """The compiled kernels' products are float32 in every column (the SIMD groups and the columns past the last one
    alike): 1e20² is Inf wherever it sits, as row_norms says, whatever the instruction set's vector width. (The
    reference backend's products are float64.)"""
    G = torch.zeros(1, 20)
    G[0, column] = 1e20
    with flatmtl_fast.use_backend("cpp"):
        assert torch.isinf(flatmtl_fast.gram(G, dtype=torch.float64)).all()
        assert torch.isinf(flatmtl_fast.row_norms(G)).all()
