"""``flatmtl_fast.backward``: the drop-in replacement for ``sum(losses).backward()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..aggregators._fused import FusedGramian
from ..aggregators.base import Aggregator, GramianAggregator
from ..flat import FlatParameters, TaskGradients
from ..primitives import combine, gram

NonFinitePolicy = Literal["raise", "skip", "propagate"]


@dataclasses.dataclass
class _Kept:
    """What backward keeps per shared block between calls: the reusable K × N buffer (steps allocate nothing
    O(N): no page-fault storms) and, while micro-batches accumulate, the sum of their loss values."""

    gradients: TaskGradients
    pending_losses: Tensor | None = None


def release_buffers(shared: FlatParameters) -> None:
    """Free the per-task gradient buffer kept for ``shared`` (e.g. before changing the number of tasks), with
    any micro-batches accumulated in it (``aggregate=False``) and not yet aggregated."""
    if not isinstance(shared, FlatParameters):
        raise TypeError(f"release_buffers: shared must be a FlatParameters, got {type(shared).__name__}")
    shared.kept.pop(_KEPT, None)


#: The key of backward's buffer in ``FlatParameters.kept``: kept with the parameters, it is freed with them.
_KEPT = "backward"


def _kept_for(shared: FlatParameters, K: int, dtype: torch.dtype | None) -> _Kept:
    kept = shared.kept.get(_KEPT)
    if kept is not None and kept.gradients.num_tasks != K:
        raise ValueError(
            f"backward: the number of losses changed from {kept.gradients.num_tasks} to {K} between steps; "
            "stateful aggregators would mix tasks. Call flatmtl_fast.release_buffers(shared) and reset() "
            "the aggregator if this is intended"
        )
    if kept is None or not kept.gradients.fits(dtype):
        if kept is not None and kept.pending_losses is not None:
            raise ValueError(
                "backward: grad_dtype, or the shared parameters' dtype or device, changed while micro-batches were "
                "accumulating (aggregate=False); aggregate them first, or drop them with "
                "flatmtl_fast.release_buffers(shared)"
            )
        kept = shared.kept[_KEPT] = _Kept(TaskGradients(shared, K, dtype, owner="backward", name="grad_dtype"))
    return kept


def check_losses(losses: Sequence[Tensor] | Tensor, device: torch.device, owner: str = "backward") -> list[Tensor]:
    """The K losses as a list of scalar tensors that require grad, on ``device`` (clear errors otherwise)."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"{owner}: losses must be a sequence of scalars or a 1-D tensor, got shape {tuple(losses.shape)}"
            )
        losses = list(losses.unbind())
    if not isinstance(losses, Iterable):
        raise TypeError(
            f"{owner}: losses must be a sequence of scalar tensors or a 1-D tensor, got {type(losses).__name__}"
        )
    losses = list(losses)
    if not losses:
        raise ValueError(f"{owner}: no losses given")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"{owner}: loss {i} must be a scalar tensor, got {shape}")
        if not loss.requires_grad:
            raise ValueError(f"{owner}: loss {i} does not require grad (it does not depend on any parameter)")
        if loss.device != device:
            raise ValueError(f"{owner}: loss {i} is on {loss.device} but the shared parameters are on {device}")
    return losses


def check_task_params(
    params: Iterable[Tensor] | nn.Module, shared: FlatParameters, seen: set[int], owner: str, name: str
) -> list[Tensor]:
    """``params`` as a list of tensors that require grad, on the shared device, none of them shared or in ``seen``
    (the ids of parameters already claimed, which this extends)."""
    if isinstance(params, Tensor) or not isinstance(params, Iterable | nn.Module):
        raise TypeError(
            f"{owner}: {name} must be an iterable of parameters (e.g. heads.parameters()), got {type(params).__name__}"
        )
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    for p in params:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise TypeError(f"{owner}: {name} must contain parameters that require grad, got {_describe(p)}")
        if not p.is_leaf:  # a backward pass stops at it: the parameters it is computed from would get no .grad
            raise ValueError(f"{owner}: {name} must contain leaf tensors (parameters), got one computed by autograd")
        if id(p) in seen or id(p) in shared.ids:
            raise ValueError(f"{owner}: a parameter of {name} is shared or appears twice")
        if p.device != shared.device:
            raise ValueError(f"{owner}: {name} has a parameter on {p.device}, the shared ones are on {shared.device}")
        seen.add(id(p))
    return params


