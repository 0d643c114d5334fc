"""The K × N per-task gradient buffer, filled by K backward passes through one forward graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .parameters import FlatParameters


class TaskGradients:
    """Captures g_i = ∂L_i/∂θ_shared for K losses into the rows of a reusable (K, N) buffer.

    When the buffer has the parameters' dtype, each parameter's ``.grad`` is bound to its slice of
    row i before task i's backward pass, so autograd accumulates straight into the buffer (no copy).
    A buffer of another dtype (e.g. bfloat16 storage for float32 parameters, to halve memory and
    traffic) receives each row through one float32 scratch row and one cast.

    Extra inputs (task-specific parameters) take part in every backward pass and so receive their
    ordinary gradient Σ_i ∂L_i/∂θ in ``.grad``.
    """

    def __init__(
        self,
        shared: FlatParameters,
        num_tasks: int,
        dtype: torch.dtype | None = None,
        *,
        owner: str = "TaskGradients",
        name: str = "dtype",
    ) -> None:
        """``owner`` and ``name``: how errors name the caller and the argument that gave ``dtype``."""
        if not isinstance(shared, FlatParameters):
            raise TypeError(f"{owner}: shared must be a FlatParameters, got {type(shared).__name__}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"{owner}: num_tasks must be an integer ≥ 1, got {num_tasks!r}")
        dtype = shared.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"{owner}: {name} must be float32, bfloat16, float16 or float64, got {dtype}")
        self.shared = shared
        self.buffer = torch.empty(num_tasks, shared.numel, dtype=dtype, device=shared.device)
        self._scratch = None if dtype == shared.dtype else torch.empty_like(shared.grad)
        # Each row's target (its buffer row, or the scratch row) and its parameter-shaped views, cut on first use
        # and rebound on every pass: cutting them anew costs a slice and a view per parameter per task per step.
        self._targets: dict[int, tuple[Tensor, list[Tensor]]] = {}
        self._columns: list[Tensor] | None = None  # the batched capture's views, cut on first use

    @property
    def num_tasks(self) -> int:
        return self.buffer.shape[0]

    def fits(self, dtype: torch.dtype | None = None) -> bool:
        """Whether this buffer still serves its shared parameters with storage ``dtype`` (default: theirs): same
        device, and ``.grad`` views of their dtype (``module.double()`` or ``.to()`` re-flattens them)."""
        storage = self.shared.dtype if dtype is None else dtype
        binds = self.buffer.dtype if self._scratch is None else self._scratch.dtype
        return self.buffer.dtype == storage and self.buffer.device == self.shared.device and binds == self.shared.dtype

    def capture(
        self,
        losses: Sequence[Tensor],
        extra_inputs: Sequence[Tensor] = (),
        retain_graph: bool = False,
        *,
        add: bool = False,
        batched: bool = False,
    ) -> Tensor:
        """Run one backward pass per loss; return the (K, N) buffer with row i = ∂L_i/∂θ_shared.

        The graph is kept until the last pass (and after it when ``retain_graph``). Raises if a
        loss reaches none of the shared parameters (its row would silently be zero). With ``add``,
        row i receives its gradient added to what it holds (micro-batch accumulation). The shared
        parameters' ``.grad`` are None afterwards (and after an error): they were views of the buffer.

        With ``batched``, one vmapped backward pass (``torch.autograd.grad(..., is_grads_batched=True)``)
        gives all K rows, then one plain pass over the extra inputs gives them Σ_i ∂L_i/∂θ: the autograd
        engine's host time is paid once instead of K times (a model of many small tensors steps several
        times faster), but the K gradients of every parameter exist at once beside the buffer (K × N more
        peak memory), operators without a batching rule run in a slow loop, and a loss that reaches no shared
        parameter gets a zero row (telling it apart would need the values on the host).
        """
        if len(losses) != self.num_tasks:
            raise ValueError(
                f"expected {self.num_tasks} losses (the number of tasks this buffer was made for), got {len(losses)}"
            )
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                got = type(loss).__name__
                if isinstance(loss, Tensor):
                    got = f"shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}"
                raise ValueError(
                    f"TaskGradients.capture: loss {i} must be a scalar tensor that requires grad, got {got}"
                )
        if batched:
            if self.shared.sharded:
                raise ValueError(
                    "batched capture differentiates the shared parameters directly; FSDP2's sharded parameters are "
                    "not in the graph (its unsharded copies are): use the K passes (batched=False)"
                )
            self._capture_batched(losses, extra_inputs, retain_graph=retain_graph, add=add)
            return self.buffer
        inputs = self.shared.backward_inputs(extra_inputs)
        try:
            for i, loss in enumerate(losses):
                last = i == len(losses) - 1
                self.capture_row(i, loss, inputs, retain_graph=retain_graph or not last, add=add, name=f"loss {i}")
        finally:  # a later backward pass or zero_grad must not write into the returned rows
            self.shared.unbind_grad()
        return self.buffer

    def _capture_batched(
        self, losses: Sequence[Tensor], extra_inputs: Sequence[Tensor], *, retain_graph: bool, add: bool
    ) -> None:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        seeds = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)  # row i of the batch: ∂L_i
        keep = retain_graph or bool(extra_inputs)
        grads = torch.autograd.grad(
            stacked, self.shared.params, seeds, retain_graph=keep, allow_unused=True, is_grads_batched=True
        )
        if all(grad is None for grad in grads):
            raise ValueError("no loss depends on the shared parameters (every row would be zero)")
        if self._columns is None:
            self._columns = self.shared.split(self.buffer)  # each parameter's K × (its shape) columns
        for columns, grad in zip(self._columns, grads, strict=True):
            if grad is not None:
                (columns.add_ if add else columns.copy_)(grad)
            elif not add:
                columns.zero_()  # not reached by any loss
        if extra_inputs:  # through AccumulateGrad, as the K passes would: their hooks run, .grad accumulates
            torch.autograd.backward(
                stacked, torch.ones_like(stacked), inputs=list(extra_inputs), retain_graph=retain_graph
            )

    def capture_row(
        self,
        row: int,
        loss: Tensor,
        inputs: Sequence[Tensor] | None,
        *,
        retain_graph: bool,
        subtract: Tensor | None = None,
        add: bool = False,
        name: str = "loss",
    ) -> None:
        """One backward pass of ``loss`` into buffer row ``row`` (over ``inputs``, the shared parameters first, or
        :meth:`FlatParameters.backward_inputs`).

        With ``subtract`` (an (N,) vector), the row receives ∂loss/∂θ − subtract: autograd accumulates onto
        −subtract, so a small difference of two large gradients (F-MTL's h = s − g) is formed with one
        rounding in the parameters' precision instead of being recovered later from their Grams.
        With ``add``, the row receives its content + ∂loss/∂θ (a buffer of another dtype than the parameters'
        rounds once per call).
        """
        if add and subtract is not None:
            raise ValueError("capture_row: add and subtract exclude each other")
        key = row if self._scratch is None else -1
        if key not in self._targets:
            target = self.buffer[row] if self._scratch is None else self._scratch
            self._targets[key] = target, self.shared.grad_views(target)
        target, views = self._targets[key]
        if subtract is not None:
            torch.neg(subtract, out=target)
        elif not (add and self._scratch is None):  # autograd adds onto a buffer row in place
            target.zero_()
        self.shared.bind_grad_views(views)
        # Autograd adds a reached parameter's gradient in place into its .grad view, which bumps the version counter
        # the views share with the target: an unchanged version means the loss reached no shared parameter. (Hooks
        # on every parameter would cost a Python call per parameter per pass, and outlive this object.)
        version = target._version
        torch.autograd.backward(loss, inputs=inputs, retain_graph=retain_graph)
        if target._version == version:
            raise ValueError(
                f"{name} does not depend on the shared parameters (its gradient there is zero), or the graph hides "
                "them from backward(inputs=...): reentrant activation checkpointing does, use use_reentrant=False; "
                "or the module's parameters were replaced after FlatParameters was built (load_state_dict("
                "assign=True), a new nn.Parameter assigned): build FlatParameters again"
            )
        if self._scratch is not None:
            (self.buffer[row].add_ if add else self.buffer[row].copy_)(self._scratch)
