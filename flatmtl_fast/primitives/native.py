"""The compiled backends of the streaming primitives: ``cpp`` (CPU) and ``cuda``, from csrc/."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native

_CPP_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _unsupported_dtypes(dtypes: tuple[torch.dtype, ...], allowed: tuple[torch.dtype, ...], name: str) -> str | None:
    bad = [d for d in dtypes if d not in allowed]
    if bad:
        return f"the {name} backend reads and writes {', '.join(map(str, allowed))} only, got {bad}"
    return None


def _mark_written(out: Tensor) -> None:
    # The kernels write through a raw pointer: tell autograd the tensor changed.
    torch.autograd.graph.increment_version(out)


def _weight_args(weight: Tensor | None) -> tuple[int, int]:
    """(address, dtype code) of row_norms' weight; address 0 means no weight."""
    return (0, 0) if weight is None else (weight.data_ptr(), _native.DTYPE_CODES[weight.dtype])


def _perturb_args(base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool) -> tuple:
    """The vector arguments shared by cpu_perturb and cuda_perturb, up to ``adaptive``."""
    return (
        base.data_ptr(), direction.data_ptr(), _native.DTYPE_CODES[direction.dtype], scale.data_ptr(),
        scale.dtype == torch.float64, out.data_ptr(), _native.DTYPE_CODES[out.dtype], base.shape[0], adaptive,
    )  # fmt: skip


def _cuda_device(t: Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


class CppPrimitives:
    name = "cpp"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        return _unsupported_dtypes(dtypes, _CPP_DTYPES, "cpp")

    def gram(self, G: Tensor, row_stride: int, out: Tensor) -> None:
        K, N = G.shape
        out64 = out if out.dtype == torch.float64 else torch.empty(K, K, dtype=torch.float64)
        _native.module().cpu_gram(
            G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype], out64.data_ptr(), torch.get_num_threads()
        )
        if out64 is not out:
            out.copy_(out64)
        _mark_written(out)

    def combine(self, w: Tensor, G: Tensor, row_stride: int, out: Tensor, accumulate: bool, alpha: float) -> None:
        K, N = G.shape
        _native.module().cpu_combine(
            w.data_ptr(), w.dtype == torch.float64, G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype],
            out.data_ptr(), _native.DTYPE_CODES[out.dtype], alpha, accumulate, torch.get_num_threads(),
        )  # fmt: skip
        _mark_written(out)

    def row_norms(self, G: Tensor, row_stride: int, weight: Tensor | None, out: Tensor) -> None:
        K, N = G.shape
        _native.module().cpu_row_norms(
            G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype], *_weight_args(weight), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        _mark_written(out)

    def ema_row_norms(
        self, buffer: Tensor, buffer_stride: int, G: Tensor, row_stride: int, decay: Tensor, gain: Tensor, out: Tensor
    ) -> None:
        K, N = G.shape
        _native.module().cpu_ema_row_norms(
            buffer.data_ptr(), buffer_stride, G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype],
            decay.data_ptr(), gain.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        _mark_written(buffer)
        _mark_written(out)

    def perturb(self, base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool) -> None:
        _native.module().cpu_perturb(*_perturb_args(base, direction, scale, out, adaptive), torch.get_num_threads())
        _mark_written(out)


class CudaPrimitives:
    name = "cuda"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        return _unsupported_dtypes(dtypes, _CUDA_DTYPES, "cuda")

    def gram(self, G: Tensor, row_stride: int, out: Tensor) -> None:
        module = _native.module()
        K, N = G.shape
        device = _cuda_device(G)
        splits = module.cuda_gram_num_splits(K, N, device)
        padded = -(-K // 16) * 16
        partials = torch.empty(splits, padded, padded, dtype=torch.float32, device=G.device)
        module.cuda_gram(
            G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype], partials.data_ptr(), splits,
            out.data_ptr(), out.dtype == torch.float64, device, torch.cuda.current_stream(G.device).cuda_stream,
        )  # fmt: skip
        _mark_written(out)

    def combine(self, w: Tensor, G: Tensor, row_stride: int, out: Tensor, accumulate: bool, alpha: float) -> None:
        K, N = G.shape
        device = _cuda_device(G)
        _native.module().cuda_combine(
            w.data_ptr(), w.dtype == torch.float64, G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype],
            out.data_ptr(), _native.DTYPE_CODES[out.dtype], alpha, accumulate, device,
            torch.cuda.current_stream(G.device).cuda_stream,
        )  # fmt: skip
        _mark_written(out)

    def row_norms(self, G: Tensor, row_stride: int, weight: Tensor | None, out: Tensor) -> None:
        K, N = G.shape
        partials, trailing = self._split_sums(G, out)
        _native.module().cuda_row_norms(
            G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype], *_weight_args(weight), *trailing
        )
        del partials  # freed after the launch: stream-ordered reuse
        _mark_written(out)

    def ema_row_norms(
        self, buffer: Tensor, buffer_stride: int, G: Tensor, row_stride: int, decay: Tensor, gain: Tensor, out: Tensor
    ) -> None:
        K, N = G.shape
        partials, trailing = self._split_sums(G, out)
        _native.module().cuda_ema_row_norms(
            buffer.data_ptr(), buffer_stride, G.data_ptr(), K, N, row_stride, _native.DTYPE_CODES[G.dtype],
            decay.data_ptr(), gain.data_ptr(), *trailing,
        )  # fmt: skip
        del partials  # freed after the launch: stream-ordered reuse
        _mark_written(buffer)
        _mark_written(out)

    @staticmethod
    def _split_sums(G: Tensor, out: Tensor) -> tuple[Tensor, tuple]:
        """For cuda_row_norms and cuda_ema_row_norms: the per-split partial sums (K × splits float64; the caller
        holds the tensor over the launch) and the trailing arguments (partials, splits, out, device, stream)."""
        K, N = G.shape
        device = _cuda_device(G)
        splits = _native.module().cuda_row_norms_num_splits(K, N, device)
        partials = torch.empty(K, splits, dtype=torch.float64, device=G.device)
        stream = torch.cuda.current_stream(G.device).cuda_stream
        return partials, (partials.data_ptr(), splits, out.data_ptr(), device, stream)

    def perturb(self, base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool) -> None:
        _native.module().cuda_perturb(
            *_perturb_args(base, direction, scale, out, adaptive), _cuda_device(base),
            torch.cuda.current_stream(base.device).cuda_stream,
        )  # fmt: skip
        _mark_written(out)
