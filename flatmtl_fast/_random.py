"""Random draws that stay exact under torch.compile, delivered to the device without waiting for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._device import to_device


@torch.compiler.disable
def draw(sample: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """``sample(*args, **kwargs)`` (torch.rand, randn, randint …) run eagerly, also under torch.compile:
    tracing would consume the generator's state a second time, so a compiled call would silently draw
    other numbers than the eager one. Costs one graph break per draw."""
    return sample(*args, **kwargs)


def draw_on(
    device: torch.device, sample: Callable[..., Tensor], *args: Any, generator: torch.Generator | None, **kwargs: Any
) -> Tensor:
    """``sample(*args, generator=generator, **kwargs)`` drawn on the generator's device (or on ``device``, from
    its default generator, when ``generator`` is None), returned on ``device`` without a host synchronisation."""
    source = device if generator is None else generator.device
    values = draw(sample, *args, generator=generator, device=source, **kwargs)
    return to_device(values, device, what="the draws of a CPU generator (give the aggregator a CUDA generator)")
