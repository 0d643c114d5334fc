"""Layer 5: training entry points (drop-in backward; later F-MTL, selective updates, FAMO, distributed)."""

from .backward import backward, release_buffers
from .famo import FAMO

__all__ = ["FAMO", "backward", "release_buffers"]
