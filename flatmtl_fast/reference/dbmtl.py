"""DB-MTL — dual-balancing multi-task learning (Lin et al., "Dual-Balancing for Multi-Task Learning",
arXiv 2308.12029; official code: LibMTL's ``DB_MTL``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregators.base import Aggregator, check_state_step
from ..aggregators.checks import check_losses, check_matrix, check_positive_finite_losses, check_real


class DBMTL(Aggregator):
    """DB-MTL: balance the loss scales with logarithms and the gradient magnitudes with an EMA buffer.

    Per call, with the step counter t = 1, 2, … (the number of calls so far, this one included):
    ĝ_i = ∇ log L_i = g_i / L_i;  B ← ĝ + (β / t^σ)(B − ĝ) (B starts at 0);
    α_i = max_j ‖B_j‖ / ‖B_i‖;  d = Σ_i α_i B_i — every buffered gradient rescaled to the largest norm.

    Scale: the **sum** over tasks (as LibMTL). For K = 1, d = B₁, the EMA of g₁/L₁: (1 − β) g₁/L₁ at the
    first call (the buffer starts at 0, as in LibMTL). Not Gramian: the buffer is K × N state.
    Defaults: β = 0.9 (LibMTL's ``DB_beta``), σ = 0.5 (the paper's decay; LibMTL's argparse default for
    ``DB_beta_sigma`` is 0). Update order as LibMTL: increment t, update B, then norms and combination.
    Deviations: LibMTL differentiates log(L + 1e-8) and divides by ‖B_i‖ + 1e-8; here the losses must be
    finite and > 0 (checked) so g/L is exact, and a zero row B_i gets α_i = 0 (it contributes 0 either
    way) — scale-free, no NaN for zero gradients. A non-finite buffer entry (left by a step whose G overflowed,
    which a GradScaler then skipped) restarts from 0 at the next step, B ← ĝ (1 − β/t^σ), instead of poisoning
    every later step: LibMTL's buffer would stay NaN for good.

    State (``state_dict`` / ``load_state_dict`` continue identically; ``reset`` starts over): ``buffer``
    (K × N float64 on G's device, None before the first call), ``step`` (t of the last call, None before) and
    ``rank``: in a distributed step the buffer holds one rank's columns only, and ``rank`` says whose (None
    outside them); a step whose ranks hold other ranks' states (rank 0's checkpoint loaded everywhere) raises.
    """

    needs_losses = True
    _state_attributes = ("buffer", "step", "rank")
    keeps_gradients = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5) -> None:
        self.beta = check_real(beta, "DBMTL", "beta", minimum=0.0, maximum=1.0)
        self.beta_sigma = check_real(beta_sigma, "DBMTL", "beta_sigma", minimum=0.0)
        self.buffer: Tensor | None = None
        self.step: int | None = None
        self.rank: int | None = None

    def _check_state(self, state: dict[str, object]) -> None:
        super()._check_state(state)
        # Not checked for finiteness: a non-finite entry restarts at the next step (see above).
        buffer = state["buffer"]
        if buffer is not None and (
            not isinstance(buffer, Tensor) or buffer.dim() != 2 or not buffer.is_floating_point()
        ):
            raise ValueError(f"DBMTL.load_state_dict: buffer must be None or a K × N floating tensor, got {buffer!r}")
        check_state_step(state["step"], "DBMTL")
        if (buffer is None) != (state["step"] is None):
            raise ValueError("DBMTL.load_state_dict: buffer and step must both be None (before the first step) or not")
        rank = state["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"DBMTL.load_state_dict: rank must be None or an integer >= 0, got {rank!r}")

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, N = check_matrix(G)
        check_losses(losses, K, G.device, required=True, owner="DBMTL")
        check_positive_finite_losses(losses, "DBMTL")
        if self.buffer is None:
            self.buffer, self.step = torch.zeros(K, N, dtype=torch.float64, device=G.device), 0
        elif self.buffer.shape != (K, N):
            raise ValueError(f"DBMTL: the buffer has shape {tuple(self.buffer.shape)}, G {(K, N)}; call reset() first")

        log_grads = G.to(torch.float64) / losses.to(torch.float64).unsqueeze(1)
        self.step += 1
        decay = self.beta / self.step**self.beta_sigma
        previous = self.buffer.to(G.device)
        previous = torch.where(torch.isfinite(previous), previous, 0.0)  # see the class docstring
        self.buffer = log_grads + decay * (previous - log_grads)

        norms = torch.linalg.vector_norm(self.buffer, dim=1)
        alpha = norms.max() / norms
        alpha[norms == 0] = 0.0  # a zero row contributes nothing either way (and max/0 is inf or NaN)
        return (alpha @ self.buffer).to(G.dtype)

    def _hyperparameters(self) -> dict[str, float]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}
