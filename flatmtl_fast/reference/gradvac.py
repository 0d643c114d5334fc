"""GradVac — gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, arXiv 2010.05874, Algorithm 1; no official code
was released: compared with LibMTL's ``GradVac`` and ``torchjd.aggregation.GradVac``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator, check_state_tensor
from ..aggregators.checks import check_gramian, check_losses, check_matrix, check_real
from ._generator import GeneratorMixin
from ._projection_loop import Correction, corrected_direction, corrected_weights, draw_orders


class GradVac(GeneratorMixin, GramianAggregator):
    """GradVac, whole-model form: PCGrad's loop with adaptive cosine targets.

    For each i, in a random order of j ≠ i, with φ_ij = g_i'·g_j / (‖g_i'‖‖g_j‖ + eps) against the
    *original* g_j: if φ_ij < φ̂_ij then
    g_i' += ‖g_i'‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²) + eps) · g_j,
    which raises the cosine to the target; then, for every visited pair, φ̂_ij ← (1−β) φ̂_ij + β φ_ij
    (φ_ij measured before the correction). d = Σ_i g_i'.

    Scale: the **sum** of the corrected gradients (as the paper, LibMTL and torchjd); for K = 1, d = g₁.
    State: the K × K targets φ̂ (float64, start at 0 on the first call or after :meth:`reset`) and the
    generator's state; :meth:`state_dict` / :meth:`load_state_dict` continue identically.

    Defaults: ``beta=0.01`` as the paper (LibMTL's and torchjd's default is 0.5), ``eps=1e-8`` in both
    denominators as LibMTL and torchjd. Deviations: LibMTL updates φ̂_ij only when it corrects (inside the
    ``if``); this class follows the paper and torchjd (every visited pair). √(1−x²) is clamped at 0 for
    rounding, and a zero denominator (possible only with ``eps=0``) skips the pair instead of dividing.
    Because eps is absolute, cosines of gradients with ‖g_i‖‖g_j‖ ≲ eps are damped towards 0 (as in both
    implementations). Whole-model form only (LibMTL's ``group_type=0``).

    Randomness: the same contract as :class:`~flatmtl_fast.reference.PCGrad` — one draw
    ``torch.rand((K, K), generator=generator, device=D, dtype=torch.float64)`` per call, D the generator's
    device (else the input's), row i visits the j ≠ i by ascending keys[i, j] (stable argsort).
    ``__call__`` (explicit vectors, float64) and :meth:`weights` (Gram form) consume the generator and
    update φ̂ identically.
    """

    _state_attributes = ("phi_hat", "_generator_state")

    def __init__(self, beta: float = 0.01, eps: float = 1e-8, *, generator: torch.Generator | None = None) -> None:
        self.beta = check_real(beta, "GradVac", "beta", minimum=0.0, maximum=1.0)
        self.eps = check_real(eps, "GradVac", "eps", minimum=0.0)
        self.phi_hat: Tensor | None = None
        self._init_generator(generator)

    def _check_state(self, state: dict[str, object]) -> None:
        super()._check_state(state)
        check_state_tensor(state["phi_hat"], "GradVac", "phi_hat", 2)
        phi_hat = state["phi_hat"]
        if phi_hat is not None and phi_hat.shape[0] != phi_hat.shape[1]:
            raise ValueError(f"GradVac.load_state_dict: phi_hat must be K × K, got shape {tuple(phi_hat.shape)}")

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="GradVac")
        orders = draw_orders(K, self.generator, self._draw_device(G))
        return corrected_direction(G.to(torch.float64), orders, self._correction(K, G.device)).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="GradVac")
        orders = draw_orders(K, self.generator, self._draw_device(M))
        return corrected_weights(M.to(torch.float64), orders, self._correction(K, M.device)).to(M.dtype)

    def _correction(self, K: int, device: torch.device) -> Correction:
        """The pair rule, bound to the targets φ̂ (created at 0, updated in place as pairs are visited)."""
        if self.phi_hat is None:
            self.phi_hat = torch.zeros(K, K, dtype=torch.float64, device=device)
        elif self.phi_hat.shape != (K, K):
            raise ValueError(
                f"GradVac: the targets are for K = {self.phi_hat.shape[0]} tasks, got K = {K}; call reset() first"
            )
        phi_hat, beta, eps = self.phi_hat, self.beta, self.eps

        def correction(i: int, j: int, dot: float, sq_norm_i: float, sq_norm_j: float) -> float:
            norm_i, norm_j = math.sqrt(max(sq_norm_i, 0.0)), math.sqrt(max(sq_norm_j, 0.0))
            cos_denominator = norm_i * norm_j + eps
            phi = dot / cos_denominator if cos_denominator > 0.0 else 0.0
            target = float(phi_hat[i, j])
            c = 0.0
            if phi < target:
                sin_phi, sin_target = math.sqrt(max(1.0 - phi**2, 0.0)), math.sqrt(max(1.0 - target**2, 0.0))
                denominator = norm_j * sin_target + eps
                if denominator > 0.0:
                    c = norm_i * (target * sin_phi - phi * sin_target) / denominator
            phi_hat[i, j] = (1.0 - beta) * target + beta * phi
            return c

        return correction

    def _hyperparameters(self) -> dict[str, float]:
        return {"beta": self.beta, "eps": self.eps}
