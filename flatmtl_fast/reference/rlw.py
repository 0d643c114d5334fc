"""RLW — random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022, arXiv 2111.10603; official code: LibMTL's ``RLW``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._random import draw_on
from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix
from ._generator import GeneratorMixin


class RLW(GeneratorMixin, GramianAggregator):
    """RLW: w = softmax(z) with z ~ N(0, I_K) drawn afresh at every call; d = Σ_i w_i g_i.

    Scale: a convex combination (the weights sum to 1, as LibMTL's softmax weights on the losses);
    for K = 1, w = [1] and d = g₁. Gramian only in the loose sense: the weights ignore M.

    Randomness: per call ONE draw ``z = torch.randn(K, generator=generator, device=D, dtype=torch.float64)``
    with D the generator's device (or the input's device when ``generator`` is None: torch's default
    generator there). :meth:`weights` makes the same draw, so with equal generator states
    ``agg(G) == agg.weights(G @ G.T) @ G``. Deviation: LibMTL draws float32 from the global CPU generator.
    """

    _state_attributes = ("_generator_state",)

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self._init_generator(generator)

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G)
        check_losses(losses, K, G.device, required=False, owner="RLW")
        return (self._draw_weights(K, G) @ G.to(torch.float64)).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M)
        check_losses(losses, K, M.device, required=False, owner="RLW")
        return self._draw_weights(K, M).to(M.dtype)

    def _draw_weights(self, K: int, like: Tensor) -> Tensor:
        z = draw_on(like.device, torch.randn, K, generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0)