def _describe(value: object) -> str:
    return "a tensor that does not require grad" if isinstance(value, Tensor) else type(value).__name__


def detached_losses(losses: list[Tensor]) -> Tensor:
    """The losses' values as a detached (K,) float64 tensor: one stack and one conversion (two launches on a GPU,
    not one conversion per loss), unless the losses' dtypes differ."""
    values = [loss.detach().reshape(()) for loss in losses]
    if len({v.dtype for v in values}) > 1:
        values = [v.double() for v in values]
    return torch.stack(values).double()


def _grad_scale(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """The scaler's current scale as a device tensor (no host sync), or None when not scaling."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._get_scale_async()  # the device tensor behind get_scale(), which would sync


def backward(
    losses: Sequence[Tensor] | Tensor,
    shared: FlatParameters,
    aggregator: Aggregator,
    *,
    task_params: Iterable[Tensor] | None = None,
    grad_dtype: torch.dtype | None = None,
    representation: Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    nonfinite: NonFinitePolicy | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    layout: Literal["replicated", "sharded"] = "replicated",
    aggregate: bool = True,
    batched: bool = False,
) -> Tensor | None:
    """Compute the K task gradients, aggregate them, and write the result into the shared ``.grad``.

    Then call your own ``optimizer.step()`` (or ``scaler.step(optimizer)``).

    Args:
        losses: K scalar losses from one forward pass (or a (K,) tensor of them).
        shared: the shared parameters, flattened with :class:`~flatmtl_fast.FlatParameters`.
        aggregator: any aggregator of this library (fused or ``flatmtl_fast.reference``).
        task_params: task-specific parameters (heads); they get their ordinary gradient Σ_i ∂L_i/∂θ. An error
            once the backward passes have begun (e.g. a loss that does not reach the shared parameters, a failed
            solve) leaves the shared and task ``.grad`` None and drops any accumulated micro-batches; an argument
            refused before them (a loss that does not require grad, K changing, a shared parameter among
            ``task_params``) changes nothing, like a ``loss.backward()`` that raises.
        grad_dtype: storage of the K × N task-gradient buffer (default: the parameters' dtype;
            ``torch.bfloat16`` halves its memory and traffic).
        representation: the shared features z (MGDA-UB): the weights are computed from the task
            gradients with respect to z instead of the parameters, then one backward pass of
            Σ w_i L_i fills the shared ``.grad``. Gramian aggregators only.
        scaler: a ``torch.amp.GradScaler`` whose ``scale()`` produced the losses: the weights are
            computed from the unscaled Gram (M / s²), the written gradient stays scaled so that
            ``scaler.unscale_`` / ``scaler.step`` treat it like any other gradient. Aggregators whose state keeps
            gradients (DB-MTL) get them unscaled (two more passes over the buffer), and an overflowed step advances
            that state as zero gradients would while ``.grad`` gets NaN for the scaler.
        nonfinite: what a NaN/Inf in a loss or task gradient does. ``"raise"`` (default without a
            scaler): ``FloatingPointError`` before any ``.grad`` is written (one host sync).
            ``"skip"``: one host sync; the shared and task ``.grad`` are set to None so the
            optimizer skips every parameter (its state is untouched) and None is returned.
            ``"propagate"`` (default with a scaler): no sync; the non-finite values reach ``.grad``
            and the scaler's inf check skips the step.
        process_group: aggregate over the ranks of this ``torch.distributed`` group (e.g.
            ``torch.distributed.group.WORLD``): every rank calls ``backward`` with the losses of its own
            batch, and every rank gets the same ``.grad`` — the step of the gradients averaged over ranks
            (for equal batch sizes, the single-process step on the concatenated batch). The non-finite
            policy, the weights and the losses given to the aggregator are the global ones. See
            :mod:`flatmtl_fast.distributed` for the collectives and their bytes. Not with ``representation``.
            With ``DistributedDataParallel``, run the forward pass and this call inside ``ddp.no_sync()``
            (or use the unwrapped module): the task gradients must stay per-rank, the step's reduce-scatter
            averages them, and DDP's own all-reduce must not run on top.
        layout: with ``process_group``: ``"replicated"`` (DDP-style: every rank holds all shared
            parameters; G is reduce-scattered, the Gram all-reduced, ``.grad`` all-gathered, and the task
            parameters' gradients averaged over ranks) or ``"sharded"`` (each rank's ``shared`` is its
            slice of the shared parameters and autograd already yields the globally reduced gradients of
            that slice — FSDP2's ``fully_shard`` or tensor parallel: only the K × K Gram and the losses are
            all-reduced, task parameters are left as autograd and FSDP left them). With FSDP2's DTensor shards
            each task pass runs over the whole graph (the sharded parameters are not in it; FSDP's hooks fill
            their ``.grad``), and ``process_group`` must be the group they are sharded over.
        aggregate: ``False`` accumulates a micro-batch: its task gradients and loss values are added to those
            kept for ``shared``, the shared ``.grad`` is set to None and None is returned (task parameters
            accumulate their ``.grad`` as autograd does). The next call with ``True`` adds its own and aggregates
            the sums once — the step of the whole batch when each micro-batch's losses are divided by the number
            of micro-batches. The non-finite policy then judges the sums ("skip" drops them all). A
            ``grad_dtype`` other than the parameters' rounds once per micro-batch. Not with ``representation``.
        batched: all K task gradients from one vmapped backward pass instead of K passes (see
            :meth:`TaskGradients.capture`): far less host time for models of many small tensors, at the cost of
            K × N more peak memory; slower where the passes are compute-bound (a vmapped matmul is less
            efficient on the CPU). A loss that reaches no shared parameter then gets a zero row, not an error.

    Returns:
        The weights w (device tensor, d = wᵀG) for Gramian aggregators, else None (also when accumulating).

    The shared ``.grad`` is written, not added to: to accumulate micro-batches, pass ``aggregate=False``. Every
    shared parameter gets one (its view of the flat buffer), zero where no loss reaches it, where ``loss.backward()``
    would leave it None: an optimizer with momentum or weight decay still moves such a parameter.
    """
    if not isinstance(shared, FlatParameters):
        raise TypeError(f"backward: shared must be a FlatParameters, got {type(shared).__name__}")
    if not isinstance(aggregator, Aggregator):
        raise TypeError(f"backward: aggregator must be a flatmtl_fast aggregator, got {type(aggregator).__name__}")
    if nonfinite is None:
        nonfinite = "propagate" if _grad_scale(scaler) is not None else "raise"
    if nonfinite not in ("raise", "skip", "propagate"):
        raise ValueError(f"backward: nonfinite must be 'raise', 'skip' or 'propagate', got {nonfinite!r}")
    if layout not in ("replicated", "sharded"):
        raise ValueError(f"backward: layout must be 'replicated' or 'sharded', got {layout!r}")
    for flag, value in (("aggregate", aggregate), ("batched", batched)):
        if not isinstance(value, bool):
            raise TypeError(f"backward: {flag} must be a bool, got {type(value).__name__}")
    check_process_group(process_group, "backward")
    shared.refresh()
    if shared.sharded:
        check_sharded_use(shared.shard_ranks, process_group, layout, "backward", "shared")
        if representation is not None:
            raise ValueError("backward: representation= is not supported with FSDP2's sharded parameters")
    losses = check_losses(losses, shared.device)
    task_params = check_task_params(
        () if task_params is None else task_params, shared, set(), "backward", "task_params"
    )
    scale = _grad_scale(scaler)
    loss_values = detached_losses(losses)
    if scale is not None:
        loss_values = loss_values / scale.double()

    if representation is not None:
        if process_group is not None:
            raise ValueError("backward: representation= is not supported with process_group=")
        kept = shared.kept.get(_KEPT)
        if not aggregate or (kept is not None and kept.pending_losses is not None):
            raise ValueError("backward: representation= does not accumulate micro-batches (aggregate=False)")
        if batched:
            raise ValueError("backward: representation= differentiates with respect to z, not batched=True")
        return _representation_backward(
            losses, shared, aggregator, task_params, representation, loss_values, scale, nonfinite
        )

    kept = _kept_for(shared, len(losses), grad_dtype)
    pending = kept.pending_losses
    try:
        G = kept.gradients.capture(losses, extra_inputs=task_params, add=pending is not None, batched=batched)
        loss_values = loss_values if pending is None else pending + loss_values
        kept.pending_losses = None if aggregate else loss_values
        if not aggregate:
            return None
        return _aggregate(G, shared, aggregator, task_params, loss_values, scale, nonfinite, process_group, layout)
    except BaseException as error:
        # The rows hold part of this call's gradients and task gradients or a partial result may sit in .grad:
        # leave neither behind, so that an optimizer step after a caught error moves nothing.
        kept.pending_losses = None
        clear_grads(shared, task_params)
        if pending is not None:
            error.add_note("backward: the micro-batches accumulated so far (aggregate=False) were dropped")
        raise


def _aggregate(
    G: Tensor,
    shared: FlatParameters,
    aggregator: Aggregator,
    task_params: list[Tensor],
    loss_values: Tensor,
    scale: Tensor | None,
    nonfinite: NonFinitePolicy,
    process_group: torch.distributed.ProcessGroup | None,
    layout: Literal["replicated", "sharded"],
) -> Tensor | None:
    """The aggregation stage of :func:`backward` on the captured (K, N) task gradients ``G``."""
    step = None
    if process_group is not None:
        from ..distributed import DistributedStep  # training's distributed form (same layer)

        step = DistributedStep(G, aggregator, loss_values, group=process_group, layout=layout, task_params=task_params)
        loss_values = step.losses
    if isinstance(aggregator, GramianAggregator):
        M = gram(G, dtype=torch.float64) if step is None else step.gram()
        if not finite_or_skip(nonfinite, M.diagonal(), loss_values, shared, task_params):
            return None
        M = M if scale is None else M / scale.double() ** 2
        if isinstance(aggregator, FusedGramian) or bool(torch.isfinite(M).all()):
            w = aggregator.weights(M, loss_values) if step is None else step.weights(M)
        else:  # "propagate" (a scaler's overflow): the reference solvers refuse such an M, and synchronise anyway
            w = torch.full((M.shape[0],), torch.nan, dtype=torch.float64, device=M.device)
        if step is None:
            combine(w, G, out=shared.bind_grad())
        else:
            step.combine(w, out=shared.bind_grad())
        return w
    row_norms = torch.linalg.vector_norm(G.float(), dim=1) if step is None else step.row_norms()
    if not finite_or_skip(nonfinite, row_norms, loss_values, shared, task_params):
        return None
    out = shared.bind_grad()
    rescale = None
    if scale is not None and aggregator.keeps_gradients:
        rescale, loss_values = _unscale_rows(G if step is None else step.shard, row_norms, loss_values, scale)
    if step is None:
        out.copy_(aggregator(G, loss_values))
    else:
        step.losses = loss_values
        step.apply(out=out)
    if rescale is not None:
        out.mul_(rescale)
    return None


def _unscale_rows(rows: Tensor, row_norms: Tensor, loss_values: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """For an aggregator whose state keeps gradients (DB-MTL's EMA): divide ``rows`` by the scaler's ``scale`` in
    place, so that steps under different scales do not mix in its state, and replace a non-finite step (an
    overflow the scaler will skip) by zero rows and unit losses, which leave its state finite. Returns the factor
    that makes the result scaled again (NaN for the non-finite step, so that the scaler sees it) and the losses."""
    finite = torch.isfinite(torch.cat([row_norms.double(), loss_values])).all()
    rows.mul_((1.0 / scale).to(rows.dtype))
    rows.masked_fill_(~finite, 0.0)
    safe_losses = torch.where(finite, loss_values, 1.0)
    return torch.where(finite, scale, torch.nan), safe_losses


def clear_grads(shared: FlatParameters, task_params: Iterable[Tensor]) -> None:
    """Set the shared and task parameters' ``.grad`` to None: what a failed or skipped step leaves."""
    shared.unbind_grad()
    for p in task_params:
        p.grad = None


def check_process_group(process_group: object, owner: str) -> None:
    """None, or a ``torch.distributed.ProcessGroup`` (else a clear error before any pass or collective)."""
    if process_group is None:
        return
    if not torch.distributed.is_available() or not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(
            f"{owner}: process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD), "
            f"got {type(process_group).__name__}"
        )


def check_sharded_use(
    ranks: tuple[int, ...] | None,
    process_group: torch.distributed.ProcessGroup | None,
    layout: str,
    owner: str,
    name: str,
) -> None:
    """FSDP2's shards: each rank holds only its slice of the (already reduced) gradients, so the Gram (and F-MTL's
    norms) must be summed over exactly the ``ranks`` holding the other slices (:func:`flat.parameters.shard_ranks`):
    over fewer, columns are missing; over HSDP's replicas too, columns count twice."""
    if ranks is None or (process_group is None and len(ranks) == 1):
        return
    if process_group is None or layout != "sharded":
        raise ValueError(
            f"{owner}: {name} holds FSDP2's sharded parameters: pass process_group=<the group they are sharded "
            "over> and layout='sharded' (each rank holds only its slice of them)"
        )
    group_ranks = tuple(sorted(torch.distributed.get_process_group_ranks(process_group)))
    if group_ranks != ranks:
        raise ValueError(
            f"{owner}: {name} is sharded over ranks {list(ranks)}, but process_group holds ranks {list(group_ranks)}: "
            "pass the group of their Shard mesh dimension (with HSDP, mesh['shard'].get_group(), not the replicas')"
        )


def finite_or_skip(
    policy: NonFinitePolicy,
    row_values: Tensor,
    loss_values: Tensor,
    shared: FlatParameters,
    task_params: list[Tensor],
    owner: str = "backward",
) -> bool:
    """Apply the non-finite policy to per-task values (``row_values``: K of them, or several rows of K); False means
    the step was skipped (grads set to None)."""
    if policy == "propagate":
        return True
    finite = torch.isfinite(torch.cat([row_values.reshape(-1), loss_values.reshape(-1)])).all()  # 3 kernels, not 5
    if bool(finite):
        return True
    clear_grads(shared, task_params)  # the optimizer skips parameters without a gradient: its state stays as it was
    if policy == "raise":
        K = loss_values.numel()
        finite_tasks = torch.isfinite(row_values.reshape(-1, K)).all(0) & torch.isfinite(loss_values.reshape(-1))
        bad = (~finite_tasks).nonzero().flatten().tolist()
        raise FloatingPointError(f"{owner}: tasks {bad} have a non-finite loss or gradient; no .grad was written")
    return False


def _representation_backward(
    losses: list[Tensor],
    shared: FlatParameters,
    aggregator: Aggregator,
    task_params: list[Tensor],
    z: Tensor,
    loss_values: Tensor,
    scale: Tensor | None,
    nonfinite: NonFinitePolicy,
) -> Tensor | None:
    if not isinstance(aggregator, GramianAggregator):
        raise ValueError("backward(representation=...): needs a Gramian aggregator (its direction is Σ w_i g_i)")
    if not isinstance(z, Tensor) or not z.requires_grad:
        raise ValueError("backward: representation must be the shared features tensor (requiring grad)")
    Z = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    M = Z.double() @ Z.double().T
    if not finite_or_skip(nonfinite, M.diagonal(), loss_values, shared, task_params):
        return None
    w = aggregator.weights(M if scale is None else M / scale.double() ** 2, loss_values)
    flat_grad = shared.bind_grad()
    flat_grad.zero_()
    weighted = sum(w_i.to(loss.dtype) * loss for w_i, loss in zip(w, losses, strict=True))
    torch.autograd.backward(weighted, inputs=shared.params, retain_graph=bool(task_params))
    if task_params:
        torch.autograd.backward(sum(losses), inputs=task_params)
    return w
