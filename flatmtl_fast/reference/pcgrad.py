"""PCGrad — projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, arXiv 2001.06782, Algorithm 1; official code: GitHub ``tianheyu927/PCGrad``, also
``torchjd.aggregation.PCGrad`` and LibMTL's ``PCGrad``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix
from ._generator import GeneratorMixin
from ._projection_loop import corrected_direction, corrected_weights, draw_orders


def _pcgrad_correction(i: int, j: int, dot: float, sq_norm_i: float, sq_norm_j: float) -> float:
    # Remove the component of g_i' along g_j only when they conflict. A zero g_j has dot = 0 and is
    # skipped; the sq_norm_j guard also covers a user-given M whose M_jj rounds to 0.
    if dot < 0.0 and sq_norm_j > 0.0:
        return -dot / sq_norm_j
    return 0.0


class PCGrad(GeneratorMixin, GramianAggregator):
    """PCGrad: for each i, in a random order of j ≠ i, if g_i'·g_j < 0 then g_i' −= (g_i'·g_j/‖g_j‖²) g_j,
    always projecting against the *original* g_j; d = Σ_i g_i'.

    Scale: the **sum** of the corrected gradients (as the paper, the official code, LibMTL and torchjd);
    for K = 1, d = g₁. Zero rows are never projected against (they have no direction), so they never
    produce NaN.

    Randomness: one draw per call, ``keys = torch.rand((K, K), generator=generator, device=D,
    dtype=torch.float64)`` with D the generator's device (or the input's device when ``generator`` is
    None, i.e. torch's default generator there); row i visits the j ≠ i by ascending keys[i, j] (stable
    argsort). ``__call__`` and :meth:`weights` consume the generator identically, so with equal generator
    states ``agg(G) ≈ agg.weights(G @ G.T) @ G``. Deviation: the official code shuffles with Python's
    ``random.shuffle`` (torchjd: ``torch.randperm`` on the global generator), so the orders differ from
    theirs; the distribution of orders is the same (uniform over permutations).

    ``__call__`` works on the explicit vectors (float64); :meth:`weights` runs the same loop in Gram form
    (coefficient matrix C with g_i' = Σ_k C_ik g_k, w = column sums of C).
    """

    _state_attributes = ("_generator_state",)

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self._init_generator(generator)

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="PCGrad")
        orders = draw_orders(K, self.generator, self._draw_device(G))
        return corrected_direction(G.to(torch.float64), orders, _pcgrad_correction).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="PCGrad")
        orders = draw_orders(K, self.generator, self._draw_device(M))
        return corrected_weights(M.to(torch.float64), orders, _pcgrad_correction).to(M.dtype)
