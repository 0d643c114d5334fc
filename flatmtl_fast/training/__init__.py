"""Layer 5: training entry points (drop-in backward; later F-MTL, selective updates, FAMO, distributed)."""

from .backward import backward, release_buffers
from .famo import FAMO
from .fmtl import FMTL
from .selective import SelectiveGroupUpdate

__all__ = ["FAMO", "FMTL", "SelectiveGroupUpdate", "backward", "release_buffers"]
