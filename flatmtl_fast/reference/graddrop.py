"""GradDrop — gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, arXiv 2010.06808, Algorithm 1 lines 10–15; compared with
``torchjd.aggregation.GradDrop`` and LibMTL's ``GradDrop``)."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from .._device import as_device_tensor
from .._random import draw
from ..aggregators.base import Aggregator
from ..aggregators.checks import check_losses, check_matrix
from ._generator import GeneratorMixin
from ._philox import philox_uniform


class GradDrop(GeneratorMixin, Aggregator):
    """GradDrop: per coordinate n, keep the gradients of one sign chosen at random by sign purity.

    P_n = ½ (1 + Σ_k g_k[n] / Σ_k |g_k[n]|) (P_n = ½ where every g_k[n] = 0), U_n ~ U[0, 1);
    m_k[n] = 1 if (P_n > U_n and g_k[n] > 0) or (P_n < U_n and g_k[n] < 0), else 0;
    d = Σ_k (ℓ_k + (1 − ℓ_k) m_k) ⊙ g_k with the leak ℓ (default 0: d = Σ_k m_k ⊙ g_k).

    Scale: the **sum** of the kept components (as the paper and torchjd). K = 1 returns g₁: P_n is 1 where
    g₁[n] > 0 and 0 where g₁[n] < 0 — except where U_n is exactly 0 (probability 2⁻³¹ per coordinate,
    Triton's uniforms include 0), where the strict rule drops a negative g₁[n].
    Not Gramian: the mask is per coordinate. Deviations: only the identity as the purity transform f
    (torchjd's ``f``); the paper applies GradDrop to activation gradients summed over the batch, here to
    the flat per-task parameter gradients (as torchjd and LibMTL). P_n is computed in float64 and compared
    with U_n (float32, exact in float64); a float32 P_n could flip decisions where |P_n − U_n| ≲ 1e-7.

    ``leak``: a float in [0, 1] for every task, or a tensor of shape (K,) (torchjd's per-task leak).

    Randomness (so a fused kernel reproduces U bit for bit): per call ONE draw of a 62-bit seed,
    ``seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=D))`` with D the generator's
    device (or G's device when ``generator`` is None: torch's default generator there); then
    U_n = ``triton.language.rand(seed, n)`` for n = 0 … N − 1 with int64 offsets n
    (:func:`~flatmtl_fast.reference._philox.philox_uniform`, Philox-4x32-10).
    """

    _state_attributes = ("_generator_state",)

    def __init__(self, leak: float | Tensor = 0.0, *, generator: torch.Generator | None = None) -> None:
        if isinstance(leak, list | tuple):  # one leak per task
            leak = torch.tensor(leak, dtype=torch.float64)
        if isinstance(leak, bool) or not isinstance(leak, Tensor | Real):
            raise ValueError(f"GradDrop: leak must be a float, a sequence or a 1-D tensor in [0, 1], got {leak!r}")
        leak_values = leak if isinstance(leak, Tensor) else torch.tensor(float(leak))
        if leak_values.dim() > 1 or not bool(((leak_values >= 0) & (leak_values <= 1)).all()):
            raise ValueError(f"GradDrop: leak must be a float, a sequence or a 1-D tensor in [0, 1], got {leak}")
        self.leak = leak
        self._init_generator(generator)

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, N = check_matrix(G)
        check_losses(losses, K, G.device, required=False, owner="GradDrop")
        leak = self._leak_column(K, G.device)
        seed = int(draw(torch.randint, 0, 2**62, (1,), generator=self.generator, device=self._draw_device(G)))
        U = philox_uniform(seed, N, G.device).to(torch.float64)

        G64 = G.to(torch.float64)
        total, abs_total = G64.sum(dim=0), G64.abs().sum(dim=0)
        # An all-zero column has total = 0, so a unit denominator gives P = ½ without dividing 0 by 0.
        P = 0.5 * (1.0 + total / torch.where(abs_total > 0, abs_total, torch.ones_like(abs_total)))
        keep = ((P > U) & (G64 > 0)) | ((P < U) & (G64 < 0))
        return ((leak + (1.0 - leak) * keep) * G64).sum(dim=0).to(G.dtype)

    def _leak_column(self, K: int, device: torch.device) -> Tensor:
        """The leak as a (K, 1) float64 column (broadcast over coordinates)."""
        leak = as_device_tensor(self.leak, device, torch.float64, what="GradDrop's leak (put it on G's device)")
        if leak.dim() == 1 and leak.shape != (K,):
            raise ValueError(f"GradDrop: leak has {leak.shape[0]} entries but G has K = {K} rows")
        return leak.expand(K).unsqueeze(1)

    def _hyperparameters(self) -> dict[str, object]:
        return {"leak": self.leak}
