"""GradDrop's single elementwise pass over G: a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), a
compiled CPU kernel, and a torch path over column blocks (any device and dtype). All draw
U_n = ``tl.rand(seed, n)`` (Philox-4x32-10, int64 offsets n) and decide in float64, exactly as
:class:`flatmtl_fast.reference.GradDrop`."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _native
from ..backends import TRITON_LAUNCH_OPTIONS, triton_interpreting
from ..primitives.checks import KERNEL_DTYPES
from ..reference._philox import philox_uniform


def block_columns(device: torch.device) -> int:
    """Columns per block of the torch path, which bound its float64 temporaries to O(K · block): on the CPU, a
    block that stays in cache; on a GPU (float64, which the kernels do not take), one that amortises the ~40
    launches of each block's Philox."""
    return 1 << 14 if device.type == "cpu" else 1 << 20


def _graddrop_block(G: Tensor, leak: Tensor, U: Tensor) -> Tensor:
    """The reference's rule on a column block, float64 (K × B block, (K, 1) leak, (B,) uniforms)."""
    G64 = G.to(torch.float64)
    total, abs_total = G64.sum(dim=0), G64.abs().sum(dim=0)
    P = 0.5 * (1.0 + total / torch.where(abs_total > 0, abs_total, 1.0))
    keep = ((P > U) & (G64 > 0)) | ((P < U) & (G64 < 0))
    return ((leak + (1.0 - leak) * keep) * G64).sum(dim=0)


class BlockGradDrop:
    """Any device, any floating dtype (the ``reference`` backend): column blocks with the torch Philox port. The
    seed stays a device tensor (no host synchronisation). Extra memory O(K · block)."""

    name = "blocks"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        return None

    def run(self, G: Tensor, leak: Tensor, seed: Tensor, out: Tensor) -> None:
        N = G.shape[1]
        block = block_columns(G.device)
        for start in range(0, N, block):
            stop = min(start + block, N)
            U = philox_uniform(seed, stop - start, G.device, start=start).to(torch.float64)
            out[start:stop] = _graddrop_block(G[:, start:stop], leak.unsqueeze(1), U).to(out.dtype)


class CppGradDrop:
    """CPU: the compiled kernel (csrc/cpu/streaming_impl.h, SIMD Philox); O(1) extra memory. The seed is
    read from host memory (a CPU tensor: no device to synchronise with)."""

    name = "cpp"

    def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        bad = [d for d in dtypes if d not in (torch.float32, torch.bfloat16)]
        return f"the cpp backend reads and writes float32 and bfloat16 only, got {bad}" if bad else None

    def run(self, G: Tensor, leak: Tensor, seed: Tensor, out: Tensor) -> None:
        K, N = G.shape
        leak64 = leak.to(torch.float64).contiguous()  # kept alive across the call: the kernel reads its address
        _native.module().cpu_graddrop(
            G.data_ptr(), K, N, G.stride(0) if K > 1 else N, _native.DTYPE_CODES[G.dtype], leak64.data_ptr(),
            int(seed.numpy()[0]), out.data_ptr(), _native.DTYPE_CODES[out.dtype], torch.get_num_threads(),
        )  # fmt: skip
        torch.autograd.graph.increment_version(out)


try:
    import triton
    import triton.language as tl

    from ..primitives.triton_kernels import _round_for_store
except ImportError:  # Triton is optional: the backend registry then reports it unavailable
    triton = None

if triton is not None:

    @triton.jit
    def _graddrop_kernel(
        G, Leak, Seed, Out, K, N, row_stride,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Out[cols] = Σ_k (leak_k + (1 − leak_k) keep_kn) g_kn; the sign purity P in float64, U = tl.rand."""
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = cols < N
        total = tl.zeros((BLOCK_N,), dtype=tl.float64)
        abs_total = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            mask = (rows < K)[:, None] & in_cols[None, :]
            g = tl.load(G + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32).to(tl.float64)
            total += tl.sum(g, axis=0)
            abs_total += tl.sum(tl.abs(g), axis=0)
        P = 0.5 * (1.0 + total / tl.where(abs_total > 0, abs_total, 1.0))
        U = tl.rand(tl.load(Seed), cols).to(tl.float64)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            in_rows = rows < K
            mask = in_rows[:, None] & in_cols[None, :]
            g = tl.load(G + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32).to(tl.float64)
            leak = tl.load(Leak + rows, mask=in_rows, other=0.0)[:, None]
            keep = ((P[None, :] > U[None, :]) & (g > 0)) | ((P[None, :] < U[None, :]) & (g < 0))
            acc += tl.sum((leak + (1.0 - leak) * keep.to(tl.float64)) * g, axis=0)
        tl.store(Out + cols, _round_for_store(acc.to(tl.float32), Out.dtype.element_ty), mask=in_cols)

    class TritonGradDrop:
        """The Triton kernel; the seed stays a device tensor, loaded inside the kernel (no host sync)."""

        name = "triton"

        def unsupported(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
            if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
                return (
                    f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device}"
                )
            bad = [d for d in dtypes if d not in KERNEL_DTYPES]
            return f"the triton backend reads and writes {KERNEL_DTYPES} only, got {bad}" if bad else None

        def run(self, G: Tensor, leak: Tensor, seed: Tensor, out: Tensor) -> None:
            K, N = G.shape
            row_stride = G.stride(0) if K > 1 else N
            block_n = 4096 if triton_interpreting() else 512
            with torch.cuda.device(G.device) if G.is_cuda else contextlib.nullcontext():
                _graddrop_kernel[(triton.cdiv(N, block_n),)](
                    G,
                    leak.contiguous(),
                    seed,
                    out,
                    K,
                    N,
                    row_stride,
                    BLOCK_K=8,
                    BLOCK_N=block_n,
                    **TRITON_LAUNCH_OPTIONS,
                )


def implementations() -> dict[str, object]:
    """GradDrop's implementations by backend name (the torch column-block path serves ``reference``)."""
    impls: dict[str, object] = {"reference": BlockGradDrop(), "cpp": CppGradDrop()}
    if triton is not None:
        impls["triton"] = TritonGradDrop()
    return impls
