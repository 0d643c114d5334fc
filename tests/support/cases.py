"""Shared pieces of the primitive tests: backend cases, an independent float64 oracle, tolerances."""

from __future__ import annotations

import contextlib
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
