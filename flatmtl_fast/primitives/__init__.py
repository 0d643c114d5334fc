"""Layer 2: the streaming primitives over the K × N gradient matrix, one dispatch point each."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import current_backend, resolve
from . import checks
from .ops import call, combine_op, ema_row_norms_op, gram_op, implementations, perturb_op, row_norms_op

__all__ = ["MAX_K", "check_runnable", "combine", "ema_row_norms", "gram", "perturb", "row_norms"]

MAX_K = checks.MAX_K


@torch.compiler.assume_constant_result
def _backend_for(op: str, device: torch.device, *dtypes: torch.dtype) -> str:
    # Evaluated eagerly while torch.compile traces: the backend in force then is baked into the graph.
    # ``dtypes``: every element type the kernel reads or writes (the backend must handle them all).
    return resolve(op, implementations(), device, *dtypes).name


def check_runnable(op: str, device: torch.device, *dtypes: torch.dtype) -> None:
    """Raise now, as ``op`` would, if the backend in force cannot run ``op`` on ``device`` tensors of these dtypes
    (every one it reads or writes): an aggregator asks before it advances its state, so a refused call leaves it
    as it was. Under ``auto`` nothing can be refused (the reference backend runs every dtype the checks let through),
    so only an explicit backend is asked."""
    if torch.compiler.is_compiling() or current_backend() != "auto":  # Dynamo cannot trace the ContextVar read
        _backend_for(op, device, *dtypes)


def gram(G: Tensor, *, dtype: torch.dtype = torch.float32, check_finite: bool = False) -> Tensor:
    """The Gram matrix M = G Gᵀ (K × K) of the per-task gradients G (K × N).

    G may be float32, bfloat16 or float16, with contiguous rows (a column slice of a larger buffer
    is fine), K ≤ ``MAX_K``. Products and per-tile sums in float32 (16-bit inputs are widened
    exactly), sums across tiles in float64 in a fixed order: deterministic, and exactly symmetric.
    The result is float32 or float64 (``dtype``). A float64 G (a float64 model) is served by the reference
    backend, every product and sum in float64; so are this module's other functions.

    Non-finite values are not checked by default (that would synchronise with the device): a
    NaN/Inf in row i of G makes M[i, i] non-finite. ``check_finite=True`` raises
    ``FloatingPointError`` naming those rows instead (one host synchronisation).
    """
    K, N, _ = checks.check_G(G, "gram", no_columns=True)
    dtype = checks.check_gram_dtype(dtype)
    check_finite = checks.check_flag(check_finite, "gram", "check_finite")
    if N == 0:
        return torch.zeros(K, K, dtype=dtype, device=G.device)
    out = call(gram_op, G, dtype, _backend_for("gram", G.device, G.dtype))
    if check_finite:
        bad = (~torch.isfinite(out.diagonal())).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"gram: rows {bad} of G contain NaN or Inf (or overflow float32 when squared)")
    return out


def combine(w: Tensor, G: Tensor, *, out: Tensor | None = None, accumulate: bool = False, alpha: float = 1.0) -> Tensor:
    """d = alpha · wᵀG, the weighted sum of the rows of G (K × N) — written into ``out`` if given.

    ``w`` has shape (K,) on G's device (a device tensor: no host synchronisation), any floating dtype, rounded
    to float32 (a float64 ``w``, as the solvers return, is read as it is and rounded in the kernel; for a float64
    G it is kept, and the arithmetic is float64). ``out`` may be
    a contiguous view into a flat ``.grad`` buffer; with ``accumulate=True`` the result is added
    to it (out += alpha · wᵀG). The result has out's dtype (or G's when out is None); arithmetic
    in float32 (float64 for a float64 G) with one rounding to that dtype. NaN/Inf in w or G propagate into the affected
    entries, as in ``w @ G``.
    """
    _, N, _ = checks.check_G(G, "combine", no_columns=True)
    w = checks.check_weights(w, G)
    alpha = checks.check_alpha(alpha)
    accumulate = checks.check_flag(accumulate, "combine", "accumulate")
    if out is None:
        if accumulate:
            raise ValueError("combine: accumulate=True needs an out buffer to accumulate into")
        out = torch.empty(N, dtype=G.dtype, device=G.device)
    else:
        out = checks.check_out(out, G, w)
    if N == 0:
        return out
    call(combine_op, w, G, out, accumulate, alpha, _backend_for("combine", G.device, G.dtype, out.dtype))
    return out


def row_norms(G: Tensor, *, weight: Tensor | None = None) -> Tensor:
    """The (K,) float64 norms ‖weight ⊙ g_i‖₂ of the rows g_i of G (K × N); ``weight=None`` means all ones.

    ASAM passes ``weight=θ`` (the flat parameters: T = |θ|, the sign does not matter as it is
    squared). G as for :func:`gram` (float32, bfloat16 or float16, contiguous rows, K ≤ ``MAX_K``);
    ``weight`` has N contiguous entries of its own dtype (float32, bfloat16 or float16) on G's
    device and is read as a constant. Products and per-tile sums of squares in float32 (16-bit
    inputs widened exactly), sums across tiles in float64 in a fixed order, then the square root:
    deterministic and independent of the thread count. A NaN/Inf in row i (or in ``weight``) makes
    entry i (or every entry) non-finite, as does a weighted value whose square overflows float32.
    """
    K, N, _ = checks.check_G(G, "row_norms", no_columns=True)
    weight = checks.check_row_weight(weight, G)
    if N == 0:
        return torch.zeros(K, dtype=torch.float64, device=G.device)
    dtypes = (G.dtype,) if weight is None else (G.dtype, weight.dtype)
    return call(row_norms_op, G, weight, _backend_for("row_norms", G.device, *dtypes))


def ema_row_norms(buffer: Tensor, G: Tensor, *, decay: float | Tensor, gain: Tensor) -> Tensor:
    """DB-MTL's EMA step and the norms it needs, in one pass: ``buffer`` ← decay · buffer + gain ⊙ G (row i
    scaled by gain_i) in place, then the (K,) float64 norms ‖buffer_i‖₂ of the updated rows.

    ``buffer``: the EMA state, float32 of G's shape with contiguous rows, not overlapping G. G as for
    :func:`gram` (float32, bfloat16 or float16). ``decay``: a real in [0, 1], or a 1-element tensor on G's
    device (not range-checked: that would synchronise), which the kernel reads there — so a step captured in a
    CUDA graph replays with the decay the tensor holds at each replay. ``gain``: (K,) float32 on G's device,
    read by the kernel too (DB-MTL passes (1 − decay) / L_i). Each entry is updated in float32 (decay rounded to
    float32; two products and a sum, or a fused multiply-add), so it is within 3 · 2⁻²⁴ (|decay · b| + |gain_i g|)
    of the exact update; the norms are of the stored entries, summed as :func:`row_norms` sums. NaN/Inf in G or
    gain propagate into the affected entries and norms; a NaN/Inf entry of the buffer restarts from 0 (buffer ←
    gain ⊙ G there), so one overflowed step (skipped by a GradScaler) does not poison the EMA for good.
    """
    K, N, _ = checks.check_G(G, "ema_row_norms", no_columns=True)
    decay, gain = checks.check_ema(buffer, G, decay, gain)
    if N == 0:
        return torch.zeros(K, dtype=torch.float64, device=G.device)
    backend = _backend_for("ema_row_norms", G.device, G.dtype, buffer.dtype)
    return call(ema_row_norms_op, buffer, G, decay, gain, backend)


def perturb(base: Tensor, direction: Tensor, scale: Tensor, *, out: Tensor, adaptive: bool = False) -> Tensor:
    """out = base + scale · (base² ⊙ direction if ``adaptive`` else direction), element-wise; returns ``out``.

    SAM/ASAM's step to the perturbed weights θ + ε_i, with ε_i = ρ T² ⊙ g_i / ‖T ⊙ g_i‖ (T = |θ|
    if adaptive, else 1): pass ``base`` = a saved copy of θ, ``direction`` = g_i (a row of G: any G
    dtype, e.g. ``G[i]``), ``scale`` = ρ / ‖T ⊙ g_i‖ (see :func:`row_norms`) and ``out`` = the live
    flat parameters. Restoring is a plain ``out.copy_(base)``, which is exact.

    ``base`` and ``out`` are (N,) contiguous, of one dtype (float32, bfloat16 or float16); ``out``
    may be ``base`` itself (in place) or a disjoint buffer that does not require grad. ``scale`` is a
    1-element float32/float64 tensor on base's device, read by the kernel (no host synchronisation,
    so a step can be captured in a CUDA graph). Arithmetic in float32, one rounding to out's dtype.
    """
    base, direction, scale = checks.check_perturb(base, direction, scale, out, no_columns=True)
    adaptive = checks.check_flag(adaptive, "perturb", "adaptive")
    if base.numel() == 0:
        return out
    backend = _backend_for("perturb", base.device, base.dtype, direction.dtype)
    call(perturb_op, base, direction, scale, out, adaptive, backend)
    return out
