"""The primitives as ``torch.library`` custom ops, so they run under ``torch.compile`` (as opaque
nodes, no graph break) and in CUDA graphs. The backend is chosen before the op is called (it is a
plain string argument), so tracing never depends on Python state inside the op.

Called through :func:`call`, a plain eager call (no tracing, plain tensors autograd does not track) runs the
op's function directly: the custom op's Python dispatch costs ~40 µs a call on a 2-core CPU, which on a GPU
is host time of the order of a whole fused step at N = 1e7."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..backends import require
from . import checks
from .native import CppPrimitives, CudaPrimitives
from .reference import ReferencePrimitives


@functools.cache
def implementations() -> dict[str, object]:
    """Backend name -> implementation of the primitives (Triton only when it imports)."""
    impls: dict[str, object] = {
        "reference": ReferencePrimitives(),
        "cpp": CppPrimitives(),
        "cuda": CudaPrimitives(),
    }
    try:  # Triton is optional; the backend registry reports it as unavailable when missing
        from .triton_kernels import TritonPrimitives
    except ImportError:
        return impls
    impls["triton"] = TritonPrimitives()
    return impls


def row_stride(G: Tensor) -> int:
    return G.stride(0) if G.shape[0] > 1 else G.shape[1]


# custom op -> (its function, the positions of the arguments it writes)
_FUNCTIONS: dict[object, tuple[Callable[..., object], tuple[int, ...]]] = {}


def _custom_op(name: str, *mutated: str, check: Callable[..., object]) -> Callable[[Callable[..., object]], object]:
    """torch.library.custom_op(name, mutates_args=mutated), remembering the function for :func:`call`.

    The op itself runs ``check`` on its arguments first: a call that reaches it through the dispatcher (a graph
    compiled or exported with fake tensors, whose layout and addresses the wrappers could not see; a direct
    ``torch.ops.flatmtl`` call) is refused as the wrappers refuse it, and so is a backend baked into the graph that
    cannot run these tensors. The plain eager path has been checked by the wrapper and runs ``fn`` alone."""

    def register(fn: Callable[..., object]) -> object:
        @functools.wraps(fn)
        def checked(*args: object) -> object:
            check(*args)
            return fn(*args)

        op = torch.library.custom_op(name, mutates_args=mutated)(checked)
        names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        _FUNCTIONS[op] = (fn, tuple(names.index(m) for m in mutated))
        return op

    return register


def _backend(name: str, op: str, device: torch.device, *dtypes: torch.dtype) -> None:
    require(name, op, implementations(), device, *dtypes)


def _check_gram(G: Tensor, out_dtype: torch.dtype, backend: str) -> None:
    checks.check_G(G, "gram")
    _backend(backend, "gram", G.device, G.dtype)


def _check_combine(w: Tensor, G: Tensor, out: Tensor, accumulate: bool, alpha: float, backend: str) -> None:
    checks.check_G(G, "combine")
    checks.check_out(out, G, checks.check_weights(w, G))
    _backend(backend, "combine", G.device, G.dtype, out.dtype)


def _check_row_norms(G: Tensor, weight: Tensor | None, backend: str) -> None:
    checks.check_G(G, "row_norms")
    checks.check_row_weight(weight, G)
    _backend(backend, "row_norms", G.device, G.dtype, *(() if weight is None else (weight.dtype,)))


def _check_ema(buffer: Tensor, G: Tensor, decay: Tensor, gain: Tensor, backend: str) -> None:
    checks.check_G(G, "ema_row_norms")
    checks.check_ema(buffer, G, decay, gain)
    _backend(backend, "ema_row_norms", G.device, G.dtype, buffer.dtype)


def _check_perturb(base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool, backend: str) -> None:
    checks.check_perturb(base, direction, scale, out)
    _backend(backend, "perturb", base.device, base.dtype, direction.dtype)


def _plain_eager(args: tuple) -> bool:
    """Whether nothing but the op's function itself needs to see this call: no torch.compile, export, fake or
    functional tracing, no dispatch or function mode, no vmap, no profiler (whose traces name the op), and plain
    tensors that autograd does not track."""
    if (
        torch.compiler.is_compiling()
        or torch._C._autograd._profiler_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    tracked = torch.is_grad_enabled()
    tensors = [a for a in args if isinstance(a, Tensor)]
    return all(type(t) in (Tensor, torch.nn.Parameter) and not (tracked and t.requires_grad) for t in tensors)


def call(op: object, *args: object) -> object:
    """``op(*args)`` for one of this module's custom ops; in a plain eager call (:func:`_plain_eager`) its function
    runs directly, and the tensors it writes get the version bump the op's dispatch would give them."""
    if not _plain_eager(args):
        return op(*args)
    fn, mutated = _FUNCTIONS[op]
    result = fn(*args)
    for position in mutated:
        torch.autograd.graph.increment_version(args[position])
    return result


