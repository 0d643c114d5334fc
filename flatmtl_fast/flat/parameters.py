"""Flat shared parameters: one contiguous storage, every parameter a view into it.

With the shared parameters flat, every O(N) operation of a step (gram, combine, perturbations) is
one kernel over one buffer instead of one per tensor, and the aggregated direction can be written
straight into one flat ``.grad``.

Parameters sharded by FSDP2 (``fully_shard``: DTensors) keep their storage, which FSDP owns; only their
gradients are flat — each ``.grad`` is a DTensor over this rank's slice of one flat buffer, into which
FSDP's reduce-scatter accumulates in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._memory import byte_range

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # a torch built without distributed support has no sharded parameters
    DTensor = Replicate = Shard = ()


class FlatParameters:
    """Move ``params`` into one contiguous storage; each parameter's ``.data`` becomes a view of it.

    The module keeps working unchanged: ``state_dict`` / ``load_state_dict`` copy in place,
    optimizers keep the same Parameter objects, and ``.to()`` / ``.cuda()`` (which give parameters
    new storage) are detected and undone by :meth:`refresh`, which every flatmtl_fast entry point
    calls. Parameters must share one device and one floating dtype, and be distinct.

    FSDP2's sharded parameters (DTensors placed ``Shard``, or ``Replicate`` and ``Shard`` on HSDP's 2-D mesh, as
    ``fully_shard`` leaves them) are taken as they are: N counts this rank's local scalars, :attr:`data` is None
    (FSDP owns their storage), and every ``.grad`` bound is a DTensor over this rank's slice of a flat buffer.
    Aggregate them with ``backward(..., process_group=<the group they are sharded over>, layout="sharded")`` or
    ``FMTL`` likewise (with HSDP, the shard dimension's group: the replicas hold copies). Build it before the first
    forward pass or after ``reshard()``: the gathered copies FSDP2 leaves registered after a forward pass that no
    backward pass followed are refused.

    Attributes:
        data: the flat parameter vector (N,); None for sharded parameters.
        grad: the flat gradient buffer (N,); :meth:`bind_grad` makes every ``p.grad`` a view of it.
        sharded: whether the parameters are FSDP2's DTensor shards.
        kept: what entry points keep with these parameters between steps (``backward``'s reused K × N buffer),
            freed with them.
        shard_ranks: the global ranks whose shards make up the parameters with this rank's (``process_group``
            must hold exactly these), None if not sharded.
    """

    def __init__(self, params: Iterable[nn.Parameter] | nn.Module) -> None:
        if isinstance(params, Tensor) or not isinstance(params, Iterable | nn.Module):
            # A lone tensor is iterable too: it would be flattened as its rows (views, not parameters).
            raise TypeError(
                "FlatParameters: params must be a module or an iterable of parameters (a single one: [param]), got "
                + ("a tensor" if isinstance(params, Tensor) else type(params).__name__)
            )
        if isinstance(params, nn.Module):
            params = params.parameters()
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"FlatParameters: expected parameters (tensors), got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError("FlatParameters: a parameter appears twice")
            if not p.requires_grad:
                raise ValueError(
                    f"FlatParameters: parameter {len(self.params)} does not require grad (frozen): leave it out of "
                    "the shared parameters"
                )
            if not p.is_leaf:  # a view or a result: its .data cannot be re-pointed, backward passes stop at it
                raise ValueError(
                    f"FlatParameters: parameter {len(self.params)} is computed by autograd (not a leaf): pass the "
                    "parameters it is computed from"
                )
            seen.add(id(p))
            self.params.append(p)
        if not self.params:
            raise ValueError("FlatParameters: no parameters given")
        check_not_gathered(((f"params[{i}]", p) for i, p in enumerate(self.params)), "FlatParameters")
        self.ids = frozenset(seen)  # to tell task parameters that are shared apart
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"FlatParameters: parameters are on several devices {sorted(map(str, devices))}")
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"FlatParameters: parameters need one floating dtype, got {sorted(map(str, dtypes))}")
        self.sharded = _check_sharding(self.params)
        self.shard_ranks = shard_ranks(self.params, "FlatParameters", "params") if self.sharded else None
        if not self.sharded:
            _check_disjoint(self.params)
        # This rank's shapes: a DTensor's own shape is the global one.
        self.shapes = [p.to_local().shape if self.sharded else p.shape for p in self.params]
        self.numels = [shape.numel() for shape in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.kept: dict[str, object] = {}
        self._flatten(self.params[0].device)

    @property
    def numel(self) -> int:
        """N, the number of shared scalars."""
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.grad.device

    @property
    def dtype(self) -> torch.dtype:
        return self.grad.dtype

    def views(self, flat: Tensor) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """(parameter, the slice of ``flat``'s last dimension shaped like it — like its local shard when
        sharded) for every parameter."""
        for p, shape, start, end in zip(self.params, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True):
            yield p, flat[..., start:end].view(flat.shape[:-1] + shape)  # a 0-dim parameter: shape ()

    def split(self, flat: Tensor) -> list[Tensor]:
        """The slices of ``flat``'s last dimension (N) shaped like the parameters, in their order: (shape) views of
        an (N,) vector (for :meth:`bind_grad_views`), (K, shape) views of a (K, N) matrix's columns."""
        return [view for _, view in self.views(flat)]

    def grad_views(self, flat: Tensor) -> list[Tensor]:
        """The views of an (N,) vector to bind as the parameters' ``.grad`` (:meth:`bind_grad_views`): those of
        :meth:`split`, wrapped as DTensors placed like the parameters when they are sharded."""
        views = self.split(flat)
        if not self.sharded:
            return views
        with torch.no_grad():
            return [
                DTensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                for p, view in zip(self.params, views, strict=True)
            ]

    def read_values(self, out: Tensor) -> Tensor:
        """Copy the parameters' values (this rank's shards when sharded) into the (N,) vector ``out``; return it."""
        self._check_vector(out, "read_values", "out")
        with torch.no_grad():
            if self.data is not None:
                return out.copy_(self.data)
            torch._foreach_copy_(self.split(out), [local_tensor(p) for p in self.params])
        return out

    def write_values(self, flat: Tensor) -> None:
        """Set the parameters' values (this rank's shards when sharded, which FSDP gathers at the next forward)
        from the (N,) vector ``flat``, in place: one copy into :attr:`data`, or one per shard."""
        self._check_vector(flat, "write_values", "flat")
        with torch.no_grad():
            if self.data is not None:
                self.data.copy_(flat)
            else:
                torch._foreach_copy_([local_tensor(p) for p in self.params], self.split(flat))

    def _check_vector(self, vector: object, op: str, name: str) -> None:
        if not isinstance(vector, Tensor) or vector.shape != (self.numel,) or vector.device != self.device:
            got = f"{tuple(vector.shape)} on {vector.device}" if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(
                f"FlatParameters.{op}: {name} must be an (N,) = ({self.numel},) tensor on {self.device}, got {got}"
            )

    def _flatten(self, device: torch.device) -> None:
        dtype = self.params[0].dtype
        if self.sharded:
            self.data = None
            self._addresses = self._placement()
        else:
            data = torch.empty(self.numel, dtype=dtype, device=device)
            with torch.no_grad():
                for p, view in self.views(data):
                    view.copy_(p.data)
                    p.data = view
            self.data = data
            self._addresses = list(map(Tensor.data_ptr, self.params))
        self.grad = torch.zeros(self.numel, dtype=dtype, device=device)
        self._grad_views = self.grad_views(self.grad)

    def _placement(self) -> list[tuple[torch.device, torch.dtype]]:
        return [(p.device, p.dtype) for p in self.params]

    def is_flat(self) -> bool:
        """Whether every parameter still is its view of :attr:`data` (false after e.g. ``module.to()``); for
        sharded parameters, whether they kept their device and dtype (the gradient buffer's)."""
        if self.sharded:
            return self._placement() == self._addresses
        # The addresses alone decide (this runs every step): self.data keeps its storage alive, so a parameter that
        # was moved, cast or replaced starts elsewhere; CUDA's unified addressing keeps device and host apart.
        return list(map(Tensor.data_ptr, self.params)) == self._addresses

    def refresh(self) -> None:
        """Re-flatten if the parameters were moved or replaced (keeps their current values); raise if one was frozen
        or reshaped since (its view of the flat buffer would be wrong)."""
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(
                    f"FlatParameters: parameter {i} {tuple(p.shape)} no longer requires grad (frozen after it was "
                    "flattened): build a new FlatParameters without it"
                )
        if not self.is_flat():
            devices = {p.device for p in self.params}
            dtypes = {p.dtype for p in self.params}
            if len(devices) > 1:
                raise ValueError(f"FlatParameters: parameters are now on several devices {sorted(map(str, devices))}")
            if len(dtypes) > 1:  # re-flattening would cast them all to the first one's dtype
                raise ValueError(
                    f"FlatParameters: parameters now have several dtypes {sorted(map(str, dtypes))}; cast the whole "
                    "set (e.g. the module) to one dtype"
                )
            for i, (p, shape) in enumerate(zip(self.params, self.shapes, strict=True)):
                if (p.to_local().shape if self.sharded else p.shape) != shape:
                    raise ValueError(
                        f"FlatParameters: parameter {i} changed shape from {tuple(shape)} to {tuple(p.shape)}: build a "
                        "new FlatParameters for the new shapes"
                    )
            self._flatten(devices.pop())

    def bind_grad(self, flat_grad: Tensor | None = None) -> Tensor:
        """Make every ``p.grad`` a view of ``flat_grad`` (default :attr:`grad`); return that buffer.

        Optimizers' ``zero_grad(set_to_none=True)`` unbinds them; flatmtl_fast rebinds on each step.
        """
        if flat_grad is None:
            self.bind_grad_views(self._grad_views)  # cut once: slicing P views costs µs per tensor per step
            return self.grad
        self.bind_grad_views(self.grad_views(flat_grad))
        return flat_grad

    def unbind_grad(self) -> None:
        """Set every ``p.grad`` to None (no longer a view of a buffer that will be overwritten)."""
        for p in self.params:
            p.grad = None

    def bind_grad_views(self, views: Sequence[Tensor]) -> None:
        """Make every ``p.grad`` its view in ``views`` (from :meth:`grad_views`, kept by callers that rebind
        often)."""
        if len(views) != len(self.params):
            raise ValueError(f"bind_grad_views: expected one view per parameter ({len(self.params)}), got {len(views)}")
        for p, view in zip(self.params, views, strict=True):
            p.grad = view

    def backward_inputs(self, extra: Sequence[Tensor] = ()) -> list[Tensor] | None:
        """The ``inputs`` of a backward pass that fills the parameters' ``.grad`` (and ``extra``'s). None when
        sharded: FSDP2's sharded parameters are not in the graph (its unsharded copies are, and its hooks
        reduce-scatter their gradients into ours), so the pass reaches every leaf, as ``loss.backward()`` does."""
        return None if self.sharded else [*self.params, *extra]

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        shards = ", sharded" if self.sharded else ""
        return f"FlatParameters({len(self.params)} tensors, N={self.numel}, {self.dtype}, {self.device}{shards})"


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's local shard (call it without grad: writes into it reach the DTensor),
    any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_not_gathered(named: Iterable[tuple[str, Tensor]], owner: str) -> None:
    """Raise if one of the ``(name, tensor)`` pairs holds the gathered copy that FSDP2 registers on a module in
    place of a sharded parameter. The root module's stay registered after a forward pass that no backward pass
    followed (an evaluation under ``no_grad``, say): taking them would flatten or perturb a buffer FSDP frees and
    refills at every step, and leave the optimizer's shards with wrong gradients."""
    gathered = _fsdp_gathered_copies()
    for name, p in named:
        if id(p) in gathered:
            raise ValueError(
                f"{owner}: {name} is FSDP2's gathered copy of a sharded parameter, not the parameter (FSDP2 keeps "
                "the root module's parameters gathered after a forward pass that no backward pass followed): call "
                f"reshard() on the fully_shard module that holds it, or build {owner} before the first forward pass"
            )


def _fsdp_gathered_copies() -> set[int]:
    """The ids of the gathered (unsharded) parameters FSDP2 holds for its sharded ones, in every fully_shard module.

    FSDP2 keeps no public record of them: this reads its state, and finds nothing (no check) where a torch version
    lays that state out otherwise. A copy is allocated at its module's first forward pass and reused."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return set()
    copies = set()
    for module in list(_module_state_mapping):
        get_state = getattr(module, "_get_fsdp_state", None) if isinstance(module, FSDPModule) else None
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.12: one group at most
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                copy = getattr(fsdp_param, "_unsharded_param", None)
                if copy is not None:
                    copies.add(id(copy))
    return copies


def _check_disjoint(params: list[Tensor]) -> None:
    """Raise if two parameters share memory (views of one tensor, e.g. a weight and its transpose): flattening
    would give each its own copy, silently untying them."""
    spans = sorted((*byte_range(p), i) for i, p in enumerate(params) if p.numel())
    # Sorted by start, any overlap shows between neighbours.
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"FlatParameters: parameters {min(i, j)} and {max(i, j)} share memory; pass it once")


def _check_sharding(params: list[Tensor]) -> bool:
    """Whether ``params`` are FSDP2's DTensor shards (all of them, every placement ``Shard`` or, for HSDP's
    replicas, ``Replicate``); raises on a mix or on other placements (a ``Partial`` one holds no gradient
    columns of its own)."""
    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return False
    if not all(sharded):
        raise ValueError(
            "FlatParameters: some parameters are DTensors (FSDP2 shards) and some are not; flatten each kind apart"
        )
    for i, p in enumerate(params):
        if not all(isinstance(placement, Shard | Replicate) for placement in p.placements):
            raise ValueError(
                f"FlatParameters: parameter {i} is a DTensor placed {tuple(p.placements)}; only Shard placements "
                "(FSDP2's fully_shard) and Replicate ones (HSDP's replicas) are supported"
            )
    return True


def shard_ranks(params: Iterable[Tensor], owner: str, name: str) -> tuple[int, ...] | None:
    """The global ranks that hold the other shards of the DTensors among ``params`` (this rank's coordinates on the
    mesh dimensions they are replicated over, every index on those they are sharded over: the group whose partial
    Grams add up to the whole), or None without DTensors. Raises when the parameters disagree."""
    groups = set()
    for p in params:
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            index = tuple(
                slice(None) if isinstance(placement, Shard) else coordinate
                for placement, coordinate in zip(p.placements, mesh.get_coordinate(), strict=True)
            )
            groups.add(tuple(sorted(mesh.mesh[index].flatten().tolist())))
    if len(groups) > 1:
        raise ValueError(
            f"{owner}: the parameters of {name} are sharded over different groups of ranks {sorted(groups)}"
        )
    return groups.pop() if groups else None
