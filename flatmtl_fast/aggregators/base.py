"""The aggregator API shared by the reference backend and the fused backends.

An aggregator maps the per-task gradient matrix G (K × N, one row per task) to one update
direction d (N,). Gramian aggregators additionally expose ``weights(M)``: the K weights w with
d = wᵀG, computed from the Gram matrix M = G Gᵀ alone (plus losses and K-sized state).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from .checks import check_state_keys


class Aggregator(ABC):
    """Base class of every aggregator: ``agg(G, losses=None) -> d``.

    Subclasses with state between steps (GradVac targets, Nash-MTL warm start, DB-MTL buffer,
    random generators) list the attribute names in ``_state_attributes``; ``state_dict`` /
    ``load_state_dict`` / ``reset`` then work without per-class code.
    """

    #: Whether ``losses`` must be given to ``__call__`` / ``weights``.
    needs_losses: bool = False
    #: Names of attributes that form the state between steps (tensors, numbers or None).
    _state_attributes: tuple[str, ...] = ()
    #: Whether the state keeps (a combination of) the gradients themselves (DB-MTL's EMA), not only K-sized values:
    #: ``backward`` with a GradScaler then hands them over unscaled, so that steps of different scales do not mix.
    keeps_gradients: bool = False

    @abstractmethod
    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        """Aggregate the rows of ``G`` (K × N) into one direction of shape (N,)."""

    def reset(self) -> None:
        """Forget all state kept between steps (the next call behaves like the first)."""
        for name in self._state_attributes:
            setattr(self, name, None)

    def state_dict(self) -> dict[str, Any]:
        """The state kept between steps, as tensors/numbers (deep-copied)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self._state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self._check_state(state)  # before anything is set: a rejected state leaves the aggregator as it was
        for name in self._state_attributes:
            setattr(self, name, copy.deepcopy(state[name]))

    def _check_state(self, state: dict[str, Any]) -> None:
        """Raise (naming the entry) if ``state`` cannot be this aggregator's: its keys here, the values' kinds in
        the stateful methods' overrides (which call this first)."""
        check_state_keys(state, self._state_attributes, f"{type(self).__name__}.load_state_dict")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({params})"

    def _hyperparameters(self) -> dict[str, Any]:
        return {}


class GramianAggregator(Aggregator):
    """An aggregator whose direction is d = wᵀG with w computed from M = G Gᵀ alone."""

    @abstractmethod
    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """The K weights w (d = wᵀG) from the Gram matrix ``M`` (K × K)."""


def check_state_tensor(value: object, owner: str, name: str, dim: int, *, positive: bool = False) -> None:
    """A saved state tensor: None (before the first step) or a finite floating ``dim``-D tensor (> 0 if
    ``positive``); one host read, at load time."""
    if value is None:
        return
    if not isinstance(value, Tensor) or value.dim() != dim or not value.is_floating_point():
        raise ValueError(f"{owner}.load_state_dict: {name} must be None or a {dim}-D floating tensor, got {value!r}")
    if not bool(torch.isfinite(value).all()) or (positive and not bool((value > 0).all())):
        raise ValueError(f"{owner}.load_state_dict: {name} must be finite{' and > 0' if positive else ''}")


def check_state_step(value: object, owner: str) -> None:
    """A saved step counter: None, or an integer-valued number or 0-D tensor ≥ 0."""
    number = value.item() if isinstance(value, Tensor) and value.dim() == 0 else value
    if number is not None and (isinstance(number, bool) or not isinstance(number, int | float) or not (
        number >= 0 and float(number).is_integer())):  # fmt: skip
        raise ValueError(f"{owner}.load_state_dict: step must be None or a count ≥ 0, got {value!r}")
