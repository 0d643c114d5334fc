"""GradDrop's Triton kernel (flatmtl_fast/aggregators/graddrop_kernels.py; on the CPU in Triton's interpreter)
equals the reference bit for bit, as the compiled CPU kernel does (test_graddrop_native.py).

Why bit for bit: the uniforms are the same Philox-4x32-10 draws U_n = tl.rand(seed, n) at the column index n;
the inputs widen exactly to float64 and every term (ℓ_k + (1 − ℓ_k) m_kn) g_kn is the reference's float64
product; only the order of the float64 sums differs (the kernel adds 8-row partial sums, the reference row by
row). With leak 0 the terms are 0 or g_kn (≤ 24 significant bits), so the sums are exact in any order unless a
column's entries span more than ~2²³ in magnitude; where one is not, a last-bit difference changes P_n's
decision only if |P_n − U_n| ≲ 1e-16, and d_n's rounding to float32 only if d_n lies within ~2⁻²⁹ relative of a
float32 rounding boundary (~1e-8 per entry: none in these ~3e5 outputs, so the assertion is equality). The
output rounding is the reference's too: float64 -> float32 -> out dtype (torch converts float64 to bfloat16
and float16 through float32 as well, as the kernel's ``acc.to(float32)`` then ``_round_for_store``).

The shapes run the paths the kernel has: N = 8197 is three programs of BLOCK_N = 4096 (the interpreter's
block), the last holding 5 columns, so the uniforms of later column blocks (offsets ≥ 4096) are compared;
K = 40 and 64 run five and eight row blocks of BLOCK_K = 8 in both row loops; K = 1, 2, 3, 7 a partial
row block. Runtime under the interpreter: ~0.05–0.3 s per case.
"""

from __future__ import annotations

import pytest
import torch
from fused._util import graddrop_problem

import flatmtl_fast
from flatmtl_fast import reference

SHAPES = [(K, 8197) for K in (1, 2, 3, 7, 40, 64)] + [(1, 1), (3, 1001)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("K", "N"), SHAPES)
@pytest.mark.parametrize("leak", [0.0, "per-task"])
def test_triton_graddrop_equals_reference(dtype, K, N, leak):
    G, leak_value = graddrop_problem(K, N, dtype, leak)
    expected = reference.GradDrop(leak=leak_value, generator=torch.Generator().manual_seed(3))(G)
    with flatmtl_fast.use_backend("triton"):
        got = flatmtl_fast.GradDrop(leak=leak_value, generator=torch.Generator().manual_seed(3))(G)
    assert got.dtype == dtype
    mismatches = (got != expected).nonzero().flatten()
    assert mismatches.numel() == 0, f"{mismatches.numel()} entries differ, first at columns {mismatches[:5].tolist()}"
