"""gram/combine are torch.library custom ops: opcheck passes and torch.compile traces them without graph breaks."""

from __future__ import annotations

import pytest
import torch
from support.cases import CPU_CASES

import flatmtl_fast
from flatmtl_fast.primitives.ops import combine_op, gram_op

BACKENDS = sorted({c.backend for c in CPU_CASES} - {"triton"})  # the interpreter cannot run opcheck's fake modes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype):
    G = torch.randn(5, 1003).to(dtype)
    out = torch.empty(1003, dtype=dtype)
    torch.library.opcheck(gram_op, (G, torch.float64, backend))
    torch.library.opcheck(gram_op, (G[:, 3:900], torch.float32, backend))  # row stride > N
    torch.library.opcheck(combine_op, (torch.randn(5), G, out, False, 0.5, backend))
    torch.library.opcheck(combine_op, (torch.randn(5), G, out, True, -2.0, backend))


def _step(G: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    M = flatmtl_fast.gram(G, dtype=torch.float64)
    weights = torch.softmax(-M.diagonal(), 0).float() * w
    flatmtl_fast.combine(weights, G, out=out, accumulate=True, alpha=0.5)
    return M


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(compiler):
    torch._dynamo.reset()
    G, w = torch.randn(4, 2049), torch.randn(4)
    compiled = torch.compile(_step, fullgraph=True, backend=compiler)
    eager_out, compiled_out = torch.zeros(2049), torch.zeros(2049)
    M_eager = _step(G, w, eager_out)
    M_compiled = compiled(G, w, compiled_out)
    assert torch.equal(M_eager, M_compiled)
    assert torch.allclose(eager_out, compiled_out, rtol=1e-6, atol=1e-6)
