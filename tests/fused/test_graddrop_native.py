"""GradDrop's compiled CPU kernel equals the reference bit for bit on every instruction set (same generator
state -> same Philox uniforms, the same float64 decisions and sums)."""

from __future__ import annotations

import pytest
import torch
from fused._util import graddrop_problem
from support.cases import CPU_CASES

import flatmtl_fast
from flatmtl_fast import reference

CPP_CASES = [pytest.param(c, id=c.id) for c in CPU_CASES if c.backend == "cpp"]


@pytest.mark.parametrize("case", CPP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("K", "N"), [(1, 1), (1, 1001), (2, 7), (3, 1001), (7, 20_003), (40, 517), (64, 4099)])
@pytest.mark.parametrize("leak", [0.0, "per-task"])
def test_cpp_graddrop_equals_reference(case, dtype, K, N, leak):
    G, leak_value = graddrop_problem(K, N, dtype, leak)
    expected = reference.GradDrop(leak=leak_value, generator=torch.Generator().manual_seed(3))(G)
    with case.active():
        got = flatmtl_fast.GradDrop(leak=leak_value, generator=torch.Generator().manual_seed(3))(G)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_cpp_graddrop_writes_into_out_view():
    G = torch.randn(5, 3001)
    buffer = torch.full((3011,), 9.0)
    with flatmtl_fast.use_backend("cpp"):
        flatmtl_fast.GradDrop(generator=torch.Generator().manual_seed(1))(G, out=buffer[5:3006])
    expected = reference.GradDrop(generator=torch.Generator().manual_seed(1))(G)
    assert torch.equal(buffer[5:3006], expected)
    assert (buffer[:5] == 9.0).all() and (buffer[3006:] == 9.0).all()
