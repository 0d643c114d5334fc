"""Argument checks shared by every aggregator (reference and fused).

Each check raises with the argument's name and what was expected, before any arithmetic.
Value checks that would need a host synchronisation (finiteness, positivity) are only made
where the caller asks for them, so fused paths stay free of syncs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real

import torch
from torch import Tensor

from ..primitives import checks as primitive_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(G: Tensor, name: str = "G", *, finite: bool = False) -> tuple[int, int]:
    """Check that ``G`` is a floating (K, N) tensor with K ≥ 1 and N ≥ 1 (and, with ``finite``, free of NaN/Inf:
    a host synchronisation, for the reference classes only); return (K, N)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (K, N), got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{name} must have shape (K, N) (one row per task), got shape {tuple(G.shape)}")
    if G.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {G.dtype}")
    K, N = G.shape
    if K == 0 or N == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(G.shape)}")
    _check_not_differentiated(G, name)
    _check_finite(G, name, finite)
    return K, N


def _check_finite(x: Tensor, name: str, finite: bool) -> None:
    # The reference classes refuse NaN/Inf (the fused ones give NaN weights instead): each method's solver would
    # otherwise fail in its own way — an eigh or CVXPY error, or a finite result made of the NaN.
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (the gradients contain NaN or Inf, or overflow)")


def _check_not_differentiated(x: Tensor, name: str) -> None:
    if x.requires_grad:  # the reference's solvers go through NumPy, the fused kernels are not differentiable
        raise ValueError(
            f"{name} requires grad, but aggregators are not differentiable (they consume gradients); "
            f"pass {name}.detach()"
        )


def check_streaming(G: Tensor, out: Tensor | None, owner: str) -> Tensor | None:
    """The streaming primitives' checks of ``G`` (row layout, dtype, K limit) and of ``out`` (returned checked), made
    by a fused aggregator before it advances any state (generators, warm starts, step counts), so that a refused
    call leaves the state as it was."""
    primitive_checks.check_G(G, owner)
    return None if out is None else primitive_checks.check_out(out, G, op=owner)


def check_gramian(M: Tensor, name: str = "M", *, finite: bool = False) -> int:
    """Check that ``M`` is a floating square (K, K) tensor with K ≥ 1 (and, with ``finite``, free of NaN/Inf);
    return K."""
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (K, K), got {type(M).__name__}")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"{name} must be a square (K, K) Gram matrix with K ≥ 1, got shape {tuple(M.shape)}")
    if M.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {M.dtype}")
    _check_not_differentiated(M, name)
    _check_finite(M, name, finite)
    return M.shape[0]


def check_losses(losses: Tensor | None, K: int, device: torch.device, *, required: bool, owner: str) -> None:
    """Check ``losses`` has shape (K,) on ``device`` (or is None when not ``required``)."""
    if losses is None:
        if required:
            raise ValueError(f"{owner} needs the task losses: pass losses=<tensor of shape ({K},)>")
        return
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor of shape ({K},), got {type(losses).__name__}")
    if losses.shape != (K,):
        raise ValueError(f"losses must have shape ({K},) (one per task, K = {K}), got shape {tuple(losses.shape)}")
    if losses.dtype not in FLOAT_DTYPES:
        raise TypeError(f"losses must be a floating tensor, got dtype {losses.dtype}")
    if losses.device != device:
        raise ValueError(f"losses must be on {device} (the device of the gradients), got {losses.device}")


def check_positive_finite_losses(losses: Tensor, owner: str) -> None:
    """Raise if any loss is non-finite or ≤ 0 (for methods that take logs or divide by losses).

    Synchronises with the device: only the reference backend calls it.
    """
    if not bool(torch.isfinite(losses).all()):
        raise ValueError(f"{owner}: losses must be finite, got {losses.tolist()}")
    if not bool((losses > 0).all()):
        raise ValueError(f"{owner}: losses must be > 0 (their logarithm / reciprocal is used), got {losses.tolist()}")


def check_real(
    value: object,
    owner: str,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite real number (not a bool) within the given bounds (minimum/maximum inclusive, above/below strict), as
    a float: a hyper-parameter that is Inf, NaN or a string would otherwise surface as NaN weights or a binding
    error at the first step."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    bounds = {"≥": minimum, "≤": maximum, ">": above, "<": below}
    tests = {"≥": value.__ge__, "≤": value.__le__, ">": value.__gt__, "<": value.__lt__}
    if not all(tests[sign](bound) for sign, bound in bounds.items() if bound is not None):
        wanted = " and ".join(f"{sign} {bound:g}" for sign, bound in bounds.items() if bound is not None)
        raise ValueError(f"{owner}: {name} must be {wanted}, got {value!r}")
    return value


#: The largest count a compiled solver takes (a C int).
MAX_COUNT = 2**31 - 1


def check_count(value: object, owner: str, name: str, *, minimum: int) -> int:
    """An integer (not a bool) in [minimum, 2³¹ − 1], as an int."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not minimum <= value <= MAX_COUNT:
        raise ValueError(f"{owner}: {name} must be an integer in [{minimum}, {MAX_COUNT}], got {value!r}")
    return int(value)


def check_state_keys(state: object, expected: Iterable[str], owner: str) -> None:
    """A state to load: a mapping with exactly the ``expected`` keys (checked before anything is set)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}: state must be a dict (as state_dict() returns), got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected), key=repr)
    if missing or unexpected:
        raise KeyError(f"{owner}: missing keys {missing}, unexpected keys {unexpected}")
