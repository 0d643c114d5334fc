"""What one distributed aggregation step communicates, and the one place where its collectives are called."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

#: The torch.distributed function of each collective kind, newest name first (torch ≥ 2.13 deprecates the
#: ``*_tensor`` spellings; torch 2.4 only has those). Looked up on each call, so a test harness can wrap them.
_FUNCTIONS = {
    "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor"),
    "all_gather": ("all_gather_single", "all_gather_into_tensor"),
    "check": ("all_gather_single", "all_gather_into_tensor"),
    "all_reduce": ("all_reduce",),
    "broadcast": ("broadcast",),
}


class DistributedStepError(RuntimeError):
    """The ranks disagree on a distributed aggregation step, or one of its collectives failed or timed out."""


@dataclass
class Traffic:
    """Bytes of the collectives of one step, per kind, summed over calls.

    Each entry counts the size of the whole tensor the collective is over, as torch.distributed's
    calls name it: a reduce-scatter its input (P shards), an all-gather its output, an all-reduce or
    a broadcast the tensor itself. ``check`` is the consistency all-gather run before the heavy
    collectives (a few int64 per rank). What each rank actually sends depends on the algorithm the
    backend picks; :meth:`wire_bytes` gives it for ring algorithms.
    """

    reduce_scatter: int = 0
    all_gather: int = 0
    all_reduce: int = 0
    broadcast: int = 0
    check: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        """The bytes of both, kind by kind (e.g. F-MTL's own collectives and its aggregation step's)."""
        return Traffic(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def total(self) -> int:
        """The sum over all kinds."""
        return sum(getattr(self, f.name) for f in fields(self))

    def wire_bytes(self, world_size: int) -> float:
        """Bytes one rank sends per step under ring algorithms (averaged over ranks). gloo runs its reduce-scatter
        as an all-reduce, which sends twice the figure counted here.

        A ring reduce-scatter or all-gather of b bytes sends (P − 1)/P · b per rank, a ring all-reduce
        (a reduce-scatter then an all-gather) twice that; a pipelined broadcast forwards the message once
        at every rank but the last, (P − 1)/P · b on average. The naive alternative — an all-reduce of the
        K × N task gradients — sends 2 (P − 1)/P · K N · itemsize.
        """
        if world_size < 1:
            raise ValueError(f"wire_bytes: world_size must be ≥ 1, got {world_size}")
        share = (world_size - 1) / world_size
        once = self.reduce_scatter + self.all_gather + self.broadcast + self.check
        return share * (once + 2 * self.all_reduce)


def run_collective(
    kind: str, what: str, traffic: Traffic, nbytes: int, group: dist.ProcessGroup, *args: Tensor, **kwargs: object
) -> None:
    """Call the collective ``kind`` (synchronously), count its bytes into ``traffic``, and turn a failure or
    a timeout into a :class:`DistributedStepError` that names the step and the likely cause."""
    function = _function(kind)
    setattr(traffic, kind, getattr(traffic, kind) + nbytes)
    try:
        function(*args, group=group, **kwargs)
    except RuntimeError as err:  # DistBackendError (timeouts, a peer that left) is a RuntimeError
        raise DistributedStepError(
            f"flatmtl_fast.distributed: the {what} ({kind}) failed on rank {dist.get_rank(group)} of "
            f"{dist.get_world_size(group)}: {err}. Another rank probably raised or exited in the middle of the "
            "step, or the ranks ran different steps; the wait is bounded by the process group's timeout "
            "(init_process_group(timeout=...) / new_group(timeout=...))"
        ) from err


def all_reduce_mean(tensor: Tensor, what: str, traffic: Traffic, group: dist.ProcessGroup) -> Tensor:
    """Average ``tensor`` over the ranks of ``group`` in place (an all-reduce, counted into ``traffic``); returns it.
    A float16 tensor is divided before the sum, as DDP does: P times a float16 gradient may overflow where the mean
    does not. Other dtypes are divided after it (their range holds the sum)."""
    world_size = dist.get_world_size(group)
    predivide = tensor.dtype == torch.float16
    if predivide:
        tensor.div_(world_size)
    nbytes = tensor.numel() * tensor.element_size()
    run_collective("all_reduce", f"mean of {what}", traffic, nbytes, group, tensor, op=dist.ReduceOp.SUM)
    return tensor if predivide else tensor.div_(world_size)


def _function(kind: str) -> Callable[..., object]:
    for name in _FUNCTIONS[kind]:
        function = getattr(dist, name, None)
        if function is not None:
            return function
    raise RuntimeError(f"torch.distributed has none of {_FUNCTIONS[kind]} (needed for {kind})")
