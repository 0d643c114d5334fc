"""Layer 2: the streaming primitives over the K × N gradient matrix, one dispatch point each."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..backends import resolve
from . import checks
from .native import CppPrimitives, CudaPrimitives
from .reference import ReferencePrimitives

__all__ = ["MAX_K", "combine", "gram"]

MAX_K = checks.MAX_K


@functools.cache
def _implementations() -> dict[str, object]:
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


def gram(G: Tensor, *, dtype: torch.dtype = torch.float32, check_finite: bool = False) -> Tensor:
    """The Gram matrix M = G Gᵀ (K × K) of the per-task gradients G (K × N).

    G may be float32, bfloat16 or float16, with contiguous rows (a column slice of a larger buffer
    is fine), K ≤ ``MAX_K``. Products and per-tile sums in float32 (16-bit inputs are widened
    exactly), sums across tiles in float64 in a fixed order: deterministic, and exactly symmetric.
    The result is float32 or float64 (``dtype``).

    Non-finite values are not checked by default (that would synchronise with the device): a
    NaN/Inf in row i of G makes M[i, i] non-finite. ``check_finite=True`` raises
    ``FloatingPointError`` naming those rows instead (one host synchronisation).
    """
    K, _, row_stride = checks.check_G(G, "gram")
    dtype = checks.check_gram_dtype(dtype)
    impl = resolve("gram", _implementations(), G.device, G.dtype)
    out = torch.empty(K, K, dtype=dtype, device=G.device)
    impl.gram(G, row_stride, out)
    if check_finite:
        bad = (~torch.isfinite(out.diagonal())).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"gram: rows {bad} of G contain NaN or Inf (or overflow float32 when squared)")
    return out


def combine(w: Tensor, G: Tensor, *, out: Tensor | None = None, accumulate: bool = False, alpha: float = 1.0) -> Tensor:
    """d = alpha · wᵀG, the weighted sum of the rows of G (K × N) — written into ``out`` if given.

    ``w`` has shape (K,) on G's device (a device tensor: no host synchronisation). ``out`` may be
    a contiguous view into a flat ``.grad`` buffer; with ``accumulate=True`` the result is added
    to it (out += alpha · wᵀG). The result has out's dtype (or G's when out is None); arithmetic
    in float32 with one rounding to that dtype. NaN/Inf in w or G propagate into the affected
    entries, as in ``w @ G``.
    """
    _, N, row_stride = checks.check_G(G, "combine")
    w32 = checks.check_weights(w, G)
    alpha = checks.check_alpha(alpha)
    if out is None:
        if accumulate:
            raise ValueError("combine: accumulate=True needs an out buffer to accumulate into")
        out = torch.empty(N, dtype=G.dtype, device=G.device)
    else:
        out = checks.check_out(out, G, w)
    impl = resolve("combine", _implementations(), G.device, G.dtype, out.dtype)
    impl.combine(w32, G, row_stride, out, accumulate, alpha)
    return out
