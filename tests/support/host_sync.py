"""A context in which reading a device value on the host is an error: the proof that a fused path never
synchronises with the device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

#: Tensor methods that read a value on the host (and so would wait for a GPU). Not ``numpy``: it refuses CUDA
#: tensors, so it cannot hide a device sync (the CPU GradDrop kernel reads its host-drawn seed through it).
SYNCS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def forbid_host_sync(device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block, the methods in ``SYNCS`` raise (the CPU proxy: a CPU computation never waits, so
    only what would wait on a GPU can be caught), and on CUDA every synchronising call raises too
    (``torch.cuda.set_sync_debug_mode("error")``)."""
    device = torch.device(device)

    def forbidden(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"host synchronisation: a Tensor method read a value ({SYNCS})")

    with pytest.MonkeyPatch.context() as patch:
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
