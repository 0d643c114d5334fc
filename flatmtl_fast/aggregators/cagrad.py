"""Fused CAGrad and IMGrad: the simplex problem qᵀw + β‖g_w‖ on the device, then w folded into weights."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import cagrad as reference_cagrad
from ..reference import imgrad as reference_imgrad
from ..solvers.simplex import argmin_linear_plus_norm, combination_norm, conflict_averse_weights, min_norm_weights
from ._fused import FusedGramian


class CAGrad(FusedGramian, reference_cagrad.CAGrad):
    """CAGrad (Liu et al., NeurIPS 2021): w* = argmin_{w∈Δ} wᵀM𝟏/K + c‖g₀‖√(wᵀMw), d = (g₀ + λ g_w) · s / r.

    Constructor (``c=0.4``, ``rescale=1``, ``sum_scale=False``), scale and the treatment of a vanishing g_w are
    those of :class:`flatmtl_fast.reference.CAGrad` (see there). The solver is an on-device second-order-cone
    interior-point method with an exact polish on the optimum's support instead of the reference's CLARABEL
    (~1e-8): its objective value is never above the reference's, its weights agree to the reference's own
    accuracy, and an optimum at g_w = 0 is found exactly. Where the compiled solver reports no convergence (a
    task gradient ~1e-12 of the others leaves its inner QPs too ill-conditioned; the float32 Gram of
    rank-deficient gradients is indefinite by its rounding, ~−1e-7 of its diagonal, where they do not factor),
    the torch solver decides, 10–100× slower (17–88 ms measured at K = 3–40 on 2 cores).
    """

    _torch_solver_if_unconverged = True

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "cagrad", [float(self.c), int(self.rescale), bool(self.sum_scale)]

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        K = M.shape[0]
        b = M.sum(dim=1) / K  # (M𝟏/K)_i = g_i · g₀
        radius = self.c * (b.sum() / K).clamp_min(0.0).sqrt()  # c‖g₀‖
        w = argmin_linear_plus_norm(b, M, radius, squared=False)
        return conflict_averse_weights(M, w, radius, self._output_factor(K))


class IMGrad(FusedGramian, reference_imgrad.IMGrad):
    """IMGrad (Zhou et al., IJCAI 2025), both variants of :class:`flatmtl_fast.reference.IMGrad` (same
    constructor: ``alpha=0.8``, ``variant="official"``; same scales). g_m is the reference MGDA's Frank–Wolfe
    point (same iteration, on the device); the CAGrad-like problem is solved as in :class:`CAGrad`.
    """

    _torch_solver_if_unconverged = True

    def _native_solver(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype):
        return "imgrad", [float(self.alpha), self.variant == "paper"]

    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        K = M.shape[0]
        wm = min_norm_weights(M)
        # g₀·g_m = 𝟏ᵀM w_m / K, ‖g₀‖² = 𝟏ᵀM𝟏/K², ‖g_m‖² = w_mᵀM w_m; cos θ ∈ [0, 1], 0 when ‖g₀‖ = 0 or g_m
        # counts as zero (as the reference: its direction is then rounding).
        gm_norm, gm_zero = combination_norm(M, wm)
        norms = (M.sum().clamp_min(0.0) / K**2).sqrt() * gm_norm
        defined = (norms > 0) & ~gm_zero
        cos = torch.where(defined, (M.sum(dim=0) @ wm) / K / torch.where(defined, norms, 1.0), 0.0)
        cos = cos.clamp(0.0, 1.0)
        b = M.sum(dim=1) / K
        radius = self.alpha * (b.sum() / K).clamp_min(0.0).sqrt()  # c = √φ = α‖g₀‖
        squared = self.variant == "paper"
        q, beta = ((1.0 - cos) if squared else (1.5 - cos)) * b, cos * radius
        w = argmin_linear_plus_norm(q, M, beta, squared=squared)
        factor = 1.0 if squared else K / (1.0 + self.alpha**2)
        return conflict_averse_weights(M, w, radius, factor)
