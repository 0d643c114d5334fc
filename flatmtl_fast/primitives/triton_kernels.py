"""Triton backend of the streaming primitives (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Kernels convert every loaded value to float32 at once: the interpreter's bfloat16 arithmetic is
wrong otherwise, and 16-bit values are exact in float32 (and in TF32), so nothing is lost.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import TRITON_LAUNCH_OPTIONS, triton_interpreting
from .checks import KERNEL_DTYPES


@triton.jit
def _round_for_store(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` with round-to-nearest-even. For bfloat16 the rounding is done in bits:
    Triton's interpreter truncates that conversion, and the explicit form is exact on the GPU too."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _gram_partials_kernel(
    G, Partials, PairI, PairJ, K, N, row_stride, cols_per_split, Kp,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (split s, tile pair p): float64 sum over split s's columns of G[bi] G[bj]^T, where
    each BLOCK_N-column step is one float32 dot; written to Partials[s, bi-rows, bj-cols]."""
    split = tl.program_id(0)
    pair = tl.program_id(1)
    bi = tl.load(PairI + pair)
    bj = tl.load(PairJ + pair)
    rows_i = bi * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_j = bj * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_i = rows_i.to(tl.int64)[:, None] * row_stride
    offs_j = rows_j.to(tl.int64)[:, None] * row_stride
    col_begin = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, N)
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float64)
    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        in_cols = cols[None, :] < col_end
        a = tl.load(G + offs_i + cols[None, :], mask=(rows_i[:, None] < K) & in_cols, other=0.0).to(tl.float32)
        if SINGLE_TILE:
            b = a
        else:
            b = tl.load(G + offs_j + cols[None, :], mask=(rows_j[:, None] < K) & in_cols, other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION).to(tl.float64)
    out_rows = rows_i.to(tl.int64)[:, None]
    out_cols = rows_j.to(tl.int64)[None, :]
    tl.store(Partials + (split.to(tl.int64) * Kp + out_rows) * Kp + out_cols, acc)


@triton.jit
def _gram_reduce_kernel(Partials, Out, K, Kp, splits, BLOCK: tl.constexpr):
    """Out[i, j] = Out[j, i] = sum over splits, in order, of the upper-triangle partial (float64)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < K * K
    i = idx // K
    j = idx % K
    lo = tl.minimum(i, j)
    hi = tl.maximum(i, j)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for s in range(0, splits):
        total += tl.load(Partials + (s * Kp + lo) * Kp + hi, mask=mask, other=0.0)
    tl.store(Out + idx, total.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    W, G, Out, K, N, row_stride, alpha,
    ACCUMULATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Out[cols] (+)= alpha * sum_k W[k] G[k, cols], float32 (a float64 W rounded to it), BLOCK_K rows per step."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        in_rows = rows < K
        w = tl.load(W + rows, mask=in_rows, other=0.0).to(tl.float32)
        g = tl.load(
            G + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
            mask=in_rows[:, None] & in_cols[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w[:, None] * g, axis=0)
    acc = acc * alpha
    if ACCUMULATE:
        acc += tl.load(Out + cols, mask=in_cols, other=0.0).to(tl.float32)
    tl.store(Out + cols, _round_for_store(acc, Out.dtype.element_ty), mask=in_cols)


@triton.jit
def _row_norms_partials_kernel(
    G, W, Buffer, Gain, Decay, K, N, row_stride, buffer_stride, cols_per_split, splits, Partials,
    WEIGHTED: tl.constexpr, EMA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (split s, row block r): float64 sum over split s's columns of v² for the BLOCK_K rows of block r,
    each BLOCK_N-column step summed in float32; written to Partials[k, s]. v = W ⊙ g_k (W = 1 unless WEIGHTED),
    or with EMA DB-MTL's step v = Decay[0] · b_k + Gain_k · g_k (b_k = 0 where it is not finite), stored into the
    Buffer row b_k."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_rows = rows < K
    offs = rows.to(tl.int64)[:, None] * row_stride
    col_begin = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, N)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float64)
    if EMA:
        gain = tl.load(Gain + rows, mask=in_rows, other=0.0).to(tl.float32)[:, None]
        decay = tl.load(Decay)  # from memory: a CUDA graph replays the step's current value
        buffer_offs = rows.to(tl.int64)[:, None] * buffer_stride
    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        in_cols = cols < col_end
        mask = in_rows[:, None] & in_cols[None, :]
        v = tl.load(G + offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(W + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        if EMA:
            b = tl.load(Buffer + buffer_offs + cols[None, :], mask=mask, other=0.0)
            b = tl.where((b == b) & (tl.abs(b) != float("inf")), b, 0.0)  # a non-finite entry restarts from 0
            v = decay * b + gain * v
            tl.store(Buffer + buffer_offs + cols[None, :], v, mask=mask)
        acc += tl.sum(v * v, axis=1).to(tl.float64)
    tl.store(Partials + rows.to(tl.int64) * splits + split, acc, mask=in_rows)


@triton.jit
def _row_norms_reduce_kernel(Partials, Out, K, splits, BLOCK: tl.constexpr):
    """Out[k] = sqrt(sum over splits, in order, of Partials[k, s]) (float64)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < K
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for s in range(0, splits):
        total += tl.load(Partials + rows.to(tl.int64) * splits + s, mask=mask, other=0.0)
    tl.store(Out + rows, tl.sqrt(total), mask=mask)  # float64 sqrt is correctly rounded (no fast variant)


