"""Shared pieces of the primitive tests: backend cases, an independent float64 oracle, tolerances."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import pytest
import torch

import flatmtl_fast
from flatmtl_fast import _native

HAS_CUDA = torch.cuda.is_available()
U32 = 2.0**-24  # unit roundoff of float32


@dataclass(frozen=True)
class Case:
    """A backend to test, on a device, optionally with a forced CPU instruction set."""

    backend: str
    device: str = "cpu"
    isa: str | None = None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.isa or self.device}"

    @contextlib.contextmanager
    def active(self):
        module = _native.module()
        previous = module.cpu_isa() if self.isa else None
        if self.isa:
            module.cpu_set_isa(self.isa)
        try:
            with flatmtl_fast.use_backend(self.backend):
                yield
        finally:
            if previous:
                module.cpu_set_isa(previous)


def _cpu_isas() -> list[str]:
    module = _native.module()
    return module.cpu_supported_isas().split(",") if module else ["unbuilt"]


CPU_CASES = [Case("reference"), *(Case("cpp", isa=isa) for isa in _cpu_isas()), Case("triton")]
GPU_CASES = [Case(name, device="cuda") for name in ("reference", "triton", "cuda")]
ALL_CASES = [pytest.param(c, id=c.id) for c in CPU_CASES] + [
    pytest.param(c, id=c.id, marks=pytest.mark.gpu) for c in GPU_CASES
]


def gram64(G: torch.Tensor) -> torch.Tensor:
    G64 = G.double()
    return G64 @ G64.T


def gram_tolerance(G: torch.Tensor, terms: int = 4096) -> torch.Tensor:
    """Entry-wise bound for |M̂_ij − M_ij|.

    16-bit inputs widen exactly and products of two widened values are exact in float32, so the
    error comes from float32 accumulation of at most ``terms`` products per partial sum (float64
    after that). For rounding errors of random sign the error grows like sqrt(terms)·u·Σ|g_in g_jn|
    ≤ sqrt(terms)·u·‖g_i‖‖g_j‖ (Cauchy–Schwarz); 4096 bounds every backend's partial length
    (cpp: 128 per lane, triton: one BLOCK_N ≤ 4096 dot). We allow 5× that.
    """
    norms = G.double().norm(dim=1)
    return 5 * terms**0.5 * U32 * torch.outer(norms, norms) + 1e-300


def combine_tolerance(w: torch.Tensor, G: torch.Tensor, out_dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
    """Element-wise bound for |d̂_n − d_n|: a K-term float32 sum has error ≤ (K+1)·u·Σ_k|w_k g_kn|
    (γ_K, any summation order), then one rounding to the output dtype (half an ulp)."""
    K = G.shape[0]
    magnitude = abs(alpha) * (w.double().abs() @ G.double().abs())
    rounding = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    return (K + 2) * U32 * magnitude + rounding * magnitude


# Shapes of the per-row reductions (row_norms, ema_row_norms): N = 1, 7, a prime past every block (cpp chunk ≤ 2048
# columns, Triton ≤ 16384, CUDA step 32768) and ~1e6; K across the row blocks (Triton: 8 rows per program). The
# Triton interpreter (~1000× slower) runs at most INTERPRETER_MAX_ELEMENTS; larger shapes run there on the GPU marker.
NORM_SIZES = [(K, N) for K in (1, 2, 3, 7, 40, 64) for N in (1, 7, 100_003)] + [(K, 1_000_003) for K in (1, 3, 7)]
INTERPRETER_MAX_ELEMENTS = 2_000_000


def fits_interpreter(case: Case, elements: int) -> bool:
    """Whether a problem of ``elements`` entries is small enough for ``case`` (the interpreter is slow)."""
    return not (case.backend == "triton" and case.device == "cpu" and elements > INTERPRETER_MAX_ELEMENTS)


@functools.lru_cache(maxsize=2)
def scaled_rows(K: int, N: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different scales (four decades), so a row mixed up with another one shows."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.logspace(-2, 2, K).unsqueeze(1) * torch.randn(K, N, generator=gen)).to(dtype)


def norms64(G: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The oracle: sum of squares in float64, one row at a time (bounded memory), then the square root."""
    w = 1.0 if weight is None else weight.cpu().double()
    return torch.stack([(g.double() * w).square().sum() for g in G.cpu()]).sqrt()


def norm_tolerance(expected: torch.Tensor, terms: int = 4096) -> torch.Tensor:
    """Entry-wise bound for |n̂_i − n_i|, n_i = sqrt(s_i), s_i = Σ_n t_n with t_n = (w_n g_in)² ≥ 0.

    Inputs widen exactly; w·g rounds once in float32 (exact for 16-bit inputs), its square once:
    t̂_n = t_n (1 + δ_n), |δ_n| ≤ 3u. A float32 partial sum of at most ``terms`` of them (cpp: 128 per
    lane and 16 lanes; Triton: one ≤ 4096-column tile; CUDA: 128 per thread) then float64 (negligible).
    All terms are ≥ 0, so every error is relative to s_i itself; rounding errors of random sign grow like
    sqrt(terms)·u (as gram_tolerance) and we allow 5× that. The square root halves a relative error:
    |n̂ − n| ≤ (3 + 5 sqrt(terms)) u / 2 · n.
    """
    return (3 + 5 * terms**0.5) * U32 / 2 * expected + 1e-300


def exact_norms(squares: torch.Tensor, backend: str) -> torch.Tensor:
    """The square roots of the (exact, integer) row sums of ``squares`` as ``backend`` takes them: correctly
    rounded for the kernels (C++ std::sqrt, CUDA's and Triton's float64 sqrt are IEEE), with torch's float64
    sqrt for the reference, which on the CPU is faithful but not always correctly rounded (seen 1 ulp off,
    e.g. for 2397465)."""
    sums = squares.sum(dim=1)
    if backend == "reference":
        return sums.double().sqrt()
    return torch.tensor([math.sqrt(int(s)) for s in sums], dtype=torch.float64)
