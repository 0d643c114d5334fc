"""The dual-cone projection QP shared by UPGrad and DualProj, solved exactly with quadprog.

Projecting x = Gᵀu onto the dual cone {y : G y ≥ 0} of the rows of G gives y = Gᵀv with
v = argmin_{v ≥ u} vᵀMv, M = G Gᵀ (Proposition 1 of Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv 2406.16232). Conventions follow ``torchjd._linalg.QuadprogProjector`` (torchjd 0.18):

- M is first normalised by its trace (the squared Frobenius norm of G), so the QP is scale-free;
- ``reg_eps`` · I is added to the normalised M (torchjd's default 1e-4) so that quadprog sees a positive
  definite matrix even for rank-deficient G. This perturbs the projection: by O(reg_eps) relative for a
  well-conditioned M, by up to O(√reg_eps) (a few percent at 1e-4) when M is singular (K > rank G); the
  KKT conditions still guarantee G y ≥ −reg_eps · tr(M) · v componentwise;
- if tr(M) ≤ ``norm_eps`` the normalised M is taken as 0, so v = max(u, 0) (= u for u ≥ 0). torchjd tests
  tr(M) < norm_eps with default 1e-4; the methods here default to norm_eps = 0 (see UPGrad's docstring).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_real


def check_projection_parameters(
    pref_vector: Tensor | None, norm_eps: float, reg_eps: float, owner: str
) -> tuple[float, float]:
    """Reject bad constructor arguments (quadprog needs a positive definite matrix, hence reg_eps > 0); return
    norm_eps and reg_eps as floats. The preference vector weighs the projected rows: negative or all-zero entries
    would turn the combination against the tasks (d ≈ 0 or worse), so they are refused (one host read, here)."""
    if pref_vector is not None:
        if not isinstance(pref_vector, Tensor) or pref_vector.dim() != 1 or not pref_vector.is_floating_point():
            raise ValueError(f"{owner}: pref_vector must be a 1-D floating tensor (one entry per task) or None")
        values = pref_vector.detach().double().cpu()
        if not (bool(torch.isfinite(values).all()) and bool((values >= 0).all()) and float(values.sum()) > 0):
            raise ValueError(f"{owner}: pref_vector must be finite and ≥ 0 with a positive sum, got {values.tolist()}")
    norm_eps = check_real(norm_eps, owner, "norm_eps", minimum=0.0)
    return norm_eps, check_real(reg_eps, owner, "reg_eps", above=0.0)  # quadprog needs a positive definite matrix


class DualConeAggregator(GramianAggregator):
    """The constructor and hyperparameters of UPGrad and DualProj (see :class:`~flatmtl_fast.reference.UPGrad`)."""

    def __init__(self, pref_vector: Tensor | None = None, *, norm_eps: float = 0.0, reg_eps: float = 1e-4) -> None:
        self.norm_eps, self.reg_eps = check_projection_parameters(pref_vector, norm_eps, reg_eps, type(self).__name__)
        self.pref_vector = pref_vector

    def _hyperparameters(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps}


def preference_vector(pref_vector: Tensor | None, K: int, owner: str) -> Tensor:
    """The preference vector p (float64, CPU): the given one, checked against K, or 𝟏/K."""
    if pref_vector is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    if pref_vector.shape != (K,):
        raise ValueError(f"{owner}: pref_vector must have shape ({K},) (one per task), got {tuple(pref_vector.shape)}")
    return pref_vector.detach().to(device="cpu", dtype=torch.float64)


def project_weights(M: Tensor, U: Tensor, *, norm_eps: float, reg_eps: float) -> Tensor:
    """For each row u of ``U`` (B × K), v = argmin_{v ≥ u} vᵀ M̃ v with M̃ the normalised, regularised ``M``.

    Returns the B × K float64 tensor of the v's, on ``M``'s device.
    """
    # Imported here, not at module level: the fused classes subclass the reference ones, and
    # ``import flatmtl_fast`` must not load quadprog.
    import quadprog

    M = M.to(torch.float64)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the Gram matrix must be finite (the gradients contain NaN or Inf, or overflow)")
    trace = float(M.diagonal().sum())
    M_normalised = M / trace if trace > norm_eps else torch.zeros_like(M)
    K = M.shape[0]
    # quadprog.solve_qp(P, q, C, b) minimises ½ vᵀPv − qᵀv subject to Cᵀv ≥ b.
    P = (M_normalised + reg_eps * torch.eye(K, dtype=torch.float64, device=M.device)).cpu().numpy()
    q, C = np.zeros(K), np.eye(K)
    V = [quadprog.solve_qp(P, q, C, u)[0] for u in U.to(torch.float64).cpu().numpy()]
    return torch.as_tensor(np.stack(V), dtype=torch.float64, device=M.device)