@triton.jit
def _perturb_kernel(Base, Direction, Scale, Out, N, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Out = Base + s (Base² ⊙ Direction if ADAPTIVE else Direction), float32, s = Scale[0] read here.
    Out may be Base: each program loads its elements before it stores them."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    s = tl.load(Scale).to(tl.float32)
    b = tl.load(Base + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(Direction + cols, mask=mask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * (b * b)
    tl.store(Out + cols, _round_for_store(b + s * d, Out.dtype.element_ty), mask=mask)


def _gram_block_k(K: int) -> int:
    # tl.dot needs ≥ 16 rows; beyond 64 the K x K output is tiled.
    return min(64, max(16, triton.next_power_of_2(K)))


def _gram_precision(dtype: torch.dtype, block_k: int) -> str:
    if dtype != torch.float32:
        return "tf32"  # 16-bit inputs are exact in TF32: full-rate tensor cores, exact products
    # Small tiles stay memory-bound on CUDA cores; larger ones need the tensor cores, and 3xTF32
    # keeps float32-grade accuracy there (plain TF32 would cost ~3e-4 relative).
    return "ieee" if block_k <= 16 else "tf32x3"


@functools.lru_cache(maxsize=64)
def _tile_pairs(tiles: int, device: torch.device) -> tuple[Tensor, Tensor]:
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    pair_i = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    pair_j = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    return pair_i, pair_j


@functools.lru_cache(maxsize=16)
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter runs programs one after another: fewer, longer ones are faster
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class TritonPrimitives:
    name = "triton"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            return f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device}"
        bad = [d for d in dtypes if d not in KERNEL_DTYPES]
        return f"the triton backend reads and writes {KERNEL_DTYPES} only, got {bad}" if bad else None

    def gram(self, G: Tensor, row_stride: int, out: Tensor) -> None:
        K, N = G.shape
        block_k = _gram_block_k(K)
        tiles = -(-K // block_k)
        pair_i, pair_j = _tile_pairs(tiles, G.device)
        block_n = 4096 if triton_interpreting() else max(32, min(512, 8192 // block_k))
        splits = max(1, min(triton.cdiv(N, block_n), _target_programs(G.device) // len(pair_i)))
        cols_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
        splits = triton.cdiv(N, cols_per_split)
        padded = tiles * block_k
        partials = torch.empty(splits, padded, padded, dtype=torch.float64, device=G.device)
        with torch.cuda.device(G.device) if G.is_cuda else contextlib.nullcontext():
            _gram_partials_kernel[(splits, len(pair_i))](
                G, partials, pair_i, pair_j, K, N, row_stride, cols_per_split, padded,
                BLOCK_K=block_k, BLOCK_N=block_n, SINGLE_TILE=tiles == 1,
                PRECISION=_gram_precision(G.dtype, block_k), **TRITON_LAUNCH_OPTIONS,
            )  # fmt: skip
            block = 256
            _gram_reduce_kernel[(triton.cdiv(K * K, block),)](
                partials, out, K, padded, splits, BLOCK=block, **TRITON_LAUNCH_OPTIONS
            )

    def combine(self, w: Tensor, G: Tensor, row_stride: int, out: Tensor, accumulate: bool, alpha: float) -> None:
        K, N = G.shape
        block_n = 16384 if triton_interpreting() else 512
        block_k = 8
        with torch.cuda.device(G.device) if G.is_cuda else contextlib.nullcontext():
            _combine_kernel[(triton.cdiv(N, block_n),)](
                w,
                G,
                out,
                K,
                N,
                row_stride,
                alpha,
                ACCUMULATE=accumulate,
                BLOCK_K=block_k,
                BLOCK_N=block_n,
                **TRITON_LAUNCH_OPTIONS,
            )

    def row_norms(self, G: Tensor, row_stride: int, weight: Tensor | None, out: Tensor) -> None:
        self._sums_of_squares(G, row_stride, out, weight=weight)

    def ema_row_norms(
        self, buffer: Tensor, buffer_stride: int, G: Tensor, row_stride: int, decay: Tensor, gain: Tensor, out: Tensor
    ) -> None:
        self._sums_of_squares(G, row_stride, out, ema=(buffer, buffer_stride, decay, gain))

    def _sums_of_squares(
        self,
        G: Tensor,
        row_stride: int,
        out: Tensor,
        weight: Tensor | None = None,
        ema: tuple[Tensor, int, Tensor, Tensor] | None = None,
    ) -> None:
        """row_norms (W ⊙ g_k) or, given ema = (buffer, buffer_stride, decay, gain), DB-MTL's EMA step."""
        K, N = G.shape
        buffer, buffer_stride, decay, gain = ema or (G, row_stride, G, G)
        block_k = min(8, triton.next_power_of_2(K))  # rows per program: no masked-off rows when K < 8
        row_blocks = triton.cdiv(K, block_k)
        block_n = 4096 if triton_interpreting() else 512
        splits = max(1, min(triton.cdiv(N, block_n), _target_programs(G.device) // row_blocks))
        cols_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
        splits = triton.cdiv(N, cols_per_split)
        partials = torch.empty(K, splits, dtype=torch.float64, device=G.device)
        with torch.cuda.device(G.device) if G.is_cuda else contextlib.nullcontext():
            _row_norms_partials_kernel[(splits, row_blocks)](
                G, G if weight is None else weight, buffer, gain, decay, K, N, row_stride, buffer_stride,
                cols_per_split, splits, partials, WEIGHTED=weight is not None, EMA=ema is not None,
                BLOCK_K=block_k, BLOCK_N=block_n, **TRITON_LAUNCH_OPTIONS,
            )  # fmt: skip
            block = 128
            _row_norms_reduce_kernel[(triton.cdiv(K, block),)](
                partials, out, K, splits, BLOCK=block, **TRITON_LAUNCH_OPTIONS
            )

    def perturb(self, base: Tensor, direction: Tensor, scale: Tensor, out: Tensor, adaptive: bool) -> None:
        N = base.shape[0]
        block = 16384 if triton_interpreting() else 1024
        with torch.cuda.device(base.device) if base.is_cuda else contextlib.nullcontext():
            _perturb_kernel[(triton.cdiv(N, block),)](
                base, direction, scale, out, N, ADAPTIVE=adaptive, BLOCK=block, **TRITON_LAUNCH_OPTIONS
            )
