"""Loads the compiled module ``flatmtl_fast._C`` if it was built; never fails the package import."""

from __future__ import annotations

from types import ModuleType

import torch

try:
    from . import _C as _module  # noqa: N811

    _error: str | None = None
except ImportError as exc:  # not built (FLATMTL_NATIVE=0, no compiler) or built for another platform
    _module = None
    _error = f"native module not built or not loadable ({exc})"

#: Element-type codes of csrc/include/flatmtl/streaming.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def module() -> ModuleType | None:
    """The compiled module, or None when it is missing."""
    return _module


def load_error() -> str | None:
    """Why the compiled module is missing (None when it loaded)."""
    return _error
