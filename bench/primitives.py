"""Benchmark of the streaming primitives beside plain torch: gram (G @ G.T), combine (w @ G), row_norms
(ASAM's weighted norms, torch.linalg.vector_norm(G * θ, dim=1)) and perturb (SAM's step, torch.addcmul).

Per case: the bytes that must move (one read of G, plus one write of d for combine, plus one read of θ
for row_norms; perturb reads θ and a row of G and writes θ'), the median time, the achieved bandwidth,
its fraction of the measured copy bandwidth, and the read floor (bytes / measured read bandwidth) —
for each available backend and for torch, on the same inputs.
"""

from __future__ import annotations

import torch

import flatmtl_fast

from .common import Row, median_time, rotation

SUITE = "primitives"


def backends_for(device: torch.device) -> list[str]:
    """The compiled/Triton backends that can run on this device (the reference is a float64 oracle)."""
    report = flatmtl_fast.backends()
    wanted = ("cpp",) if device.type == "cpu" else ("triton", "cuda")
    return [name for name in wanted if report[name] == "available"]


def measure_case(device: torch.device, K: int, N: int, dtype: torch.dtype, repeat: int) -> list[Row]:
    """gram, combine, row_norms and perturb of one (K, N, dtype) for torch and every usable backend, on the
    same inputs."""
    G = torch.randn(K, N, device=device).to(dtype)
    w = torch.randn(K, device=device)
    w_cast = w.to(dtype)
    scale = torch.tensor([0.05], device=device)
    scale_cast = scale.to(dtype)
    # Preallocated outputs for everyone: a fresh N-sized tensor per call costs page faults.
    # Inputs per call: G, an N-sized output, θ (row_norms' weight, perturb's saved copy).
    inputs = rotation(G, torch.empty(N, dtype=dtype, device=device), torch.randn(N, device=device).to(dtype))
    vector_bytes = N * G.element_size()
    gram_bytes = G.numel() * G.element_size()
    combine_bytes = gram_bytes + vector_bytes
    norms_bytes = gram_bytes + vector_bytes
    perturb_bytes = 3 * vector_bytes
    name = str(dtype).replace("torch.", "")
    rows: list[Row] = []

    def time_(fn, op: str, impl: str, nbytes: int, peer_seconds: float | None = None) -> float:
        seconds = median_time(fn, device, inputs, repeat=repeat)
        row = Row(SUITE, op, impl, K, N, name, seconds, nbytes)
        if peer_seconds is not None:
            row.extra["speedup_vs_torch"] = peer_seconds / seconds
        rows.append(row)
        return seconds

    torch_gram = time_(lambda g, o, t: g @ g.T, "gram", "torch G@G.T", gram_bytes)
    torch_combine = time_(lambda g, o, t: torch.matmul(w_cast, g, out=o), "combine", "torch w@G", combine_bytes)
    torch_norms = time_(lambda g, o, t: torch.linalg.vector_norm(g * t, dim=1), "row_norms", "torch norm", norms_bytes)
    torch_perturb = time_(
        lambda g, o, t: torch.addcmul(t, scale_cast, g[0], out=o), "perturb", "torch b+s*d", perturb_bytes
    )
    for backend in backends_for(device):
        with flatmtl_fast.use_backend(backend):
            time_(lambda g, o, t: flatmtl_fast.gram(g), "gram", backend, gram_bytes, torch_gram)
            time_(lambda g, o, t: flatmtl_fast.combine(w, g, out=o), "combine", backend, combine_bytes, torch_combine)
            time_(lambda g, o, t: flatmtl_fast.row_norms(g, weight=t), "row_norms", backend, norms_bytes, torch_norms)
            time_(
                lambda g, o, t: flatmtl_fast.perturb(t, g[0], scale, out=o), "perturb", backend, perturb_bytes,
                torch_perturb,
            )  # fmt: skip
            time_(
                lambda g, o, t: flatmtl_fast.perturb(t, g[0], scale, out=o, adaptive=True), "perturb:adaptive",
                backend, perturb_bytes,
            )  # fmt: skip
    return rows


def run(device: torch.device, Ks: list[int], Ns: list[int], dtypes: list[torch.dtype], repeat: int) -> list[Row]:
    return [row for N in Ns for K in Ks for dtype in dtypes for row in measure_case(device, K, N, dtype, repeat)]
