"""The optional ``torch.Generator`` of the randomised methods (PCGrad, GradVac, GradDrop, RLW).

Every draw is made on the generator's device, or on the input's device when no generator is given
(then torch's default generator of that device is used), so a fused implementation fed a generator
in the same state reproduces the draw exactly.

The generator's state is part of the aggregator's state (``_state_attributes`` lists the property
``_generator_state``), so ``state_dict`` / ``load_state_dict`` continue the random stream identically
and ``reset`` rewinds it to its state at construction. Without a generator there is nothing to save:
torch's global generators are the user's to seed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_generator_state(state: object, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` (naming ``what``) unless ``state`` is a state of a ``device`` generator; tried on a
    scratch generator, so a rejected state changes nothing."""
    try:
        torch.Generator(device=device).set_state(state)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what} is not a state of a {device} generator ({error})") from None


class GeneratorMixin:
    """Holds ``self.generator`` and exposes its state as the state attribute ``_generator_state``."""

    def _init_generator(self, generator: torch.Generator | None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self._initial_generator_state = None if generator is None else generator.get_state()

    def _draw_device(self, like: Tensor) -> torch.device:
        """Where to draw: the generator's device, or ``like``'s device (its default generator)."""
        return like.device if self.generator is None else self.generator.device

    def _check_state(self, state: dict[str, object]) -> None:
        super()._check_state(state)  # type: ignore[misc]  (the aggregator's)
        value, owner = state["_generator_state"], type(self).__name__
        if value is None:
            return
        if self.generator is None:
            raise ValueError(
                f"{owner}.load_state_dict: _generator_state is a generator's state, but this aggregator was built "
                "without a generator (pass generator=)"
            )
        check_generator_state(value, self.generator.device, f"{owner}.load_state_dict: _generator_state")

    @property
    def _generator_state(self) -> Tensor | None:
        return None if self.generator is None else self.generator.get_state()

    @_generator_state.setter
    def _generator_state(self, state: Tensor | None) -> None:
        # None comes from reset(): rewind to the state at construction.
        # A state without a generator is refused by _check_state, before load_state_dict sets anything.
        if self.generator is not None:
            self.generator.set_state(self._initial_generator_state if state is None else state)
