"""Argument checks of the streaming primitives: every bad input raises before a kernel runs."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

#: Largest number of tasks the streaming kernels accept.
MAX_K = 1024
#: Element types of G (and of ``out``) that every backend reads.
G_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAM_OUT_DTYPES = (torch.float32, torch.float64)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_G(G: object, op: str) -> tuple[int, int, int]:
    """Validate the gradient matrix; return (K, N, row_stride).

    Rows must be contiguous (stride 1 along N) but may be spaced apart (row stride ≥ N), so a
    column slice ``G[:, a:b]`` of a larger buffer is accepted without a copy.
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"{op}: G must be a torch.Tensor of shape (K, N), got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{op}: G must have shape (K, N) (one row per task), got shape {tuple(G.shape)}")
    K, N = G.shape
    if K == 0 or N == 0:
        raise ValueError(f"{op}: G is empty (shape {tuple(G.shape)}); it needs K ≥ 1 rows and N ≥ 1 columns")
    if G.dtype not in G_DTYPES:
        raise TypeError(f"{op}: G must have dtype {_names(G_DTYPES)}, got {G.dtype}")
    if K > MAX_K:
        raise ValueError(f"{op}: G has K = {K} rows; the kernels support at most K = {MAX_K} tasks")
    if G.requires_grad:
        raise ValueError(
            f"{op}: G requires grad, but {op} is not differentiable (it consumes gradients); pass G.detach()"
        )
    if N > 1 and G.stride(1) != 1:
        raise ValueError(
            f"{op}: the rows of G must be contiguous (stride 1 along N), got strides {G.stride()}; pass G.contiguous()"
        )
    row_stride = G.stride(0) if K > 1 else N
    if row_stride < N:
        raise ValueError(
            f"{op}: the rows of G overlap (row stride {row_stride} < N = {N}, e.g. an expanded tensor); "
            "pass G.contiguous()"
        )
    return K, N, row_stride


def check_gram_dtype(dtype: object) -> torch.dtype:
    if dtype not in GRAM_OUT_DTYPES:
        raise TypeError(f"gram: dtype must be {_names(GRAM_OUT_DTYPES)}, got {dtype}")
    return dtype  # type: ignore[return-value]


def check_weights(w: object, G: Tensor) -> Tensor:
    """Validate ``w`` (shape (K,), floating, on G's device); return it as contiguous float32."""
    K = G.shape[0]
    if not isinstance(w, Tensor):
        raise TypeError(f"combine: w must be a torch.Tensor of shape ({K},), got {type(w).__name__}")
    if w.shape != (K,):
        raise ValueError(f"combine: w must have shape ({K},) (one weight per row of G), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"combine: w must be a floating tensor, got dtype {w.dtype}")
    if w.device != G.device:
        raise ValueError(f"combine: w is on {w.device} but G is on {G.device}; they must be on the same device")
    return w.detach().to(torch.float32).contiguous()


def _byte_range(t: Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (conservative for strided views).

    Not checkable while torch.compile traces (fake tensors have no addresses): assumed disjoint.
    """
    if torch.compiler.is_compiling():
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def check_out(out: object, G: Tensor, w: Tensor) -> Tensor:
    """Validate the caller's output buffer of combine (a flat ``.grad`` view, typically)."""
    N = G.shape[1]
    if not isinstance(out, Tensor):
        raise TypeError(f"combine: out must be a torch.Tensor of shape ({N},), got {type(out).__name__}")
    if out.shape != (N,):
        raise ValueError(f"combine: out must have shape ({N},) (one entry per column of G), got {tuple(out.shape)}")
    if out.dtype not in G_DTYPES:
        raise TypeError(f"combine: out must have dtype {_names(G_DTYPES)}, got {out.dtype}")
    if out.device != G.device:
        raise ValueError(f"combine: out is on {out.device} but G is on {G.device}; they must be on the same device")
    if N > 1 and out.stride(0) != 1:
        raise ValueError(f"combine: out must be contiguous (stride 1), got stride {out.stride()}")
    if out.requires_grad:
        raise ValueError(
            "combine: out requires grad; writing into it in place would bypass autograd (pass a buffer "
            "that does not require grad, e.g. a .grad tensor)"
        )
    if overlaps(out, G):
        raise ValueError("combine: out overlaps G in memory; the result would overwrite its own input")
    if overlaps(out, w):
        raise ValueError("combine: out overlaps w in memory")
    return out


def check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"combine: alpha must be a real number, got {type(alpha).__name__}")
    return float(alpha)