@_custom_op("flatmtl::gram", check=_check_gram)
def gram_op(G: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    """M = G Gᵀ with backend ``backend`` (arguments already validated by flatmtl_fast.gram)."""
    out = torch.empty(G.shape[0], G.shape[0], dtype=out_dtype, device=G.device)
    implementations()[backend].gram(G, row_stride(G), out)
    return out


@gram_op.register_fake
def _gram_fake(G: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    return G.new_empty((G.shape[0], G.shape[0]), dtype=out_dtype)


@_custom_op("flatmtl::combine_", "out", check=_check_combine)
def combine_op(w: Tensor, G: Tensor, out: Tensor, accumulate: bool, alpha: float, backend: str) -> None:
    """out (+)= alpha · wᵀG with backend ``backend`` (w float32 or float64, which the backend rounds to float32
    unless G is float64; validated by flatmtl_fast.combine)."""
    implementations()[backend].combine(w, G, row_stride(G), out, accumulate, alpha)


@combine_op.register_fake
def _combine_fake(w: Tensor, G: Tensor, out: Tensor, accumulate: bool, alpha: float, backend: str) -> None:
    return None


@_custom_op("flatmtl::row_norms", check=_check_row_norms)
def row_norms_op(G: Tensor, weight: Tensor | None, backend: str) -> Tensor:
    """(K,) float64 ‖weight ⊙ g_i‖ with backend ``backend`` (validated by flatmtl_fast.row_norms)."""
    out = torch.empty(G.shape[0], dtype=torch.float64, device=G.device)
    implementations()[backend].row_norms(G, row_stride(G), weight, out)
    return out


@row_norms_op.register_fake
def _row_norms_fake(G: Tensor, weight: Tensor | None, backend: str) -> Tensor:
    return G.new_empty((G.shape[0],), dtype=torch.float64)


@_custom_op("flatmtl::ema_row_norms_", "buffer", check=_check_ema)
def ema_row_norms_op(buffer: Tensor, G: Tensor, decay: Tensor, gain: Tensor, backend: str) -> Tensor:
    """buffer = decay · buffer + gain ⊙ G in place (decay of shape (1,) float32), then its (K,) float64 row
    norms, with backend ``backend`` (validated by flatmtl_fast.ema_row_norms)."""
    out = torch.empty(G.shape[0], dtype=torch.float64, device=G.device)
    implementations()[backend].ema_row_norms(buffer, row_stride(buffer), G, row_stride(G), decay, gain, out)
    return out


@ema_row_norms_op.register_fake
def _ema_row_norms_fake(buffer: Tensor, G: Tensor, decay: Tensor, gain: Tensor, backend: str) -> Tensor:
    return G.new_empty((G.shape[0],), dtype=torch.float64)


@_custom_op("flatmtl::perturb_", "out", check=_check_perturb)
def perturb_op(base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool, backend: str) -> None:
    """out = base + scale · (base² ⊙ direction if adaptive else direction) with backend ``backend``
    (scale of shape (1,); validated by flatmtl_fast.perturb; out may be base itself)."""
    implementations()[backend].perturb(base, direction, scale, out, adaptive)


@perturb_op.register_fake
def _perturb_fake(base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool, backend: str) -> None:
    return None
