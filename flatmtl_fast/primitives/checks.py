"""Argument checks of the streaming primitives: every bad input raises before a kernel runs."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .._memory import overlaps

#: Largest number of tasks the streaming kernels accept.
MAX_K = 1024
#: Element types the streaming kernels read and write (the cpp backend: float32 and bfloat16).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Element types of G and of the vectors beside it: float64 too (a float64 model), which the reference backend
#: serves, in float64 throughout (``auto`` picks it for them).
G_DTYPES = (*KERNEL_DTYPES, torch.float64)
GRAM_OUT_DTYPES = (torch.float32, torch.float64)
#: Element types of perturb's scale (one element, read on the device by the kernel).
SCALE_DTYPES = (torch.float32, torch.float64)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_G(G: object, op: str, *, no_columns: bool = False) -> tuple[int, int, int]:
    """Validate the gradient matrix; return (K, N, row_stride).

    Rows must be contiguous (stride 1 along N) but may be spaced apart (row stride ≥ N), so a
    column slice ``G[:, a:b]`` of a larger buffer is accepted without a copy. ``no_columns``: N = 0 is
    accepted (the public functions answer it without a kernel: a rank's empty shard of the parameters).
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"{op}: G must be a torch.Tensor of shape (K, N), got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{op}: G must have shape (K, N) (one row per task), got shape {tuple(G.shape)}")
    K, N = G.shape
    if K == 0 or (N == 0 and not no_columns):
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
    """Validate ``w`` (shape (K,), floating, on G's device, not requiring grad); return it contiguous, as float64
    when it is (the backends round it to float32 as they read it, unless G is float64: the solvers' float64 weights
    need no conversion op, a launch on a GPU) and float32 otherwise."""
    K = G.shape[0]
    if not isinstance(w, Tensor):
        raise TypeError(f"combine: w must be a torch.Tensor of shape ({K},), got {type(w).__name__}")
    if w.shape != (K,):
        raise ValueError(f"combine: w must have shape ({K},) (one weight per row of G), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"combine: w must be a floating tensor, got dtype {w.dtype}")
    if w.device != G.device:
        raise ValueError(f"combine: w is on {w.device} but G is on {G.device}; they must be on the same device")
    if w.requires_grad:  # as G: a gradient through w would silently be zero
        raise ValueError("combine: w requires grad, but combine is not differentiable; pass w.detach()")
    return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).contiguous()


def check_vector(x: object, name: str, op: str, N: int, like: Tensor, like_name: str, meaning: str) -> Tensor:
    """Validate a contiguous (N,) vector of a G dtype on ``like``'s device (``meaning`` says what N counts)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape ({N},), got {type(x).__name__}")
    if x.shape != (N,):
        raise ValueError(f"{op}: {name} must have shape ({N},) ({meaning}), got shape {tuple(x.shape)}")
    if x.dtype not in G_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype {_names(G_DTYPES)}, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(
            f"{op}: {name} is on {x.device} but {like_name} is on {like.device}; they must be on the same device"
        )
    if N > 1 and x.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous (stride 1), got stride {x.stride()}")
    return x


def _check_writable(out: Tensor, op: str, name: str = "out") -> None:
    # Torch refuses in-place writes there too. (Not seen while torch.compile traces: the op checks at run time.)
    if not torch.compiler.is_compiling() and out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{op}: {name} is an inference tensor (made under torch.inference_mode), which may only be written "
            "inside inference mode"
        )
    if out.requires_grad:
        raise ValueError(
            f"{op}: {name} requires grad; writing into it in place would bypass autograd (pass a buffer "
            "that does not require grad, e.g. a .grad tensor or FlatParameters.data)"
        )


def check_out(out: object, G: Tensor, w: Tensor | None = None, op: str = "combine") -> Tensor:
    """Validate the caller's output buffer of combine or of an aggregator (a flat ``.grad`` view, typically);
    aggregators check it before they advance any state."""
    out = check_vector(out, "out", op, G.shape[1], G, "G", "one entry per column of G")
    _check_writable(out, op)
    if overlaps(out, G):
        raise ValueError(f"{op}: out overlaps G in memory; the result would overwrite its own input")
    if w is not None and overlaps(out, w):
        raise ValueError(f"{op}: out overlaps w in memory")
    return out


def check_row_weight(weight: object, G: Tensor) -> Tensor | None:
    """Validate row_norms' element-wise weight (None, or (N,) of a G dtype on G's device); return it detached.

    The weight is read as a constant (ASAM passes the parameters θ, which may require grad)."""
    if weight is None:
        return None
    N = G.shape[1]
    return check_vector(weight, "weight", "row_norms", N, G, "G", "one entry per column of G").detach()


def check_perturb(
    base: object, direction: object, scale: object, out: object, *, no_columns: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate perturb's arguments; return (base, direction, scale) detached, scale with shape (1,).

    ``out`` may be ``base`` itself (the update is element-wise) but must not partly overlap it, nor
    overlap ``direction`` or ``scale``. ``no_columns``: N = 0 is accepted, as in :func:`check_G`."""
    if not isinstance(base, Tensor) or base.dim() != 1:
        got = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
        raise ValueError(f"perturb: base must be a torch.Tensor of shape (N,) (the parameters), got {got}")
    if base.numel() == 0 and not no_columns:
        raise ValueError("perturb: base is empty; the kernels need N ≥ 1 parameters")
    N = base.shape[0]
    meaning = "one entry per parameter, like base"
    base = check_vector(base, "base", "perturb", N, base, "base", meaning)
    direction = check_vector(direction, "direction", "perturb", N, base, "base", meaning)
    out = check_vector(out, "out", "perturb", N, base, "base", meaning)
    if out.dtype != base.dtype:
        raise TypeError(f"perturb: out must have base's dtype {base.dtype}, got {out.dtype}")
    if direction.requires_grad:
        raise ValueError(
            "perturb: direction requires grad, but perturb is not differentiable (it consumes gradients); "
            "pass direction.detach()"
        )
    _check_writable(out, "perturb")
    if not isinstance(scale, Tensor):
        raise TypeError(
            f"perturb: scale must be a 1-element torch.Tensor on base's device (read there by the kernel, "
            f"no host synchronisation), got {type(scale).__name__}"
        )
    if scale.numel() != 1:
        raise ValueError(f"perturb: scale must have exactly 1 element, got shape {tuple(scale.shape)}")
    if scale.dtype not in SCALE_DTYPES:
        raise TypeError(f"perturb: scale must have dtype {_names(SCALE_DTYPES)}, got {scale.dtype}")
    if scale.device != base.device:
        raise ValueError(
            f"perturb: scale is on {scale.device} but base is on {base.device}; it must be on base's device "
            "(the kernel reads it there, without a host synchronisation)"
        )
    if overlaps(out, base) and out.data_ptr() != base.data_ptr():
        raise ValueError(
            "perturb: out partly overlaps base in memory; pass base itself (in place) or a disjoint buffer"
        )
    if overlaps(out, direction):
        raise ValueError("perturb: out overlaps direction in memory; the result would overwrite its own input")
    if overlaps(out, scale):
        raise ValueError("perturb: out overlaps scale in memory")
    return base.detach(), direction, scale.detach().reshape(1)


