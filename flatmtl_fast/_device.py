"""Getting host values onto a GPU without waiting for it, and refusing what a CUDA graph could not replay."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def as_device_tensor(value: float | Tensor, device: torch.device, dtype: torch.dtype, *, what: str) -> Tensor:
    """``value`` (a number or a tensor) as a ``dtype`` tensor on ``device``: a number becomes a fill there (no
    copy at all), a tensor moves as :func:`to_device` moves it."""
    if isinstance(value, numbers.Real) and not isinstance(value, Tensor):
        return torch.full((), float(value), dtype=dtype, device=device)
    return to_device(torch.as_tensor(value).to(dtype), device, what=what)


def to_device(values: Tensor, device: torch.device, *, what: str) -> Tensor:
    """``values`` on ``device``. A CPU tensor bound for a GPU goes through pinned memory asynchronously: a
    plain ``.to`` from pageable memory waits for the device. During a CUDA graph capture that copy would
    replay whatever the host buffer holds later, so it raises, naming ``what`` is being copied."""
    device = torch.device(device)
    if values.device == device or device.type != "cuda" or values.device.type != "cpu":
        return values.to(device)
    forbid_in_capture(device, f"copying {what} to {device}")
    return values.pin_memory().to(device, non_blocking=True)


def forbid_in_capture(device: torch.device, what: str) -> None:
    """Raise if a CUDA graph is being captured on ``device``'s current stream: ``what`` depends on host values
    that a replay would not update."""
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} cannot be captured in a CUDA graph: every replay would reuse this step's host values"
        )
