"""Backend selection, shared by every layer that has several implementations.

Names: ``reference`` (plain PyTorch, any device), ``triton`` (Triton kernels on CUDA tensors; on
CPU tensors only under ``TRITON_INTERPRET=1``), ``cpp`` (compiled CPU kernels), ``cuda``
(compiled CUDA kernels) and ``auto`` (the fastest available for the tensors' device).

The default is ``auto``, or the value of the environment variable ``FLATMTL_BACKEND``;
:func:`use_backend` overrides it within a ``with`` block (per thread / async context).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

from .. import _native

NAMES = ("reference", "triton", "cpp", "cuda")
CHOICES = (*NAMES, "auto")

# Fastest first. Triton is the GPU default until the CUDA kernels are measured faster; on the CPU,
# Triton only runs in its (slow) interpreter, so ``auto`` never picks it there.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("flatmtl_backend", default=None)
_fallback_notices: set[tuple[str, str]] = set()


class BackendFallbackWarning(UserWarning):
    """Emitted once per backend when ``auto`` cannot use the fastest backend for a device."""


class Implementation(Protocol):
    """One backend's implementation of an operation (see flatmtl_fast/primitives)."""

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        """None when the operation runs on these tensors, else the reason it does not."""


def _check_name(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


def current_backend() -> str:
    """The backend name in force: the innermost :func:`use_backend`, else ``FLATMTL_BACKEND``, else ``auto``."""
    name = _selected.get()
    if name is not None:
        return name
    return _environment_backend(os.environ.get("FLATMTL_BACKEND", "auto"))


@functools.lru_cache(maxsize=8)
def _environment_backend(value: str) -> str:
    # Parsed once per value: every primitive and solve asks (a few µs each, host time of a GPU step).
    return _check_name(value.strip().lower() or "auto", "FLATMTL_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed calls with backend ``name`` (one of reference, triton, cpp, cuda, auto)."""
    token = _selected.set(_check_name(name, "use_backend(name)"))
    try:
        yield name
    finally:
        _selected.reset(token)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Compile options of every Triton launch. Triton up to 3.9 fuses a * b + c into FMAs by default and warns that
# 3.10 will stop: pinned, the kernels round the same under every Triton version (as the CUDA kernels, which
# nvcc fuses by default). The interpreter ignores them.
TRITON_LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@functools.cache
def _triton_installed() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


@functools.cache
def _cuda_device_problem() -> str | None:
    module = _native.module()
    if module is None:
        return _native.load_error()
    if not module.with_cuda:
        return "the native module was built without CUDA (no nvcc at build time, or FLATMTL_CUDA=0)"
    count, error = module.cuda_device_count()
    if count < 0:
        return f"built, no CUDA device (the CUDA runtime says: {error})"
    if count == 0:
        return "built, no CUDA device"
    return None


def unavailable(name: str) -> str | None:
    """None when backend ``name`` can run somewhere on this machine, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "triton":
        missing = _triton_installed()
        if missing:
            return missing
        if not torch.cuda.is_available() and not triton_interpreting():
            return "installed, no CUDA device (set TRITON_INTERPRET=1 to run its kernels on CPU tensors)"
        return None
    if name == "cpp":
        return _native.load_error()
    if name == "cuda":
        return _cuda_device_problem()
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")


def backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or the reason it is not."""
    return {name: unavailable(name) or "available" for name in NAMES}


def require(
    name: str, op: str, implementations: Mapping[str, Implementation], device: torch.device, *dtypes: torch.dtype
):
    """Backend ``name``'s implementation of ``op`` for tensors of ``device`` / ``dtypes``; raises if it cannot run
    them (an explicit choice, or the backend a traced call was compiled with)."""
    impl = implementations.get(name)
    reason = unavailable(name) or (
        f"no {name} implementation of {op}" if impl is None else impl.unsupported(device, dtypes)
    )
    if reason:
        raise RuntimeError(f"flatmtl_fast backend {name!r} cannot run {op} here: {reason}")
    return impl


def resolve(op: str, implementations: Mapping[str, Implementation], device: torch.device, *dtypes: torch.dtype):
    """The implementation of ``op`` to run on tensors of ``device`` / ``dtypes`` under the current backend.

    An explicitly chosen backend that cannot run these tensors raises (never a silent switch);
    ``auto`` takes the first usable backend in speed order and warns once when it had to skip
    a faster one that is missing from this install.
    """
    name = current_backend()
    if name != "auto":
        return require(name, op, implementations, device, *dtypes)
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        impl = implementations.get(candidate)
        if impl is None:
            continue
        missing = unavailable(candidate)
        if missing is None and impl.unsupported(device, dtypes) is None:
            return impl
        if missing is not None and (candidate, device.type) not in _fallback_notices:
            _fallback_notices.add((candidate, device.type))
            warnings.warn(
                f"flatmtl_fast: the {candidate} backend is unavailable ({missing}); "
                f"using a slower backend for {device.type} tensors",
                BackendFallbackWarning,
                stacklevel=3,
            )
    raise RuntimeError(f"flatmtl_fast: no backend can run {op} on {device} tensors of dtype {dtypes}")