def check_ema(buffer: object, G: Tensor, decay: object, gain: object) -> tuple[Tensor, Tensor]:
    """Validate ema_row_norms' buffer (float32, G's shape, contiguous rows, disjoint from G), decay (a real in
    [0, 1], or a 1-element floating tensor on G's device) and gain ((K,) float32 on G's device, not overlapping
    the buffer); return (decay as a (1,) float32 tensor on G's device, gain detached)."""
    op = "ema_row_norms"
    K, N = G.shape
    if not isinstance(buffer, Tensor):
        raise TypeError(f"{op}: buffer must be a torch.Tensor of shape ({K}, {N}), got {type(buffer).__name__}")
    if buffer.shape != G.shape:
        raise ValueError(f"{op}: buffer must have G's shape ({K}, {N}), got shape {tuple(buffer.shape)}")
    if buffer.dtype != torch.float32:
        raise TypeError(f"{op}: buffer must have dtype float32 (the EMA's state), got {buffer.dtype}")
    if buffer.device != G.device:
        raise ValueError(f"{op}: buffer is on {buffer.device} but G is on {G.device}; they must be on the same device")
    if (N > 1 and buffer.stride(1) != 1) or (K > 1 and buffer.stride(0) < N):
        raise ValueError(f"{op}: the rows of buffer must be contiguous and disjoint, got strides {buffer.stride()}")
    _check_writable(buffer, op, "buffer")
    if overlaps(buffer, G):
        raise ValueError(f"{op}: buffer overlaps G in memory")
    decay = _check_decay(decay, G, op)
    if not isinstance(gain, Tensor):
        raise TypeError(f"{op}: gain must be a torch.Tensor of shape ({K},), got {type(gain).__name__}")
    if gain.shape != (K,):
        raise ValueError(f"{op}: gain must have shape ({K},) (one factor per row of G), got shape {tuple(gain.shape)}")
    if gain.dtype != torch.float32:
        raise TypeError(f"{op}: gain must have dtype float32, got {gain.dtype}")
    if gain.device != G.device:
        raise ValueError(
            f"{op}: gain is on {gain.device} but G is on {G.device}; it must be on G's device "
            "(the kernel reads it there, without a host synchronisation)"
        )
    if K > 1 and gain.stride(0) != 1:
        raise ValueError(f"{op}: gain must be contiguous (stride 1), got stride {gain.stride()}")
    if overlaps(buffer, gain):
        raise ValueError(f"{op}: buffer overlaps gain in memory")
    if overlaps(buffer, decay):
        raise ValueError(f"{op}: buffer overlaps decay in memory")
    return decay, gain.detach()


def _check_decay(decay: object, G: Tensor, op: str) -> Tensor:
    """A Python real in [0, 1] becomes a device fill (no host-to-device copy); a tensor stays on the device,
    where its range cannot be checked without a synchronisation."""
    if isinstance(decay, Tensor):
        if decay.numel() != 1 or not decay.is_floating_point():
            raise ValueError(f"{op}: a decay tensor must be 1 floating-point element, got {decay.dtype} of shape "
                             f"{tuple(decay.shape)}")  # fmt: skip
        if decay.device != G.device:
            raise ValueError(
                f"{op}: decay is on {decay.device} but G is on {G.device}; it must be on G's device "
                "(the kernel reads it there, without a host synchronisation)"
            )
        return decay.detach().reshape(1).to(torch.float32)
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        got = type(decay).__name__
        raise TypeError(f"{op}: decay must be a real number in [0, 1] or a 1-element tensor, got {got}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{op}: decay must be a real number in [0, 1], got {decay!r}")
    return torch.full((1,), float(decay), dtype=torch.float32, device=G.device)


def check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"combine: alpha must be a real number, got {type(alpha).__name__}")
    return float(alpha)


def check_flag(value: object, op: str, name: str) -> bool:
    """True or False (a string such as "no" is truthy: it would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value
