"""One aggregation step over a torch.distributed process group, in the stages of the single-process step."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import primitives
from ..aggregators.base import Aggregator, GramianAggregator
from ..aggregators.checks import check_losses
from ..primitives import checks as primitive_checks
from ..reference.dbmtl import DBMTL
from ..reference.graddrop import GradDrop
from .traffic import DistributedStepError, Traffic, all_reduce_mean, run_collective

Layout = Literal["replicated", "sharded"]
LAYOUTS: tuple[Layout, ...] = ("replicated", "sharded")
#: What every rank must agree on before the heavy collectives run (N only in the replicated layout).
_AGREEMENT_FIELDS = (
    "K", "N", "dtype", "layout", "aggregator", "losses given", "task-parameter scalars", "averaged rows",
    "DB-MTL state's rank − rank",
)  # fmt: skip
_DTYPES = primitive_checks.G_DTYPES


class Aggregation(NamedTuple):
    """The result of :func:`aggregate`."""

    #: The aggregated direction d: (N,) in the replicated layout, this rank's (N_local,) slice when sharded.
    direction: Tensor
    #: The K weights (d = wᵀG, identical on every rank) for Gramian aggregators, else None.
    weights: Tensor | None
    #: The bytes of the step's collectives.
    traffic: Traffic


class DistributedStep:
    """One aggregation step of ``aggregator`` over the ranks of ``group``, stage by stage.

    Construction validates the inputs, checks that every rank runs the same step (unless
    ``check=False``), all-reduces the losses to their mean, and — in the replicated layout — averages
    the task-specific parameters' gradients and reduce-scatters the rows of G not averaged yet. Then,
    for a Gramian aggregator: :meth:`gram` → :meth:`weights` → :meth:`combine`; for GradDrop and DB-MTL:
    :meth:`apply`.
    :func:`aggregate` runs these in order; ``flatmtl_fast.backward(process_group=...)`` runs them with its
    non-finite policy in between. Every rank must construct the step and call the same stages.

    Args:
        G: the K × N task gradients of this rank (replicated layout: from this rank's batch alone;
            sharded layout: K × N_local, this rank's columns of the gradients already averaged over
            ranks, as FSDP's reduce-scatter leaves them). float32, bfloat16 or float16, contiguous rows.
        aggregator: a Gramian aggregator, :class:`~flatmtl_fast.GradDrop` or :class:`~flatmtl_fast.DBMTL`
            (fused or reference), constructed identically on every rank (PCGrad, RLW: equal generator seeds).
        losses: this rank's K losses (needed by loss-based methods); the step uses their mean over ranks.
        group: the process group (default: the global group).
        layout: ``"replicated"`` (DDP-style) or ``"sharded"`` (FSDP-style, tensor parallel).
        task_params: task-specific parameters whose ``.grad`` is averaged over ranks (replicated layout;
            a missing ``.grad`` counts as zero, so every rank ends with one).
        check: run the consistency check (one all-gather of a few integers and one host synchronisation).
        averaged_rows: how many leading rows of G already hold the mean over ranks, identical on every
            rank (F-MTL's clean g_i, all-reduced before its perturbations). In the replicated layout their
            shard is sliced locally instead of reduce-scattered (P ⌈N / P⌉ · itemsize bytes saved a row);
            the sharded layout already treats every row so.
    """

    def __init__(
        self,
        G: Tensor,
        aggregator: Aggregator,
        losses: Tensor | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        layout: Layout = "replicated",
        task_params: Iterable[Tensor] = (),
        check: bool = True,
        averaged_rows: int = 0,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"distributed: aggregator must be a flatmtl_fast aggregator, got {type(aggregator).__name__}"
            )
        if not isinstance(aggregator, GramianAggregator | GradDrop | DBMTL):
            raise TypeError(
                f"distributed: {type(aggregator).__name__} is neither Gramian nor one of the per-coordinate "
                "aggregators that work on a shard of the columns (GradDrop, DBMTL)"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"distributed: layout must be 'replicated' or 'sharded', got {layout!r}")
        # A sharded rank may own no columns (FSDP2's shards of a small model): it still joins every collective.
        K, N, _ = primitive_checks.check_G(G, "distributed", no_columns=layout == "sharded")
        if isinstance(averaged_rows, bool) or not isinstance(averaged_rows, int) or not 0 <= averaged_rows <= K:
            raise ValueError(f"distributed: averaged_rows must be an integer in [0, K = {K}], got {averaged_rows!r}")
        name = type(aggregator).__name__
        check_losses(losses, K, G.device, required=aggregator.needs_losses, owner=f"distributed {name}")
        self.group = _resolve(group)
        self.world_size = dist.get_world_size(self.group)
        self.aggregator = aggregator
        self.layout = layout
        self.traffic = Traffic()
        self._columns = N
        self._gram: Tensor | None = None
        task_params = list(task_params)
        if check:
            check_agreement(
                G,
                aggregator,
                layout,
                self.group,
                self.traffic,
                has_losses=losses is not None,
                task_numel=sum(p.numel() for p in task_params),
                averaged_rows=averaged_rows,
            )
        #: The losses averaged over ranks (float64), or None.
        self.losses = None if losses is None else self._mean(losses.detach().to(torch.float64), "the losses")
        replicated = layout == "replicated" and self.world_size > 1
        if replicated:
            self._average_gradients(task_params, G.device)
        #: This rank's columns of the task gradients averaged over ranks (K × S).
        self.shard = self._reduce_scatter(G, averaged_rows) if replicated else G

    def gram(self) -> Tensor:
        """The K × K float64 Gram of the gradients averaged over ranks (partial Grams, all-reduced)."""
        self._require_gramian("gram")
        if self._gram is None:
            M = primitives.gram(self.shard, dtype=torch.float64)
            self._collective("all_reduce", "sum of the partial Grams", M, op=dist.ReduceOp.SUM)
            self._gram = M
        return self._gram

    def weights(self, M: Tensor | None = None) -> Tensor:
        """The aggregator's weights from ``M`` (default :meth:`gram`) and the mean losses, solved on every
        rank (stateful aggregators stay in step) and then replaced by rank 0's: identical bit for bit."""
        self._require_gramian("weights")
        return self.broadcast(self.aggregator.weights(self.gram() if M is None else M, self.losses))

    def broadcast(self, w: Tensor) -> Tensor:
        """A copy of rank 0's ``w`` on every rank (K numbers): weights solved on every rank made identical,
        also for callers that solve several aggregators on blocks of :meth:`gram` (F-MTL's [g; h] rows)."""
        w = w.contiguous().clone()
        root = dist.get_global_rank(self.group, 0)
        self._collective("broadcast", "broadcast of rank 0's weights", w, src=root)
        return w

    def combine(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """d = wᵀG: this rank's shard, then (replicated layout) all-gathered into ``out`` (N,); sharded
        layout: this rank's slice (N_local,). ``out`` may be a flat ``.grad``; a new tensor when None."""
        self._require_gramian("combine")
        return self._finish(out, lambda local: primitives.combine(w, self.shard, out=local))

    def apply(self, out: Tensor | None = None) -> Tensor:
        """GradDrop / DB-MTL on this rank's shard, then gathered as in :meth:`combine`.

        GradDrop's rule is per coordinate, so its shard-local result is GradDrop of the averaged gradients.
        DB-MTL's EMA is per coordinate too (its buffer is sharded with G), but α_i = max_j ‖B_j‖ / ‖B_i‖
        needs the global norms: their squares are all-reduced (K numbers) and the shard recombined.
        """
        if isinstance(self.aggregator, GramianAggregator):
            raise TypeError(f"distributed: {type(self.aggregator).__name__} is Gramian: use weights() and combine()")

        def local(buffer: Tensor) -> Tensor:
            dbmtl = isinstance(self.aggregator, DBMTL) and self.world_size > 1  # one rank: α already is global
            if self.shard.shape[1] == 0:  # no columns here; the norms' all-reduce still needs this rank
                if dbmtl:
                    self._rebalance(torch.empty(self.shard.shape, dtype=torch.float32, device=buffer.device))
                return buffer
            d = self.aggregator(self.shard, self.losses)
            if dbmtl:
                d = self._rebalance(self.aggregator.buffer)
                self.aggregator.rank = dist.get_rank(self.group)  # whose columns the buffer now holds
            return buffer.copy_(d)

        return self._finish(out, local)

    def row_norms(self) -> Tensor:
        """The K norms (float64) of the rows of the gradients averaged over ranks (for finiteness checks)."""
        squared = torch.linalg.vector_norm(self.shard, dim=1, dtype=torch.float64).square()
        self._collective("all_reduce", "sum of the squared row norms", squared, op=dist.ReduceOp.SUM)
        return squared.sqrt()

    def _require_gramian(self, stage: str) -> None:
        if not isinstance(self.aggregator, GramianAggregator):
            raise TypeError(f"distributed: {stage}() needs a Gramian aggregator, got {type(self.aggregator).__name__}")

    def _collective(self, kind: str, what: str, tensor: Tensor, *args: Tensor, **kwargs: object) -> None:
        """Run collective ``kind`` on ``tensor`` (its first argument: the output of gathers and scatters), counting
        the bytes of the whole tensor it is over (the input of a reduce-scatter, which is ``args[0]``)."""
        whole = args[0] if kind == "reduce_scatter" else tensor
        run_collective(
            kind, what, self.traffic, whole.numel() * whole.element_size(), self.group, tensor, *args, **kwargs
        )

    def _mean(self, values: Tensor, what: str) -> Tensor:
        return all_reduce_mean(values.contiguous().clone(), what, self.traffic, self.group)

    def _average_gradients(self, params: list[Tensor], device: torch.device) -> None:
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        averaged = self._mean(flat.to(device), "the task-specific parameters' gradients")
        for p, piece in zip(params, averaged.split([p.numel() for p in params]), strict=True):
            piece = piece.view_as(p)
            if p.grad is None:
                p.grad = piece.to(p.dtype, copy=True)
            else:
                p.grad.copy_(piece)

    def _reduce_scatter(self, G: Tensor, averaged_rows: int) -> Tensor:
        """Rank r's columns [r S, (r + 1) S) of the mean of G over ranks, S = ⌈N / P⌉, zero-padded past N.

        The first ``averaged_rows`` rows already are that mean: their columns are copied locally. The others
        are reduce-scattered, one collective per row. A row of G is contiguous, so it is reduce-scattered in
        place when P divides N; otherwise it goes through one zero-padded staging row (the padding contributes
        nothing to the Gram or to d). Row by row rather than one (P, K, S) collective: that layout would need
        a copy of all of G. A float16 row is divided by P before the sum, through the staging row (P times a
        float16 gradient may overflow where the mean does not; DDP divides first too).
        """
        K, N = G.shape
        P = self.world_size
        S = -(-N // P)
        shard = torch.empty(K, S, dtype=G.dtype, device=G.device)
        start = dist.get_rank(self.group) * S
        width = max(0, min(S, N - start))  # the last ranks' columns may run past N (or start past it)
        shard[:averaged_rows, :width].copy_(G[:averaged_rows, start : start + width])
        shard[:averaged_rows, width:].zero_()
        predivide = G.dtype == torch.float16
        staged = predivide or S * P != N
        padded = torch.zeros(S * P, dtype=G.dtype, device=G.device) if staged else None
        for k in range(averaged_rows, K):
            row = G[k]
            if padded is not None:
                # Reused for every row: the collectives are synchronous, so the previous one has read it.
                if predivide:
                    torch.div(row, P, out=padded[:N])
                else:
                    padded[:N].copy_(row)
                row = padded
            self._collective("reduce_scatter", f"reduce-scatter of task gradient {k}", shard[k], row)
        if not predivide:
            shard[averaged_rows:].div_(P)
        return shard

    def _rebalance(self, buffer: Tensor) -> Tensor:
        """DB-MTL's d = αᵀB over this rank's columns of B, with α from the norms of the whole buffer."""
        squared = torch.linalg.vector_norm(buffer, dim=1, dtype=torch.float64).square()
        self._collective("all_reduce", "sum of DB-MTL's squared buffer norms", squared, op=dist.ReduceOp.SUM)
        norms = squared.sqrt()
        alpha = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        return alpha.to(buffer.dtype) @ buffer

    def _finish(self, out: Tensor | None, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Write this rank's shard result by ``compute(buffer)`` and, in the replicated layout, all-gather it."""
        local_columns = self.shard.shape[1]
        if self.layout == "sharded" or self.world_size == 1:
            return compute(self._output(out, local_columns))
        N = self._columns
        out = self._output(out, N)
        local = compute(torch.empty(local_columns, dtype=out.dtype, device=out.device))
        padded = local_columns * self.world_size != N
        target = torch.empty(local_columns * self.world_size, dtype=out.dtype, device=out.device) if padded else out
        self._collective("all_gather", "all-gather of the aggregated gradient", target, local)
        if padded:
            out.copy_(target[:N])
        return out

    def _output(self, out: Tensor | None, n: int) -> Tensor:
        if out is None:
            return torch.empty(n, dtype=self.shard.dtype, device=self.shard.device)
        if not isinstance(out, Tensor):
            raise TypeError(f"distributed: out must be a torch.Tensor of shape ({n},), got {type(out).__name__}")
        if out.shape != (n,) or out.dtype not in _DTYPES or out.device != self.shard.device:
            raise ValueError(
                f"distributed: out must have shape ({n},), a dtype among {_DTYPES} and device {self.shard.device} "
                f"({self.layout} layout), got shape {tuple(out.shape)}, {out.dtype} on {out.device}"
            )
        if n > 1 and out.stride(0) != 1:
            raise ValueError(f"distributed: out must be contiguous, got stride {out.stride()}")
        return out


def check_agreement(
    G: Tensor,
    aggregator: Aggregator,
    layout: Layout,
    group: dist.ProcessGroup,
    traffic: Traffic,
    *,
    has_losses: bool,
    task_numel: int,
    averaged_rows: int,
) -> None:
    """One all-gather of a few integers (counted into ``traffic``): ranks whose steps would run different
    collectives all raise :class:`DistributedStepError` here instead of hanging or failing in one of them. Run by
    :class:`DistributedStep` (unless ``check=False``), and by callers that communicate before building it (F-MTL)."""
    K, N = G.shape
    # The class decides the sequence of collectives; the hyperparameters, GradDrop's and DB-MTL's shard-local
    # directions (a Gramian step takes rank 0's weights, but differing settings are a bug there too). Not the
    # repr: tensors in it name each rank's device.
    cls = type(aggregator)
    settings = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in aggregator._hyperparameters().items()}
    fingerprint = zlib.crc32(f"{cls.__module__}.{cls.__qualname__}{sorted(settings.items())!r}".encode())
    values = [K, N, _DTYPES.index(G.dtype), LAYOUTS.index(layout), fingerprint, int(has_losses), task_numel]
    world_size = dist.get_world_size(group)
    # DB-MTL's buffer holds its rank's columns (tagged by DistributedStep.apply): 0 on every rank unless some rank
    # loaded another's state, e.g. rank 0's checkpoint everywhere — which would mix the columns silently.
    held = aggregator.rank if isinstance(aggregator, DBMTL) and world_size > 1 else None
    state_offset = 0 if held is None else held - dist.get_rank(group)
    mine = torch.tensor([*values, averaged_rows, state_offset], dtype=torch.int64, device=G.device)
    everyone = torch.empty(world_size * mine.numel(), dtype=torch.int64, device=G.device)
    nbytes = everyone.numel() * everyone.element_size()
    run_collective("check", "consistency check", traffic, nbytes, group, everyone, mine)
    rows = everyone.view(world_size, -1).tolist()
    differ = [
        i
        for i, field in enumerate(_AGREEMENT_FIELDS)
        if len({row[i] for row in rows}) > 1 and not (field == "N" and layout == "sharded")
    ]
    if differ:
        shown = {2: lambda v: str(_DTYPES[v]), 3: lambda v: LAYOUTS[v], 4: lambda v: f"hash {v:08x}"}
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{_AGREEMENT_FIELDS[i]}={shown.get(i, str)(row[i])}" for i in differ)
            for r, row in enumerate(rows)
        )
        raise DistributedStepError(
            f"flatmtl_fast.distributed: the ranks disagree on the step ({per_rank}). Every rank must pass the "
            "same K, dtype, layout, aggregator (class and hyperparameters), losses or none, task parameters, "
            f"averaged rows and, in the replicated layout, N, and a DB-MTL aggregator must hold its own rank's state "
            f"(load each rank's own state_dict) (this rank's aggregator: {aggregator!r}). Nothing was communicated "
            "beyond this check"
        )


def aggregate(
    G: Tensor,
    aggregator: Aggregator,
    *,
    losses: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "replicated",
    out: Tensor | None = None,
    check: bool = True,
    averaged_rows: int = 0,
) -> Aggregation:
    """Aggregate the task gradients of all ranks of ``group``: every rank calls it with its own G.

    Replicated layout: the direction of the gradients averaged over ranks (what one process would get
    on the concatenated batch, for equal per-rank batch sizes), written into ``out`` (N,) on every
    rank. Sharded layout: G holds this rank's columns of the averaged gradients, ``out`` receives the
    same columns of the direction. See :class:`DistributedStep` for the arguments and the stages.
    """
    step = DistributedStep(G, aggregator, losses, group=group, layout=layout, check=check, averaged_rows=averaged_rows)
    if isinstance(aggregator, GramianAggregator):
        w = step.weights()
        return Aggregation(step.combine(w, out), w, step.traffic)
    return Aggregation(step.apply(out), None, step.traffic)


def _resolve(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "flatmtl_fast.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("flatmtl_fast.distributed: this process is not a member of the given process group")
    return group
