"""Flat shared parameters: one contiguous storage, every parameter a view into it.

With the shared parameters flat, every O(N) operation of a step (gram, combine, perturbations) is
one kernel over one buffer instead of one per tensor, and the aggregated direction can be written
straight into one flat ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


class FlatParameters:
    """Move ``params`` into one contiguous storage; each parameter's ``.data`` becomes a view of it.

    The module keeps working unchanged: ``state_dict`` / ``load_state_dict`` copy in place,
    optimizers keep the same Parameter objects, and ``.to()`` / ``.cuda()`` (which give parameters
    new storage) are detected and undone by :meth:`refresh`, which every flatmtl_fast entry point
    calls. Parameters must share one device and one floating dtype, and be distinct.

    Attributes:
        data: the flat parameter vector (N,).
        grad: the flat gradient buffer (N,); :meth:`bind_grad` makes every ``p.grad`` a view of it.
    """

    def __init__(self, params: Iterable[nn.Parameter] | nn.Module) -> None:
        if isinstance(params, nn.Module):
            params = params.parameters()
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"FlatParameters: expected parameters (tensors), got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError("FlatParameters: a parameter appears twice")
            seen.add(id(p))
            self.params.append(p)
        if not self.params:
            raise ValueError("FlatParameters: no parameters given")
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"FlatParameters: parameters are on several devices {sorted(map(str, devices))}")
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"FlatParameters: parameters need one floating dtype, got {sorted(map(str, dtypes))}")
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self._flatten(self.params[0].device)

    @property
    def numel(self) -> int:
        """N, the number of shared scalars."""
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def views(self, flat: Tensor) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """(parameter, the slice of ``flat``'s last dimension shaped like it) for every parameter."""
        for p, start, end in zip(self.params, self.offsets[:-1], self.offsets[1:], strict=True):
            yield p, flat[..., start:end].view(*flat.shape[:-1], *p.shape)

    def split(self, flat: Tensor) -> list[Tensor]:
        """The slices of ``flat``'s last dimension (N) shaped like the parameters, in their order: (shape) views of
        an (N,) vector (for :meth:`bind_grad_views`), (K, shape) views of a (K, N) matrix's columns."""
        return [view for _, view in self.views(flat)]

    def _flatten(self, device: torch.device) -> None:
        dtype = self.params[0].dtype
        data = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for p, view in self.views(data):
                view.copy_(p.data)
                p.data = view
        self.data = data
        self.grad = torch.zeros_like(data)
        self._grad_views = self.split(self.grad)
        self._addresses = [p.data_ptr() for p in self.params]

    def is_flat(self) -> bool:
        """Whether every parameter still is its view of :attr:`data` (false after e.g. ``module.to()``)."""
        # The addresses alone decide (this runs every step): self.data keeps its storage alive, so a parameter that
        # was moved, cast or replaced starts elsewhere; CUDA's unified addressing keeps device and host apart.
        return list(map(Tensor.data_ptr, self.params)) == self._addresses

    def refresh(self) -> None:
        """Re-flatten if the parameters were moved or replaced (keeps their current values)."""
        if not self.is_flat():
            devices = {p.device for p in self.params}
            if len(devices) > 1:
                raise ValueError(f"FlatParameters: parameters are now on several devices {sorted(map(str, devices))}")
            self._flatten(devices.pop())

    def bind_grad(self, flat_grad: Tensor | None = None) -> Tensor:
        """Make every ``p.grad`` a view of ``flat_grad`` (default :attr:`grad`); return that buffer.

        Optimizers' ``zero_grad(set_to_none=True)`` unbinds them; flatmtl_fast rebinds on each step.
        """
        if flat_grad is None:
            self.bind_grad_views(self._grad_views)  # cut once: slicing P views costs µs per tensor per step
            return self.grad
        self.bind_grad_views(self.split(flat_grad))
        return flat_grad

    def bind_grad_views(self, views: Sequence[Tensor]) -> None:
        """Make every ``p.grad`` its view in ``views`` (from :meth:`split`, kept by callers that rebind often)."""
        if len(views) != len(self.params):
            raise ValueError(f"bind_grad_views: expected one view per parameter ({len(self.params)}), got {len(views)}")
        for p, view in zip(self.params, views, strict=True):
            p.grad = view

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        return f"FlatParameters({len(self.params)} tensors, N={self.numel}, {self.dtype}, {self.device})"
