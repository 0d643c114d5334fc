"""Random draws that stay exact under torch.compile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


@torch.compiler.disable
def draw(sample: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """``sample(*args, **kwargs)`` (torch.rand, randn, randint …) run eagerly, also under torch.compile:
    tracing would consume the generator's state a second time, so a compiled call would silently draw
    other numbers than the eager one. Costs one graph break per draw."""
    return sample(*args, **kwargs)
