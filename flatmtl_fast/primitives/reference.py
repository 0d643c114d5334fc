"""Reference backend of the streaming primitives: plain PyTorch in float64, column block by block.

This is the oracle of the parity tests, so it favours obvious correctness: every product and sum
in float64, one rounding to the output dtype at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import G_DTYPES

# Column block: bounds the float64 copy of G to about 32 MB whatever N is.
_BLOCK_ELEMENTS = 1 << 22


def _column_blocks(K: int, N: int) -> range:
    return range(0, N, max(1, _BLOCK_ELEMENTS // K))


class ReferencePrimitives:
    name = "reference"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        bad = [d for d in dtypes if d not in G_DTYPES]
        return f"unsupported dtypes {bad}" if bad else None

    def gram(self, G: Tensor, row_stride: int, out: Tensor) -> None:
        K, N = G.shape
        acc = torch.zeros(K, K, dtype=torch.float64, device=G.device)
        step = max(1, _BLOCK_ELEMENTS // K)
        for start in _column_blocks(K, N):
            block = G[:, start : start + step].double()
            acc += block @ block.T
        out.copy_((acc + acc.T) / 2)  # exactly symmetric

    def combine(self, w: Tensor, G: Tensor, row_stride: int, out: Tensor, accumulate: bool, alpha: float) -> None:
        K, N = G.shape
        w64 = w.double() if G.dtype == torch.float64 else w.float().double()  # the kernels' float32 weights
        step = max(1, _BLOCK_ELEMENTS // K)
        for start in _column_blocks(K, N):
            value = alpha * (w64 @ G[:, start : start + step].double())
            if accumulate:
                value += out[start : start + step].double()
            out[start : start + step] = value

    def row_norms(self, G: Tensor, row_stride: int, weight: Tensor | None, out: Tensor) -> None:
        K, N = G.shape
        acc = torch.zeros(K, dtype=torch.float64, device=G.device)
        step = max(1, _BLOCK_ELEMENTS // K)
        for start in _column_blocks(K, N):
            block = G[:, start : start + step].double()
            if weight is not None:
                block = block * weight[start : start + step].double()  # not in place: .double() of float64 is G itself
            acc += block.square().sum(dim=1)
        torch.sqrt(acc, out=out)

    def ema_row_norms(
        self, buffer: Tensor, buffer_stride: int, G: Tensor, row_stride: int, decay: Tensor, gain: Tensor, out: Tensor
    ) -> None:
        # decay as the kernels read it (float32); the new entry in float64, rounded once to the float32 buffer,
        # whose entries are then squared and summed in float64.
        K, N = G.shape
        decay64 = decay.double()
        gain64 = gain.double().unsqueeze(1)
        acc = torch.zeros(K, dtype=torch.float64, device=G.device)
        step = max(1, _BLOCK_ELEMENTS // K)
        for start in _column_blocks(K, N):
            columns = buffer[:, start : start + step]
            previous = columns.double()
            previous = torch.where(torch.isfinite(previous), previous, 0.0)  # a non-finite entry restarts from 0
            columns.copy_(decay64 * previous + gain64 * G[:, start : start + step].double())
            acc += columns.double().square().sum(dim=1)
        torch.sqrt(acc, out=out)

    def perturb(self, base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool) -> None:
        # Each block is read into float64 copies before out is written: out may be base itself.
        s = scale.double()
        for start in _column_blocks(1, base.shape[0]):
            stop = start + _BLOCK_ELEMENTS
            b = base[start:stop].double()
            d = direction[start:stop].double()
            out[start:stop] = b + s * (b * b * d if adaptive else d)
