"""Layer 5: training entry points (drop-in backward; later F-MTL, selective updates, FAMO, distributed)."""

from .backward import backward, release_buffers

__all__ = ["backward", "release_buffers"]
