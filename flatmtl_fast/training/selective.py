"""Selective task-group updates (Jeong & Yoon, ICLR 2025, arXiv 2502.11986).

Official code: GitHub ``wooseong97/sel-update-mtl`` (``utils/train_utils.py``: ``train_phase_affinity``,
``form_task_affinity``). Not a gradient aggregator: a scheduler that applies each batch as one optimizer
step per task group and learns the groups from a proximal inter-task affinity. Its K × K work (the
affinity update and the affinity-propagation clustering) stays on the losses' device.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregators.checks import check_real, check_state_keys
from ..reference._generator import check_generator_state
from ..solvers.affinity_propagation import affinity_propagation, check_affinity_propagation_parameters

CREDIT_MODES = ("paper", "official")


def cluster_tasks(affinity: Tensor, fallback: Tensor, **options: Any) -> Tensor:
    """The regrouping step, on the device without a host sync: group labels (K,) from the affinity A.

    X = A with column j divided by A_jj, symmetrised X ← (X + Xᵀ)/2, clustered by
    :func:`~flatmtl_fast.solvers.affinity_propagation.affinity_propagation` (``options`` are its keyword
    arguments). Returns ``fallback`` (the current labels) when that finds no exemplar or X is not finite —
    in particular when some A_jj is 0 (task j never measured a decrease of its own loss): the official code
    also keeps its groups when clustering fails (and would crash in scikit-learn on a non-finite X).
    """
    X = affinity / affinity.diagonal()  # broadcasting divides column j by A_jj
    labels = affinity_propagation((X + X.T) / 2, **options)
    return torch.where((labels >= 0).all(), labels, fallback)


class SelectiveGroupUpdate:
    """Selective task-group updates: each batch is applied as one optimizer step per task group.

    Per batch, :meth:`groups` returns the groups (lists of task indices) in a random order; for each
    group the user runs a fresh forward pass on the same batch, backpropagates :meth:`loss` (which
    returns Σ_{t ∈ group} L_t) and steps the optimizer — **once per group**, so up to K steps per batch
    (any ``torch.optim`` optimizer; step an LR scheduler once per batch, as the official code)::

        sgu = flatmtl_fast.SelectiveGroupUpdate(num_tasks=K, decay=1e-3, warmup=100)
        for batch in loader:
            for group in sgu.groups():              # this batch's groups, in random order
                losses = model_losses(batch)        # all K losses of a fresh forward pass
                optimizer.zero_grad()
                sgu.loss(losses, group).backward()  # records the losses, returns Σ_{t∈group} L_t
                optimizer.step()
            # Optional, credit="paper" only: measure the last group's step on this batch (one more forward).
            # with torch.no_grad():
            #     sgu.measure(model_losses(batch))
            lr_scheduler.step()                     # once per batch

    **Groups.** The first ``warmup`` batches use singleton groups (the official code's ``prepos``; its
    test ``iter_count <= prepos`` gives prepos + 1 warm-up batches, this gives exactly ``warmup``). From
    then on, :meth:`groups` regroups at *every* batch, as the official ``next_group`` does: X = A with
    column j divided by A_jj, X ← (X + Xᵀ)/2, affinity propagation on X (:func:`cluster_tasks`). The
    order of the groups is a ``torch.randperm`` from ``generator`` (part of :meth:`state_dict`).

    - Clustering settings (defaults: the paper's): preference = median of X, damping 0.5, converged
      after 50 stable iterations, up to 9 retries with 100 more iterations each; a fixed tie-breaking
      noise pattern where scikit-learn draws random noise (see
      :func:`~flatmtl_fast.solvers.affinity_propagation.affinity_propagation`). The official retries
      re-run scikit-learn with ``convergence_iter`` + 100 at a fixed ``max_iter`` = 200, which only
      re-draws its noise; with a fixed pattern that would repeat the same run, so ours grow the budget.
    - The whole column is divided, as the paper defines X: the official ``X[:, i] /= X[i, i]`` aliases
      its divisor and, on torch 2.13 (CPU, where the official affinity lives), leaves the entries below
      the diagonal undivided.
    - If the clustering finds no exemplar or X is not finite (some A_jj = 0: task j never measured a
      decrease of its own loss), the current groups are kept, as the official code keeps them when
      clustering fails.
    - Cost: reading the K labels back to build the Python lists is the only host synchronisation, once
      per regrouping (none in warm-up); the affinity updates and the clustering never synchronise. The
      clustering is one call of the native solver where it runs (the CPU module; CUDA under
      ``use_backend("cuda")``), which stops once converged: ~0.1 ms at K = 10 on a CPU core. The torch
      fallback runs its whole budget, ``max_iter`` + 100 · ``retries`` iterations of ~20 small K × K tensor
      operations — 1100 per batch with the paper's settings (~50 ms on a CPU); lower ``retries`` to regroup
      cheaper there.

    **Affinity.** A (K × K, float64, zero at the start) is updated after each step of a group G with the
    relative decrease r_t = (1 − L_t^new / L_t^prev) / |G| of every task's loss across that step: for
    s ∈ G and every t, A_st ← (1 − β) A_st + β a with a = r_t for t ∉ G; for t = s only if r_s ≥ 0
    (a = r_s); for s ≠ t both in G, a = r_t if r_t r_s ≥ 0 else −max(r_t, r_s). Rows s ∉ G are unchanged.
    As the official code, an entry whose loss had L^prev ≤ 0 is not updated (and neither is one whose
    ratio is not finite). Which step is measured, ``credit``:

    - ``"paper"`` (default): the paper's definition. r is credited to the group just stepped, measured by
      the next forward: group m's step by the losses passed to :meth:`loss` for group m + 1 of the same
      batch; the last group's step by the first forward of the next batch (no extra cost, but on other
      data), or — if the user calls :meth:`measure` with the losses of an extra forward on the same batch
      after the last step — by those.
    - ``"official"``: the official code's behaviour. At the start of each batch the previous losses are
      forgotten; the change from group m − 1's forward to group m's forward (which measures group m − 1's
      step) is credited to group m's tasks, divided by |G_m|, when group m's losses arrive. The first group
      of a batch credits nothing, and the last group's step is never measured. With a single group the
      batch runs it twice (as the official code), so that its step is measured at all.

    Args:
        num_tasks: K ≥ 1.
        decay: β ∈ (0, 1), the EMA rate of the affinity (official ``affin_decay``: 1e-3 on NYUD/PASCAL,
            1e-4 on Taskonomy).
        warmup: batches of singleton groups before the first regrouping.
        credit: ``"paper"`` or ``"official"`` (above).
        generator: CPU ``torch.Generator`` for the group order; default one seeded from torch's global RNG.
        preference, damping, convergence_iter, max_iter, retries: the affinity-propagation settings
            (defaults: the paper's).
        device: where the affinity lives at first; it follows the losses' device.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        decay: float = 1e-3,
        warmup: int = 100,
        credit: str = "paper",
        generator: torch.Generator | None = None,
        preference: float | None = None,
        damping: float = 0.5,
        convergence_iter: int = 50,
        max_iter: int = 200,
        retries: int = 9,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"SelectiveGroupUpdate: num_tasks must be an int ≥ 1, got {num_tasks!r}")
        decay = check_real(decay, "SelectiveGroupUpdate", "decay", above=0.0, below=1.0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"SelectiveGroupUpdate: warmup must be an int ≥ 0, got {warmup!r}")
        if credit not in CREDIT_MODES:
            raise ValueError(f"SelectiveGroupUpdate: credit must be one of {CREDIT_MODES}, got {credit!r}")
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            got = generator.device if isinstance(generator, torch.Generator) else repr(generator)
            raise ValueError(f"SelectiveGroupUpdate: generator must be a CPU torch.Generator or None, got {got}")
        if isinstance(preference, Tensor):
            if preference.shape not in ((), (num_tasks,)) or not preference.is_floating_point():
                raise ValueError(
                    f"SelectiveGroupUpdate: a preference tensor must be floating, of shape () or ({num_tasks},), got "
                    f"{preference.dtype} of shape {tuple(preference.shape)}"
                )
        elif preference is not None:
            preference = check_real(preference, "SelectiveGroupUpdate", "preference")
        check_affinity_propagation_parameters(damping, convergence_iter, max_iter, retries)
        self.num_tasks, self.decay, self.warmup, self.credit = num_tasks, decay, warmup, credit
        self._clustering = {
            "preference": preference,
            "damping": damping,
            "convergence_iter": convergence_iter,
            "max_iter": max_iter,
            "retries": retries,
        }
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (), dtype=torch.int64)))
        self.generator = generator
        device = torch.device(device) if device is not None else torch.device("cpu")
        #: The proximal inter-task affinity A (K × K, float64): row s, column t.
        self.affinity = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)
        #: Batches begun (calls of :meth:`groups`).
        self.batches = 0
        self._prev: Tensor | None = None  # float64 losses of the last forward, if a step is to be measured from them
        self._pending: tuple[int, ...] | None = None  # credit="paper": the group stepped since self._prev
        self._set_labels(torch.arange(num_tasks, device=device))
        self._to(device)

    @property
    def grouping(self) -> list[list[int]]:
        """The current groups, ordered by their lowest task index."""
        return [list(group) for group in self._groups]

    def groups(self) -> list[list[int]]:
        """Begin a batch: its groups (lists of task indices) in random order; regroups after warm-up."""
        if self.batches >= self.warmup:
            self._set_labels(cluster_tasks(self.affinity, self._labels, **self._clustering))
        self.batches += 1
        if self.credit == "official":
            self._prev = None  # the official init_pre_loss(): nothing is measured across batches
        order = torch.randperm(len(self._groups), generator=self.generator).tolist()
        groups = [list(self._groups[i]) for i in order]
        return groups * 2 if self.credit == "official" and len(groups) == 1 else groups

    def loss(self, losses: Sequence[Tensor] | Tensor, group: Sequence[int]) -> Tensor:
        """Σ_{t ∈ group} L_t, to backpropagate before this group's optimizer step.

        Call it once per group of :meth:`groups`, in order, each time with all K losses of a fresh forward
        pass (a (K,) tensor or K scalar tensors): they update the affinity on the device (which step they
        measure: ``credit`` in the class docstring). ``group`` may be any non-empty set of task indices.
        """
        items, vector = self._as_losses(losses, "loss")
        members = self._as_group(group)
        with torch.no_grad():
            new = vector.detach().to(torch.float64)
            if self.credit == "paper":
                if self._pending is not None and self._prev is not None:
                    self._update(self._prev, new, self._pending)
                self._pending = members
            elif self._prev is not None:
                self._update(self._prev, new, members)
            self._prev = new
        return functools.reduce(operator.add, (items[t] for t in members))

    @torch.no_grad()
    def measure(self, losses: Sequence[Tensor] | Tensor) -> None:
        """``credit="paper"`` only: measure the last group's step with the K losses of an extra forward
        pass on the same batch after that step (otherwise the next batch's first forward measures it)."""
        if self.credit != "paper":
            raise RuntimeError(
                "SelectiveGroupUpdate.measure: only for credit='paper' (the official code never measures "
                "the last group's step)"
            )
        _, vector = self._as_losses(losses, "measure")
        if self._pending is not None and self._prev is not None:
            self._update(self._prev, vector.detach().to(torch.float64), self._pending)
        self._prev, self._pending = None, None

    def _update(self, prev: Tensor, new: Tensor, members: tuple[int, ...]) -> None:
        """The affinity update for the step of group ``members`` (tensor ops on the device, no sync)."""
        in_group = self._mask(members)
        r = (1 - new / prev) / len(members)
        valid = (prev > 0) & r.isfinite()
        r_s, r_t = r[:, None], r[None, :]
        both = in_group[:, None] & in_group[None, :]
        a = torch.where(both & (r_t * r_s < 0), -torch.maximum(r_t, r_s), r_t)
        update = (
            in_group[:, None]
            & valid[None, :]
            & (~both | valid[:, None])  # a pair inside the group needs both losses
            & (~self._eye | (r_t >= 0))  # A_ss only moves on a decrease of L_s
        )
        self.affinity = torch.where(update, (1 - self.decay) * self.affinity + self.decay * a, self.affinity)

    def _mask(self, members: tuple[int, ...]) -> Tensor:
        """(K,) bool on the device, true on ``members``: built from views of the identity (no host-to-device copy)."""
        mask = self._masks.get(members)
        if mask is None:
            mask = self._masks[members] = functools.reduce(torch.logical_or, (self._eye[t] for t in members))
        return mask

    def _set_labels(self, labels: Tensor) -> None:
        """Adopt group labels (K,) numbered 0 … M − 1; reads them to the host (the one sync per regrouping)."""
        self._labels = labels
        host = labels.tolist()
        self._groups = [[t for t in range(self.num_tasks) if host[t] == label] for label in range(max(host) + 1)]

    def _as_losses(self, losses: Sequence[Tensor] | Tensor, what: str) -> tuple[Sequence[Tensor], Tensor]:
        """The K losses as indexable scalars and as a (K,) vector; moves the state to their device."""
        K = self.num_tasks
        if isinstance(losses, Tensor):
            if losses.shape != (K,):
                raise ValueError(
                    f"SelectiveGroupUpdate.{what}: expected {K} losses (a tensor of shape ({K},)), "
                    f"got shape {tuple(losses.shape)}"
                )
            items, vector = losses, losses
        else:
            if not isinstance(losses, Sequence):
                raise TypeError(
                    f"SelectiveGroupUpdate.{what}: losses must be a ({K},) tensor or a sequence of {K} scalar tensors, "
                    f"got {type(losses).__name__}"
                )
            if len(losses) != K:
                raise ValueError(f"SelectiveGroupUpdate.{what}: expected {K} losses, got {len(losses)}")
            for t, loss in enumerate(losses):
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise ValueError(f"SelectiveGroupUpdate.{what}: losses[{t}] must be a scalar tensor, got {shape}")
            items = [loss.reshape(()) for loss in losses]
            vector = torch.stack(items)
        if not vector.is_floating_point():
            raise TypeError(f"SelectiveGroupUpdate.{what}: losses must be floating point, got {vector.dtype}")
        if vector.device != self.affinity.device:
            self._to(vector.device)
        return items, vector

    def _as_group(self, group: Sequence[int], what: str = "loss: group") -> tuple[int, ...]:
        try:
            members = tuple(_task_index(t) for t in group)
        except TypeError:
            members = ()  # not a sequence of integers: reported below
        if not members or len(set(members)) != len(members) or not all(0 <= t < self.num_tasks for t in members):
            raise ValueError(
                f"SelectiveGroupUpdate.{what} must be a non-empty list of distinct task indices in "
                f"[0, {self.num_tasks}), got {group!r}"
            )
        return members

    def _to(self, device: torch.device) -> None:
        self.affinity = self.affinity.to(device)
        self._labels = self._labels.to(device)
        self._prev = None if self._prev is None else self._prev.to(device)
        self._eye = torch.eye(self.num_tasks, dtype=torch.bool, device=device)
        self._masks: dict[tuple[int, ...], Tensor] = {}  # group → its mask, on this device

    def state_dict(self) -> dict[str, Any]:
        """Affinity, labels, previous losses, pending group, batch count, generator state and credit mode."""
        return {
            "affinity": self.affinity.clone(),
            "labels": self._labels.clone(),
            "prev_losses": None if self._prev is None else self._prev.clone(),
            "pending": None if self._pending is None else list(self._pending),
            "batches": self.batches,
            "generator": self.generator.get_state(),
            "credit": self.credit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, taken between batches: the run then continues exactly as the
        saved one would (the groups of a batch under way are not part of the state)."""
        expected = {"affinity", "labels", "prev_losses", "pending", "batches", "generator", "credit"}
        check_state_keys(state, expected, "SelectiveGroupUpdate.load_state_dict")
        K, affinity, labels, prev = self.num_tasks, state["affinity"], state["labels"], state["prev_losses"]
        if not (isinstance(affinity, Tensor) and affinity.shape == (K, K) and affinity.is_floating_point()) or not (
            isinstance(labels, Tensor) and labels.shape == (K,) and _is_integer(labels)
        ):
            raise ValueError(
                f"SelectiveGroupUpdate.load_state_dict: expected an affinity of shape ({K}, {K}) (floating) and "
                f"labels of shape ({K},) (integers), got {_describe(affinity)} and {_describe(labels)}"
            )
        if not bool(torch.isfinite(affinity).all()):  # NaN would make every later grouping arbitrary
            raise ValueError("SelectiveGroupUpdate.load_state_dict: the affinity has non-finite entries")
        if prev is not None and not (isinstance(prev, Tensor) and prev.shape == (K,) and prev.is_floating_point()):
            raise ValueError(
                f"SelectiveGroupUpdate.load_state_dict: prev_losses must be None or {K} floating losses (shape "
                f"({K},)), got {_describe(prev)}"
            )
        pending = None if state["pending"] is None else self._as_group(state["pending"], "load_state_dict: pending")
        batches = state["batches"]
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(f"SelectiveGroupUpdate.load_state_dict: batches must be an int ≥ 0, got {batches!r}")
        if state["credit"] != self.credit:
            raise ValueError(
                f"SelectiveGroupUpdate.load_state_dict: state saved with credit={state['credit']!r}, "
                f"this has credit={self.credit!r}"
            )
        numbers = labels.tolist()
        if sorted(set(numbers)) != list(range(max(numbers) + 1)) or min(numbers) < 0:
            raise ValueError(
                "SelectiveGroupUpdate.load_state_dict: labels must number the groups 0 … M − 1 with no group empty, "
                f"got {numbers}"
            )
        check_generator_state(
            state["generator"], torch.device("cpu"), "SelectiveGroupUpdate.load_state_dict: generator"
        )
        self.affinity = affinity.clone().to(torch.float64)
        self._set_labels(labels.clone().to(device=self.affinity.device, dtype=torch.int64))
        self._prev = None if prev is None else prev.clone().to(torch.float64)
        self._pending = pending
        self.batches = batches
        self.generator.set_state(state["generator"])
        self._to(self.affinity.device)


def _task_index(t: object) -> int:
    if isinstance(t, bool):  # operator.index(True) is 1
        raise TypeError("a bool is not a task index")
    return operator.index(t)


def _is_integer(labels: Tensor) -> bool:
    return not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)


def _describe(value: object) -> str:
    """A state entry as an error message shows it: a tensor's dtype and shape, anything else's type."""
    return f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
