"""Where tensors lie in memory: the byte spans behind the overlap checks (used by the flat buffers and the
primitives alike, so it sits below both layers)."""

from __future__ import annotations

import torch
from torch import Tensor


def byte_range(t: Tensor) -> tuple[int, int]:
    """[first byte, past the last byte) of ``t``'s elements (an empty tensor spans nothing)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (conservative for strided views), by address: two
    storages over the same memory (``torch.from_numpy`` of overlapping slices) count too.

    Tensors without memory (meta and fake tensors, as torch.compile traces with) have no addresses: assumed
    disjoint; the custom ops check again on the real tensors they run on.
    """
    if torch.compiler.is_compiling() or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() == 0 or b.untyped_storage().data_ptr() == 0:
        return False
    a0, a1 = byte_range(a)
    b0, b1 = byte_range(b)
    return a0 < b1 and b0 < a1
