"""Shared pieces of the fused-aggregator tests: method table, inputs, tolerances."""

from __future__ import annotations

import torch

import flatmtl_fast
import flatmtl_fast.reference as reference

U32 = 2.0**-24  # float32 unit roundoff
RANDOMISED = ("PCGrad", "GradVac", "GradDrop", "RLW")
GRAMIAN = (
    "Mean", "Sum", "MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL",
    "FairGrad", "UPGrad", "DualProj", "GradVac", "RLW", "IMGrad",
)  # fmt: skip
ALL = (*GRAMIAN, "GradDrop", "DBMTL")
#: The documented exceptions to "no host sync": on CUDA the torch solvers of these methods call an aten op that
#: waits for torch's host-side check of LAPACK's status (the native solver of IMTL-G does not).
SYNC_ON_CUDA = {"AlignedMTL": "_linalg_eigh", "IMTLG": "_linalg_svd"}

# Relative accuracy of the weights the fused solver returns vs the reference's, on the *same* float64 M
# (argued per method):
# - closed forms / same iteration replayed (Mean, Sum, RLW, PCGrad, GradVac, IMTLG, AlignedMTL, MGDA,
#   NashMTL, FairGrad): the same float64 operations up to summation order: 1e-10;
# - UPGrad / DualProj: a strictly convex QP solved exactly (quadprog) vs interior point + exact active-set
#   polish: both to rounding times the condition number (≤ 1e4 by the ridge): 1e-9;
# - CAGrad / IMGrad: the reference's CLARABEL stops at ~1e-8 in the objective; the √ objective is flat
#   along the optimal face, so its weights are only ~√1e-8 accurate: 3e-4 (our objective is checked ≤ its).
WEIGHT_RTOL = dict.fromkeys(ALL, 1e-10) | {"UPGrad": 1e-9, "DualProj": 1e-9, "CAGrad": 3e-4, "IMGrad": 3e-4}


def make(name: str, seed: int = 0, fused: bool = True, **kwargs):
    """A fused (or reference) aggregator; randomised ones get a CPU generator seeded with ``seed`` unless
    ``generator`` is given (None: torch's default generator of the inputs' device)."""
    module = flatmtl_fast if fused else reference
    if name in RANDOMISED and "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return getattr(module, name)(**kwargs)


def losses_for(name: str, K: int) -> torch.Tensor | None:
    return torch.linspace(0.5, 2.0, K, dtype=torch.float64) if name == "DBMTL" else None


def random_G(K: int, N: int, *, rank: int | None = None, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = min(K, N) if rank is None else rank
    G = torch.randn(K, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, N, generator=g, dtype=torch.float64)
    return (G * scale / N**0.5).to(torch.float32)


def graddrop_problem(K: int, N: int, dtype: torch.dtype, leak: str) -> tuple[torch.Tensor, float | torch.Tensor]:
    """GradDrop's inputs for the kernel-vs-reference tests: G (K × N, randn, every fifth column all zero so
    P = ½ there) and the leak (0.0, or a per-task (K,) tensor for ``leak="per-task"``)."""
    gen = torch.Generator().manual_seed(K * 7919 + N)
    G = torch.randn(K, N, generator=gen).to(dtype)
    G[:, ::5] = 0.0
    return G, (torch.rand(K, generator=gen) if leak == "per-task" else 0.0)


#: Methods whose weights depend on M (whose directions carry a solver error).
SOLVED = tuple(name for name in GRAMIAN if name not in ("Mean", "Sum", "RLW"))


def direction_tolerance(
    name: str, w: torch.Tensor, G: torch.Tensor, out_dtype: torch.dtype, weight_error: torch.Tensor, *, fused: int = 1
) -> torch.Tensor:
    """Entry-wise bound for |d_fused − d_ref| with m = |w|ᵀ|G| (float64) and the fused weights within
    ``weight_error`` (K,) of the reference's w, where ``fused`` of the two directions come from the fused path
    (2: two backends compared with each other):

    - solver: |Δw|ᵀ|G|, with ``weight_error`` measured by the caller (see test_parity.py, assert_paths_agree);
    - combine: each fused direction is a K-term float32 sum, (K + 2)·u·m, then both directions are rounded once
      to the output dtype (the reference's float64 result too): two half-ulps, 2·u(out dtype)·m.
    DB-MTL (w its effective weights α_i (1 − β)/L_i, not 1) adds its float32 state: the gain (1 − β)/L_i
      rounded to float32 and the buffer entry gain·g rounded (2u), the two row norms in α_i = max‖B‖/‖B_i‖,
      each within (3 + 5√4096)·u/2 relative (tests/support/cases.py norm_tolerance), and α's rounding to
      float32 in combine (u): (6 + 5√4096)·u·m ≈ 1.9e-5·m.
    """
    w = w.double()
    m = w.abs() @ G.double().abs()
    rounding = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    state = (6 + 5 * 4096**0.5) * U32 if name == "DBMTL" else 0.0
    combine = fused * (G.shape[0] + 2) * U32
    return weight_error.double() @ G.double().abs() + (state + combine + 2 * rounding) * m + 1e-30


def assert_paths_agree(name: str, G: torch.Tensor, *paths: tuple[str, torch.Tensor]) -> None:
    """The fused directions of the float32 G along two paths, each (backend, G on its device), agree within
    the bound of :func:`direction_tolerance` with both directions fused (e.g. a CUDA backend against the CPU
    path). Each path solves on its own float64 Gram, so the weights differ by at most |w(M_2) − w(M_1)| (the
    problem's sensitivity to the two Grams' rounding, measured with the cpp solver on both) + 2·WEIGHT_RTOL·max|w|
    (each path's solver within WEIGHT_RTOL of the reference on one M: test_weights_parity_on_the_same_gram,
    and for the torch solvers the parity tests' ``reference`` and ``triton`` backends)."""
    losses = losses_for(name, G.shape[0])
    directions, weights = [], []
    for backend, G_on_device in paths:
        losses_on_device = None if losses is None else losses.to(G_on_device.device)
        with flatmtl_fast.use_backend(backend):
            directions.append(make(name)(G_on_device, losses_on_device).cpu().double())
            M = flatmtl_fast.gram(G_on_device, dtype=torch.float64).cpu()  # the aggregator's own (deterministic)
        with flatmtl_fast.use_backend("cpp"):  # a fresh instance: the same draws and starts as the path's
            weights.append(make(name).weights(M, losses))
    error = (weights[1] - weights[0]).abs() + 2 * WEIGHT_RTOL[name] * float(weights[0].abs().max())
    excess = (directions[1] - directions[0]).abs() - direction_tolerance(
        name, weights[0], G, torch.float32, error, fused=2
    )
    assert bool((excess <= 0).all()), f"{name} K={G.shape[0]} {paths[1][0]}: max excess {float(excess.max()):.3g}"
