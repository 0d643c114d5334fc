"""Fused GradDrop: one elementwise pass over G."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._memory import overlaps
from .._random import draw_on
from ..backends import resolve
from ..reference import graddrop as reference
from .checks import check_losses, check_matrix, check_streaming
from .graddrop_kernels import implementations


@functools.cache
def _implementations() -> dict[str, object]:
    return implementations()


class GradDrop(reference.GradDrop):
    """GradDrop (Chen et al., NeurIPS 2020) as :class:`flatmtl_fast.reference.GradDrop` (sum scale, ``leak``,
    same generator contract: one 62-bit seed per call, U_n = ``tl.rand(seed, n)``), in one pass over G
    writing d into ``out`` (or a new tensor of G's dtype): equal generator states keep the same entries.

    Not Gramian. The seed is drawn on the generator's device and stays there (the Triton kernel loads it);
    the CPU path reads it from host memory. P_n is computed in float64 in both, as in the reference.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
        K, N = check_matrix(G)
        check_losses(losses, K, G.device, required=False, owner="GradDrop")
        # Everything is checked before the draw: a refused call leaves the generator where it was.
        out = check_streaming(G, out, "GradDrop")
        leak = self._leak_column(K, G.device).reshape(K).contiguous()
        if out is None:
            out = torch.empty(N, dtype=G.dtype, device=G.device)
        elif overlaps(out, leak):
            raise ValueError("GradDrop: out overlaps leak in memory")
        impl = resolve("graddrop", _implementations(), G.device, G.dtype, out.dtype)
        seed = draw_on(G.device, torch.randint, 0, 2**62, (1,), generator=self.generator)
        impl.run(G, leak, seed, out)
        return out
