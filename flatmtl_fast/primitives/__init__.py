"""Layer 2: the streaming primitives over the K × N gradient matrix, one dispatch point each."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve
from . import checks
from .ops import combine_op, gram_op, implementations

__all__ = ["MAX_K", "combine", "gram"]

MAX_K = checks.MAX_K


@torch.compiler.assume_constant_result
def _backend_for(op: str, device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    # Evaluated eagerly while torch.compile traces: the backend in force then is baked into the graph.
    return resolve(op, implementations(), device, dtype, *(() if op == "gram" else (out_dtype,))).name


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
    checks.check_G(G, "gram")
    dtype = checks.check_gram_dtype(dtype)
    out = gram_op(G, dtype, _backend_for("gram", G.device, G.dtype, dtype))
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
    _, N, _ = checks.check_G(G, "combine")
    w32 = checks.check_weights(w, G)
    alpha = checks.check_alpha(alpha)
    if out is None:
        if accumulate:
            raise ValueError("combine: accumulate=True needs an out buffer to accumulate into")
        out = torch.empty(N, dtype=G.dtype, device=G.device)
    else:
        out = checks.check_out(out, G, w)
    combine_op(w32, G, out, accumulate, alpha, _backend_for("combine", G.device, G.dtype, out.dtype))
    return out
