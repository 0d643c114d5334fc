"""A context in which reading a device value on the host is an error: the proof that a fused path never
synchronises with the device; and the side-stream warm-up that capturing such a path in a CUDA graph needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods that read a value on the host (and so would wait for a GPU). Not ``numpy``: it refuses CUDA
#: tensors, so it cannot hide a device sync (the CPU GradDrop kernel reads its host-drawn seed through it).
SYNCS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__", "__index__")

#: aten ops that wait for the device when their inputs are on CUDA: their output's size or their error check
#: depends on the data (torch checks LAPACK's status of eigh and svd on the host). Torch's own functions reach
#: them without calling a Tensor method, so the CPU proxy watches the dispatcher for them too.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "_linalg_check_errors", "_linalg_eigh", "_linalg_svd", "linalg_eig", "linalg_eigvals",
    "linalg_pinv", "linalg_matrix_rank",
})  # fmt: skip
#: ... these only with ``check_errors=True`` (their *_ex form exists to avoid the check) ...
CHECKED_OPS = frozenset({
    "linalg_cholesky_ex", "linalg_inv_ex", "linalg_lu_factor_ex", "linalg_solve_ex", "_linalg_solve_ex",
    "linalg_ldl_factor_ex",
})  # fmt: skip
#: ... and these with a boolean mask among their indices (its number of True entries sizes the result).
MASKED_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _syncs_on_cuda(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    name = func.overloadpacket.__name__
    if name in CHECKED_OPS:
        return bool(kwargs.get("check_errors", False))
    if name in MASKED_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":  # the output size is the sum of the repeats, unless given
        return func._overloadname == "Tensor" and kwargs.get("output_size") is None
    return name in SYNCING_OPS


class _SyncingOpsRaise(TorchDispatchMode):
    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__()
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ not in self.allowed and _syncs_on_cuda(func, args, kwargs):
            raise AssertionError(f"host synchronisation on CUDA: aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def forbid_host_sync(device: torch.device | str = "cpu", *, allowed: Iterable[str] = ()) -> Iterator[None]:
    """Inside the block, the methods in ``SYNCS`` and the aten ops that synchronise on CUDA (``SYNCING_OPS`` …)
    raise — the CPU proxy: a CPU computation never waits, so only what would wait on a GPU can be caught —
    except the ops named in ``allowed`` (a documented exception); on CUDA every synchronising call raises too
    (``torch.cuda.set_sync_debug_mode("error")``)."""
    device = torch.device(device)

    def forbidden(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"host synchronisation: a Tensor method read a value ({SYNCS})")

    with pytest.MonkeyPatch.context() as patch, _SyncingOpsRaise(frozenset(allowed)):
        for method in SYNCS:
            patch.setattr(torch.Tensor, method, forbidden)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def on_side_stream(fn: Callable[[], None], device: torch.device) -> None:
    """Run ``fn`` on a side stream (CUDA graphs need their warm-up off the capturing stream)."""
    if device.type != "cuda":
        fn()
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
