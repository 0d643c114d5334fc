"""gram/combine are torch.library custom ops: opcheck passes and torch.compile traces them without graph breaks;
a plain eager call runs the op's function directly, with the op's results and version bumps."""

from __future__ import annotations

import pytest
import torch
from support.cases import CPU_CASES

import flatmtl_fast
from flatmtl_fast.primitives import ops
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


def _calls() -> dict[str, tuple[object, object]]:
    """Per primitive: (its custom op, a call of the public function on fresh inputs returning every tensor it
    writes or returns)."""
    K, N = 3, 1001
    G = torch.randn(K, N, generator=torch.Generator().manual_seed(0))
    base = torch.randn(N, generator=torch.Generator().manual_seed(1))

    def combine():
        out = torch.ones(N)
        w = torch.randn(K, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        return [out, flatmtl_fast.combine(w, G, out=out, accumulate=True)]

    def ema():
        buffer = torch.ones(K, N)
        return [buffer, flatmtl_fast.ema_row_norms(buffer, G, decay=0.9, gain=torch.full((K,), 0.1))]

    def perturb():
        out = torch.empty(N)
        return [out, flatmtl_fast.perturb(base, G[1], torch.tensor([0.5]), out=out, adaptive=True)]

    return {
        "gram": (ops.gram_op, lambda: [flatmtl_fast.gram(G, dtype=torch.float64)]),
        "combine": (ops.combine_op, combine),
        "row_norms": (ops.row_norms_op, lambda: [flatmtl_fast.row_norms(G, weight=base)]),
        "ema_row_norms": (ops.ema_row_norms_op, ema),
        "perturb": (ops.perturb_op, perturb),
    }


def _recording(monkeypatch, op) -> list[int]:
    """Calls of op's function made directly by ops.call (the op's own dispatch holds the original function)."""
    fn, mutated = ops._FUNCTIONS[op]
    direct: list[int] = []

    def recorded(*args):
        direct.append(1)
        return fn(*args)

    monkeypatch.setitem(ops._FUNCTIONS, op, (recorded, mutated))
    return direct


@pytest.mark.parametrize("backend", sorted({c.backend for c in CPU_CASES}))
@pytest.mark.parametrize("name", ["gram", "combine", "row_norms", "ema_row_norms", "perturb"])
def test_a_plain_eager_call_runs_the_function_with_the_ops_results_and_version_bumps(monkeypatch, name, backend):
    """The custom op's Python dispatch costs as much host time as a GPU step at N = 1e7, so a plain eager call
    skips it: the same bits, and every tensor written gets a new version (autograd's check on saved tensors),
    as the op's dispatch gives it."""
    op, run = _calls()[name]
    direct = _recording(monkeypatch, op)
    with flatmtl_fast.use_backend(backend):
        with torch.autograd.profiler.profile():  # a profile names the op: the call goes through it
            through_op = run()
        assert direct == []
        fast = run()
    assert direct == [1]
    assert all(torch.equal(a, b) for a, b in zip(fast, through_op, strict=True))
    written = fast[:-1]  # the buffers the op mutates (combine's out, the EMA buffer, perturb's out)
    assert all(t._version > 0 for t in written), [t._version for t in written]


def test_calls_that_something_else_must_see_go_through_the_op(monkeypatch):
    """A dispatch mode (here: counting), the profiler and torch.compile see the op, never the raw kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    direct = _recording(monkeypatch, ops.gram_op)
    G = torch.randn(3, 50)
    with Seen() as seen:
        flatmtl_fast.gram(G)
    assert "flatmtl.gram.default" in seen.ops
    with torch.autograd.profiler.profile() as profile:
        flatmtl_fast.gram(G)
    assert "flatmtl::gram" in [event.name for event in profile.function_events]
    torch._dynamo.reset()
    torch.compile(lambda G: flatmtl_fast.gram(G), fullgraph=True, backend="aot_eager")(G)
    assert direct == []
    flatmtl_fast.gram(G)
    assert direct == [1]


def test_the_ops_check_the_real_tensors_a_compiled_graph_runs_on():
    """Tracing sees fake tensors, without addresses: an out that overlaps G is refused when the graph runs."""
    torch._dynamo.reset()
    memory = torch.randn(4 * 500 + 1)
    G, out = memory[:2000].view(4, 500), memory[1:501]
    compiled = torch.compile(lambda w, G, out: flatmtl_fast.combine(w, G, out=out), backend="eager", fullgraph=True)
    with pytest.raises(ValueError, match="combine: out overlaps G in memory"):
        compiled(torch.ones(4), G, out)
    base = torch.randn(300)
    with pytest.raises(ValueError, match="perturb: out partly overlaps base"):
        torch.compile(lambda b, d, s, o: flatmtl_fast.perturb(b, d, s, out=o), backend="eager")(
            base[:200], torch.randn(200), torch.ones(1), base[1:201]
        )


def test_an_exported_graph_or_a_direct_op_call_is_checked():
    class Gram(torch.nn.Module):
        def forward(self, G: torch.Tensor) -> torch.Tensor:
            return flatmtl_fast.gram(G, dtype=torch.float64)

    program = torch.export.export(Gram(), (torch.randn(3, 10),)).module()
    torch.testing.assert_close(program(torch.randn(3, 10)).shape, torch.Size([3, 3]))
    for strided in (torch.randn(3, 20)[:, ::2], torch.randn(10, 3).t()):  # same shape, rows not contiguous
        with pytest.raises(ValueError, match="gram: the rows of G must be contiguous"):
            program(strided)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run gram here"):
        torch.ops.flatmtl.gram(torch.randn(3, 4), torch.float64, "cuda")
    with pytest.raises(ValueError, match="combine: w must have shape"):
        torch.ops.flatmtl.combine_(torch.ones(2), torch.randn(3, 4), torch.empty(4), False, 1.0, "reference")
