"""Indices past 2³¹ are computed in 64-bit arithmetic, shown without touching gigabytes of memory.

torch.empty of a huge buffer reserves address space only; pages that are never written cost no
memory (reads of them map the shared zero page). Rows are placed so that element offsets exceed
2³¹ (row stride) or column indices do (N > 2³¹).
"""

from __future__ import annotations

import pytest
import torch
from support.cases import CPU_CASES, combine_tolerance, gram_tolerance

import flatmtl_fast

BEYOND_INT32 = 2**31 + 4099


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CPU_CASES])
def test_row_offsets_past_int32(case):
    """Two rows 2³¹+4099 elements apart: row 1's offsets overflow int32."""
    # bfloat16 keeps the reservation at 4 GiB: the Triton interpreter copies the whole storage back.
    N = 1000
    storage = torch.empty(BEYOND_INT32 + N, dtype=torch.bfloat16)
    G = storage.as_strided((2, N), (BEYOND_INT32, 1))
    values = torch.randn(2, N).bfloat16()
    G.copy_(values)
    w = torch.tensor([0.5, -2.0])
    with case.active():
        M = flatmtl_fast.gram(G, dtype=torch.float64)
        d = flatmtl_fast.combine(w, G, out=torch.empty(N))
    v64 = values.double()
    assert ((M - v64 @ v64.T).abs() <= gram_tolerance(values)).all()
    assert ((d.double() - w.double() @ v64).abs() <= combine_tolerance(w, values, torch.float32)).all()


def test_column_indices_past_int32_cpp():
    """N = 2³¹ + 4099 columns (virtual; only the written pages are real): entries beyond 2³¹ count."""
    N = BEYOND_INT32
    G = torch.empty(1, N, dtype=torch.bfloat16)
    G[0, :4096] = 0  # first page real, rest untouched zero pages
    tail = torch.tensor([3.0, -1.5, 2.0]).bfloat16()
    G[0, N - 3 :] = tail
    G[0, 2**31 - 1] = 1.0
    with flatmtl_fast.use_backend("cpp"):
        M = flatmtl_fast.gram(G, dtype=torch.float64)
    assert M.item() == pytest.approx(1.0 + 9.0 + 2.25 + 4.0)
