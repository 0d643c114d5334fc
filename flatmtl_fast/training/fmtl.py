"""F-MTL (Phan et al., arXiv 2211.13723): per-task sharpness-aware minimisation around any aggregator.

One step (algorithms.md §1.1): a clean forward and K backward passes give g_i (shared) and the head
gradients; each task i then perturbs the shared parameters by ε_i = ρ T² ⊙ g_i / ‖T ⊙ g_i‖ (T = |θ| with
``adaptive``, else 1) and its own head likewise, runs one forward and the backward of L_i alone, and the
weights are restored. The shared direction is d = Agg({g_i}) + Agg({h_i}) with h_i = s_i − g_i (or
Agg({s_i}) for the "a" variant); each head takes its own SAM gradient.

Fused path (a fused Gramian aggregator): the rows g_1…g_K and h_1…h_K share one 2K × N buffer. h_i is
accumulated by autograd straight onto −g_i, so it is never formed from s_i and g_i afterwards, and its
Gram does not suffer the cancellation of M_ss − M_sg − M_gs + M_gg when ρ is small. One ``gram`` pass
over the 2K rows gives both K × K Grams, two solves give a and b, and one ``combine`` of the 2K rows
with [a; b] writes d into the flat ``.grad``. Norms, perturbation and restore are single passes whose
scales stay on the device.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..aggregators._fused import FusedGramian
from ..aggregators.base import Aggregator, GramianAggregator
from ..aggregators.checks import check_real, check_state_keys
from ..distributed import DistributedStep, Traffic
from ..distributed.aggregate import check_agreement
from ..distributed.traffic import all_reduce_mean, run_collective
from ..flat import FlatParameters, TaskGradients
from ..flat.parameters import DTensor, check_not_gathered, local_tensor, shard_ranks
from ..primitives import combine, gram, perturb, row_norms
from ..primitives.checks import check_flag
from .backward import (
    NonFinitePolicy,
    check_losses,
    check_process_group,
    check_sharded_use,
    check_task_params,
    clear_grads,
    detached_losses,
    finite_or_skip,
)

Closure = Callable[[], Sequence[Tensor] | Tensor]


class FMTL:
    """Per-task flat-minima MTL step around ``aggregator``: fills ``.grad``, then call your optimizer.

    Usage::

        fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=0.05,
                                 task_params=[head.parameters() for head in model.heads], model=model)
        for x, y in loader:
            optimizer.zero_grad()
            losses = fmtl.step(lambda: model.losses(x, y))   # K + 1 forwards, 2K backwards
            optimizer.step()

    Args:
        shared: the shared parameters (:class:`~flatmtl_fast.FlatParameters`).
        aggregator: any aggregator of this library. Fused Gramian aggregators take the fused path
            (module docstring); the others (``flatmtl_fast.reference``, GradDrop, DB-MTL) are called
            literally on the g and h rows. A deep copy aggregates the h rows, so stateful methods
            (Nash-MTL warm starts, GradVac targets, generators) keep one state per family of rows.
        rho: the SAM radius ρ > 0 of the shared parameters.
        adaptive: ASAM's element-wise scale T = |θ|.
        normalize: ``"separate"`` (default): the shared part and task i's head each get radius ρ
            (``rho_task`` for heads); ``"joint"``: one norm over the shared part and task i's head
            together, as the official Multi-MNIST script.
        variant: ``"flat"`` (default): d = Agg(g) + Agg(h); ``"a"``: d = Agg(s).
        task_params: one iterable of parameters per task (its head), perturbed with its own radius
            and given its SAM gradient ∂L_i/∂θ_i at the perturbed point. Parameters of task i only
            receive gradient from L_i. Required with FSDP2's shards, whose passes reach every parameter
            of the graph: any other parameter the losses reach would sum the gradients of all 2K passes.
        rho_task: the heads' radius under ``"separate"`` (default ρ).
        model: the module whose BatchNorm running statistics must not see the perturbed passes (they
            are saved before each perturbed forward and restored after it).
        nonfinite: a NaN/Inf loss, gradient or perturbation norm, clean or perturbed: ``"raise"`` (default,
            ``FloatingPointError``, every ``.grad`` None and the aggregators' state untouched; one host sync per
            step, after the perturbed passes), ``"skip"`` (one sync; ``.grad`` set to None, :meth:`step` returns
            None) or ``"propagate"`` (no sync). With a process group the perturbed passes are judged by their
            shared gradients (the all-reduced Gram): their losses and the heads' SAM gradients are per rank.
        eps: added to every norm before dividing (a zero gradient is not perturbed).
        process_group: run the step over the ranks of this ``torch.distributed`` group (Gramian
            aggregators). ``"replicated"`` layout (DDP-style, each rank its own batch; use the module inside
            ``no_sync()``): the clean g_i are all-reduced (their mean: every rank perturbs by the ε_i of the
            whole batch, as one process would) and the heads' clean gradients averaged; after the perturbed
            passes the rows [g; h] go through :class:`~flatmtl_fast.distributed.DistributedStep` with the g
            rows marked as averaged, so only the h rows are reduce-scattered (each rank slices its shard of
            g locally), then the 2K × 2K Gram all-reduce, the combine of the shard and the all-gather of d;
            the heads' SAM gradients are averaged. ``"sharded"`` (each rank owns a slice of the shared
            parameters, with the averaged gradient of that slice: tensor parallel, or FSDP2's ``fully_shard``
            with ``process_group`` the group it shards over): only the squared norms (K for the shared
            slices, K for the heads' FSDP2 shards) and the 2K × 2K Gram are all-reduced; each rank perturbs
            its own shards, which FSDP gathers at the next forward. The result equals the single-process
            step on the concatenated batch. With one rank the O(N) collectives are skipped.
        layout: see ``process_group``.

    Bytes per step over P > 1 ranks (counted in :attr:`traffic`; b the shared gradients' itemsize, N_pad
    = P ⌈N / P⌉, H the heads' parameters of itemsize b_H): replicated: all-reduce K N b (clean g) + 2 H b_H
    (heads) + 8 (2K)² (Gram) + 24 K (losses), reduce-scatter K N_pad b (h only), all-gather N_pad b,
    broadcast 16 K (weights), plus the step's consistency check (64 P). Under ring algorithms one rank
    sends ≈ (P − 1)/P · (3K + 1) N b, against (P − 1)/P · 4K N b for an all-reduce of the 2K × N rows
    [g; h] (reduce-scattering the already averaged g rows again would make it (4K + 1), more than that).
    K = 3, N = 1001, P = 3, float32: the O(N) collectives send 2/3 · (2 · 12 012 + 12 024 + 4 008) = 26 704
    bytes per rank, against 32 032 for the all-reduce of [g; h] (and 34 720 with the g rows reduce-scattered
    again). Sharded: 8 (2K)² + 40 K (losses, norms) + 16 K + 64 P, independent of N.

    Attributes:
        traffic: the bytes of the last step's collectives (:class:`~flatmtl_fast.distributed.Traffic`),
            None without a process group.
    """

    def __init__(
        self,
        shared: FlatParameters,
        aggregator: Aggregator,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        normalize: Literal["separate", "joint"] = "separate",
        variant: Literal["flat", "a"] = "flat",
        task_params: Sequence[Iterable[Tensor]] | None = None,
        rho_task: float | None = None,
        model: nn.Module | None = None,
        nonfinite: NonFinitePolicy = "raise",
        eps: float = 1e-12,
        process_group: torch.distributed.ProcessGroup | None = None,
        layout: Literal["replicated", "sharded"] = "replicated",
    ) -> None:
        if not isinstance(shared, FlatParameters):
            raise TypeError(f"FMTL: shared must be a FlatParameters, got {type(shared).__name__}")
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"FMTL: aggregator must be a flatmtl_fast aggregator, got {type(aggregator).__name__}")
        self.rho = check_real(rho, "FMTL", "rho", above=0.0)
        if normalize not in ("separate", "joint"):
            raise ValueError(f"FMTL: normalize must be 'separate' or 'joint', got {normalize!r}")
        if rho_task is not None and normalize == "joint":
            raise ValueError("FMTL: rho_task is the heads' radius under normalize='separate'; 'joint' uses rho alone")
        self.rho_task = self.rho if rho_task is None else check_real(rho_task, "FMTL", "rho_task", above=0.0)
        if variant not in ("flat", "a"):
            raise ValueError(f"FMTL: variant must be 'flat' or 'a', got {variant!r}")
        if nonfinite not in ("raise", "skip", "propagate"):
            raise ValueError(f"FMTL: nonfinite must be 'raise', 'skip' or 'propagate', got {nonfinite!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"FMTL: model must be an nn.Module (for its BatchNorm layers), got {type(model).__name__}")
        self.shared = shared
        self.aggregator = aggregator
        self.flat_aggregator = copy.deepcopy(aggregator) if variant == "flat" else None
        self.adaptive = check_flag(adaptive, "FMTL", "adaptive")
        self.normalize = normalize
        self.variant = variant
        self.task_params = None if task_params is None else _task_parameters(task_params, shared)
        check_sharded_use(shared.shard_ranks, process_group, layout, "FMTL", "shared")
        if shared.sharded and task_params is None:
            # Its passes run over the whole graph (FSDP's parameters are not in it): a head left out would sum the
            # gradients of all 2K passes.
            raise ValueError("FMTL: with FSDP2's sharded parameters, pass task_params (every head's parameters)")
        heads = self.task_params or []
        check_not_gathered(
            ((f"task_params[{i}][{j}]", p) for i, head in enumerate(heads) for j, p in enumerate(head)), "FMTL"
        )
        head_ranks = shard_ranks(_flatten(heads), "FMTL", "task_params")
        check_sharded_use(head_ranks, process_group, layout, "FMTL", "task_params")
        self.model = model
        self.nonfinite: NonFinitePolicy = nonfinite
        self.eps = check_real(eps, "FMTL", "eps", above=0.0)
        if layout not in ("replicated", "sharded"):
            raise ValueError(f"FMTL: layout must be 'replicated' or 'sharded', got {layout!r}")
        check_process_group(process_group, "FMTL")
        if process_group is not None and not isinstance(aggregator, GramianAggregator):
            raise TypeError(
                f"FMTL: with a process_group the aggregator must be Gramian, got {type(aggregator).__name__}"
            )
        self.process_group = process_group
        self.layout = layout
        self.traffic: Traffic | None = None
        self._rows: TaskGradients | None = None
        self._theta = torch.empty(0)

    @property
    def num_tasks(self) -> int | None:
        """K, once known (from ``task_params`` or the first step)."""
        if self._rows is not None:
            return self._rows.num_tasks // 2
        return None if self.task_params is None else len(self.task_params)

    def step(self, closure: Closure) -> Tensor | None:
        """Run one F-MTL step and leave the gradients in ``.grad`` (shared and heads); weights unchanged.

        ``closure()`` runs a fresh forward pass on the batch (with grad enabled) and returns the K task
        losses (a sequence of scalars or a 1-D tensor). It is called K + 1 times. Returns the clean
        losses (a detached (K,) tensor, float32, or float64 for float64 parameters), or None when
        ``nonfinite="skip"`` skipped the step.
        """
        if not callable(closure):
            got = type(closure).__name__
            raise TypeError(f"FMTL.step: closure must be a callable returning the K losses, got {got}")
        self.shared.refresh()
        for i, head in enumerate(self.task_params or []):
            if not all(p.requires_grad for p in head):
                raise ValueError(
                    f"FMTL.step: a parameter of task_params[{i}] no longer requires grad (frozen after this FMTL was "
                    "built): build a new FMTL without it"
                )
        try:
            return self._step(closure)
        except BaseException:
            # .grad may hold a buffer row or a head's partial SAM gradient: an optimizer step after the caught error
            # must move nothing (the weights themselves are restored by _step).
            clear_grads(self.shared, _flatten(self.task_params or []))
            raise

    def _step(self, closure: Closure) -> Tensor | None:
        shared = self.shared
        losses = self._losses(closure, "the first call")
        K = len(losses)
        rows = self._buffer(K)
        heads = self.task_params or [[] for _ in range(K)]
        loss_values = detached_losses(losses)

        for i, loss in enumerate(losses):  # clean gradients g_i, and each head's ∂L_i/∂θ_i
            _clear_grads(heads[i])
            inputs = shared.backward_inputs(heads[i])
            rows.capture_row(i, loss, inputs, retain_graph=i < K - 1, name=f"loss {i}")
        del losses
        G = rows.buffer[:K]
        with torch.no_grad():  # FSDP2's heads: this rank's shards of their (averaged) gradients
            head_grads = [[local_tensor(_grad_or_zeros(p)) for p in head] for head in heads]
        all_heads = _flatten(heads)
        if self.process_group is not None:
            self.traffic = Traffic()
            # Before the first collective: ranks that disagree on K, N, ... raise here, not in a mismatched collective.
            check_agreement(
                rows.buffer,
                self.aggregator,
                self.layout,
                self.process_group,
                self.traffic,
                has_losses=True,
                task_numel=sum(p.numel() for p in all_heads),
                averaged_rows=K,
            )
            loss_values = self._all_reduce(loss_values, "the losses", mean=True)
            if self.layout == "replicated" and torch.distributed.get_world_size(self.process_group) > 1:
                # Every rank perturbs by the ε_i of the whole batch (and the step then slices these g rows).
                self._all_reduce(G, "the clean task gradients", mean=True)
                for grads in head_grads:
                    for g in grads:
                        self._all_reduce(g, "a head's clean gradient", mean=True)

        theta, perturbed = self._backup()
        shared_norms = row_norms(G, weight=theta if self.adaptive else None)
        # Each head's squared norm: the part over FSDP2's shards (summed over the ranks), and the rest.
        head_shards, head_rest = torch.stack(
            [self._head_squares(head, grads) for head, grads in zip(heads, head_grads, strict=True)]
        ).unbind(1)
        if self.process_group is not None and self.layout == "sharded":  # norms over every rank's slice
            squares = torch.stack([shared_norms.square(), head_shards])
            shared_norms, head_shards = self._all_reduce(squares, "the slices' squared norms").unbind()
            shared_norms = shared_norms.sqrt()
        head_norms = (head_shards + head_rest).sqrt()
        if self.normalize == "joint":
            shared_scale = head_scale = self.rho / (torch.sqrt(shared_norms**2 + head_norms**2) + self.eps)
        else:
            shared_scale = self.rho / (shared_norms + self.eps)
            head_scale = self.rho_task / (head_norms + self.eps)

        perturbed_losses: list[Tensor] = []
        try:
            for i in range(K):  # SAM gradient of task i at θ + ε_i: row K + i holds h_i = s_i − g_i (or s_i)
                perturb(theta, G[i], shared_scale[i : i + 1], out=perturbed, adaptive=self.adaptive)
                if perturbed is not shared.data:
                    shared.write_values(perturbed)
                head_backup = _perturb_head(heads[i], head_grads[i], head_scale[i], self.adaptive)
                # Inside the caller's autocast region, its cast copies of the parameters would keep the old values.
                torch.clear_autocast_cache()
                try:
                    _clear_grads(heads[i])
                    # The statistics are restored after the backward pass, which reads the saved ones.
                    with _frozen_batchnorm(self.model):
                        loss = self._losses(closure, f"perturbed call {i + 1}", expected=K)[i]
                        perturbed_losses.append(loss.detach().reshape(()))
                        subtract = G[i] if self.variant == "flat" else None
                        inputs = shared.backward_inputs(heads[i])
                        rows.capture_row(K + i, loss, inputs, retain_graph=False, subtract=subtract, name=f"loss {i}")
                finally:
                    with torch.no_grad():
                        for value, saved in head_backup:
                            value.copy_(saved)
        finally:
            shared.write_values(theta)  # bit-exact restore
            if shared.data is not None:
                torch.autograd.graph.increment_version(shared.data)
            torch.clear_autocast_cache()

        # The non-finite policy, once for the whole step (one host sync), before any state moves: the clean losses
        # and norms, and the perturbed passes, whose h rows the aggregation hands over (their Gram diagonal or norms).
        # "propagate" checks nothing, so it gathers none of these values.
        def finite(h_values: Callable[[], Tensor]) -> bool:
            if self.nonfinite == "propagate":
                return True
            per_task = [shared_norms + head_norms, h_values().double()]  # rows of K values
            if self.process_group is None:  # the perturbed losses and heads' SAM gradients are this rank's alone
                with torch.no_grad():
                    sam = [self._head_squares(head, [_grad_or_zeros(p) for p in head]).sum() for head in heads]
                per_task += [torch.stack(perturbed_losses).double(), torch.stack(sam)]
            return finite_or_skip(self.nonfinite, torch.stack(per_task), loss_values, shared, all_heads, "FMTL.step")

        if self.process_group is None:
            done = self._aggregate(rows.buffer, loss_values, finite)
        else:
            done = self._aggregate_distributed(rows.buffer, loss_values, all_heads, finite)
        if not done:
            return None
        return loss_values if shared.dtype == torch.float64 else loss_values.float()

    def _all_reduce(self, tensor: Tensor, what: str, *, mean: bool = False) -> Tensor:
        """Sum (or average) ``tensor`` over the group in place, counted into :attr:`traffic`."""
        if mean:
            return all_reduce_mean(tensor, f"F-MTL {what}", self.traffic, self.process_group)
        nbytes = tensor.numel() * tensor.element_size()
        sum_op = torch.distributed.ReduceOp.SUM
        run_collective(
            "all_reduce", f"F-MTL sum of {what}", self.traffic, nbytes, self.process_group, tensor, op=sum_op
        )
        return tensor

    def _aggregate_distributed(
        self, rows: Tensor, loss_values: Tensor, heads: list[Tensor], finite: Callable[[Callable[[], Tensor]], bool]
    ) -> bool:
        """The fused aggregation of the [g; h] rows over the group; the g rows already are the mean over
        ranks (replicated layout: all-reduced before the perturbations), so the step slices their shard."""
        K = rows.shape[0] // 2
        # One loss per row for the step's checks; the weights use the losses already averaged over ranks.
        row_losses = torch.cat([loss_values, loss_values])
        step = DistributedStep(
            rows,
            self.aggregator,
            row_losses,
            group=self.process_group,
            layout=self.layout,
            task_params=heads,
            averaged_rows=K,
            check=False,  # checked before the step's first collective
        )
        try:
            M = step.gram()
            if not finite(lambda: M.diagonal()[K:]):
                return False
            if self.variant == "a":  # d = Agg(s): the g rows take weight 0
                b = self.aggregator.weights(M[K:, K:], loss_values)
                a = torch.zeros_like(b)
            else:
                a = self.aggregator.weights(M[:K, :K], loss_values)
                b = self.flat_aggregator.weights(M[K:, K:], loss_values)
            step.combine(step.broadcast(torch.cat([a, b])), out=self.shared.bind_grad())
            return True
        finally:  # a skipped step's bytes too
            self.traffic += step.traffic

    def _aggregate(self, rows: Tensor, loss_values: Tensor, finite: Callable[[Callable[[], Tensor]], bool]) -> bool:
        """d into the flat ``.grad``; False (nothing written) where ``finite`` (given how to read the h rows' values:
        norms or Gram diagonal) skips the step."""
        K = rows.shape[0] // 2
        if isinstance(self.aggregator, FusedGramian):
            M = gram(rows[K:] if self.variant == "a" else rows, dtype=torch.float64)
            if not finite(lambda: M.diagonal()[-K:]):
                return False
            if self.variant == "a":
                combine(self.aggregator.weights(M, loss_values), rows[K:], out=self.shared.bind_grad())
                return True
            a = self.aggregator.weights(M[:K, :K], loss_values)
            b = self.flat_aggregator.weights(M[K:, K:], loss_values)
            combine(torch.cat([a, b]), rows, out=self.shared.bind_grad())
            return True
        if not finite(lambda: row_norms(rows[K:])):
            return False
        out = self.shared.bind_grad()
        if self.variant == "a":
            out.copy_(self.aggregator(rows[K:], loss_values))
            return True
        out.copy_(self.aggregator(rows[:K], loss_values))
        out.add_(self.flat_aggregator(rows[K:], loss_values))
        return True

    def _backup(self) -> tuple[Tensor, Tensor]:
        """θ, the shared parameters' values (this rank's shards) copied into a reused (N,) vector, and where the
        perturbed values go: the flat parameters themselves, or for sharded ones a second reused vector that is
        then copied shard by shard."""
        shared = self.shared
        shape = (1 if shared.data is not None else 2, shared.numel)
        if self._theta.shape != shape or self._theta.device != shared.device or self._theta.dtype != shared.dtype:
            # On the weights' device: the backup never leaves the GPU.
            self._theta = torch.empty(shape, dtype=shared.dtype, device=shared.device)
        theta = shared.read_values(self._theta[0])
        return theta, self._theta[1] if shared.data is None else shared.data

    def _head_squares(self, head: list[Tensor], grads: list[Tensor]) -> Tensor:
        """‖T ⊙ g‖² over one head's parameters, as (the part over DTensor shards, the rest) (float64 (2,))."""
        shards = rest = torch.zeros((), dtype=torch.float64, device=self.shared.device)
        with torch.no_grad():  # one running sum each: no indexed writes per parameter (launches on a GPU)
            for p, g in zip(head, grads, strict=True):
                scaled = g.double() * local_tensor(p).double() if self.adaptive else g.double()
                if isinstance(p, DTensor):
                    shards = shards + scaled.square().sum()
                else:
                    rest = rest + scaled.square().sum()
        return torch.stack([shards, rest])

    def _losses(self, closure: Closure, call: str, expected: int | None = None) -> list[Tensor]:
        with torch.enable_grad():
            losses = closure()
        losses = check_losses(losses, self.shared.device, owner=f"FMTL.step: the closure's {call}")
        K = len(losses) if expected is None else expected
        if len(losses) != K or (self.num_tasks is not None and len(losses) != self.num_tasks):
            raise ValueError(
                f"FMTL.step: the closure's {call} returned {len(losses)} losses, expected {self.num_tasks or K} "
                "(one per task, the same number at every call)"
            )
        return losses

    def _buffer(self, K: int) -> TaskGradients:
        if self._rows is None or not self._rows.fits():
            self._rows = TaskGradients(self.shared, 2 * K)
        return self._rows

    def state_dict(self) -> dict[str, Any]:
        """The aggregators' states (the one of g and, for ``variant="flat"``, the one of h)."""
        state = {"aggregator": self.aggregator.state_dict()}
        if self.flat_aggregator is not None:
            state["flat_aggregator"] = self.flat_aggregator.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the states saved by :meth:`state_dict` (of an FMTL of the same ``variant``)."""
        expected = ["aggregator"] if self.flat_aggregator is None else ["aggregator", "flat_aggregator"]
        check_state_keys(state, expected, "FMTL.load_state_dict")
        pairs = [(self.aggregator, state["aggregator"])]
        if self.flat_aggregator is not None:
            pairs.append((self.flat_aggregator, state["flat_aggregator"]))
        for aggregator, entry in pairs:  # both checked before either is set: a refused state changes nothing
            aggregator._check_state(entry)
        for aggregator, entry in pairs:
            aggregator.load_state_dict(entry)

    def reset(self) -> None:
        """Forget the aggregators' states (Nash-MTL warm starts, GradVac targets, ...) and the number of tasks
        (unless fixed by ``task_params``): the next step is a first one, with any K."""
        self._rows = None
        self.aggregator.reset()
        if self.flat_aggregator is not None:
            self.flat_aggregator.reset()

    def __repr__(self) -> str:
        return (
            f"FMTL({self.aggregator!r}, rho={self.rho}, adaptive={self.adaptive}, normalize={self.normalize!r}, "
            f"variant={self.variant!r})"
        )


def _task_parameters(task_params: Sequence[Iterable[Tensor]], shared: FlatParameters) -> list[list[Tensor]]:
    if isinstance(task_params, (Tensor, nn.Module)) or not isinstance(task_params, Sequence):
        raise TypeError("FMTL: task_params must be a sequence with one iterable of parameters per task")
    if not task_params:
        raise ValueError("FMTL: task_params is empty: give one iterable of parameters per task, or None for no heads")
    seen: set[int] = set()
    return [check_task_params(head, shared, seen, "FMTL", f"task_params[{i}]") for i, head in enumerate(task_params)]


def _flatten(heads: list[list[Tensor]]) -> list[Tensor]:
    return [p for head in heads for p in head]


def _clear_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def _grad_or_zeros(p: Tensor) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _perturb_head(
    head: list[Tensor], grads: list[Tensor], scale: Tensor, adaptive: bool
) -> list[tuple[Tensor, Tensor]]:
    """θ ← θ + scale · T² ⊙ g on one head (on this rank's shards for FSDP2's); returns (value, saved copy)
    pairs for the exact restore."""
    with torch.no_grad():
        values = [local_tensor(p) for p in head]
        saved = [(value, value.clone()) for value in values]
        for value, g in zip(values, grads, strict=True):
            step = g * value * value if adaptive else g
            value.add_(step * scale.to(value.dtype))
    return saved


@contextlib.contextmanager
def _frozen_batchnorm(model: nn.Module | None) -> Iterator[None]:
    """Restore every BatchNorm's running statistics after the block (perturbed passes must not move them)."""
    if model is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [{name: b.clone() for name, b in m.named_buffers(recurse=False) if b is not None} for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved, strict=True):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)
