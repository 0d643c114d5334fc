"""IMTL-G: impartial multi-task learning, gradient part.

Source: Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021); no official code was released,
the de-facto reference is LibMTL's ``IMTL`` (gradient branch), whose closed form this follows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..aggregators.base import GramianAggregator
from ..aggregators.checks import check_gramian, check_losses, check_matrix


def _inverse(norms: Tensor) -> Tensor:
    """1/‖g_i‖ of the kept rows (all nonzero, unless every row is zero: then its u = 0 · huge = 0)."""
    return 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny)


def _alpha_from(first_on_U: Tensor, D_on_U: Tensor, cutoff: float) -> Tensor:
    """α = [1 − Σ α_{2:K}, α_{2:K}] with α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁺, singular values ≤ ``cutoff`` dropped."""
    rest = first_on_U @ torch.linalg.pinv(D_on_U, atol=cutoff, rtol=0.0)
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


def _on_nonzero_rows(norms: Tensor, dtype: torch.dtype, solve: Callable[[Tensor, float], Tensor]) -> Tensor:
    """α from ``solve(rows, cutoff)`` on the nonzero rows, 0 on the zero rows (α = e_1 when every row is zero).

    A zero gradient has no direction: with u_i = 0 its equal projection d·u_i = 0 would force d·u_j = 0 for every
    task, i.e. d = 0 — one task without gradient would stop all the others. It takes no part instead (torchjd's
    M⁺ form gives it weight 0 too).

    The pseudo-inverse drops singular values below 4 K eps(dtype) max‖g_i‖: |D_j · U_k| ≤ 4 max‖g_i‖, so this is
    the rounding level of the input (a float32 copy of collinear rows is collinear only to float32 precision).
    torch's default cut-off is relative to D Uᵀ's own largest singular value, which keeps pure rounding noise
    when every U_k ≈ 0 (e.g. K = 2 collinear rows).
    """
    K = norms.shape[0]
    rows = (norms != 0).nonzero().flatten()  # a NaN row is kept: NaN propagates
    rows = rows if rows.numel() else rows.new_zeros(1)
    alpha = torch.zeros(K, dtype=torch.float64, device=norms.device)
    alpha[rows] = solve(rows, 4 * K * torch.finfo(dtype).eps * float(norms.max()))
    return alpha


class IMTLG(GramianAggregator):
    """d = Σ α_i g_i with the closed form of algorithms.md §2: u_i = g_i/‖g_i‖, D_j = g_1 − g_j,
    U_j = u_1 − u_j (j = 2..K), α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:K}.

    d has equal projections on every u_i and Σ α_i = 1 (weights may be negative). Output scale: mean-like
    (d = g₁ when K = 1 or when all rows are equal). No hyper-parameters.
    Deviations from LibMTL (which uses ``torch.inverse``): a singular D Uᵀ (duplicated, collinear or zero rows,
    K > rank) is handled with the Moore–Penrose pseudo-inverse (``torch.linalg.pinv``, its default relative
    cut-off scaled to the gradients, see ``_on_nonzero_rows``; among the α that give equal projections it picks the
    minimum-norm α_{2:K}), and a zero row takes no part (α_i = 0, the others' closed form on their own: a zero u_i
    would force d = 0, see ``_on_nonzero_rows``). torchjd's IMTLG generalises differently (w ∝ M⁺‖g‖); both agree
    whenever M is invertible, and both give zero rows weight 0.
    """

    def __call__(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        K, _ = check_matrix(G, finite=True)
        check_losses(losses, K, G.device, required=False, owner="IMTLG")
        G64 = G.double()
        norms = G64.norm(dim=1)

        def solve(rows: Tensor, cutoff: float) -> Tensor:
            kept = G64[rows]
            U_rows = kept * _inverse(norms[rows])[:, None]
            D = kept[:1] - kept[1:]
            U = U_rows[:1] - U_rows[1:]
            return _alpha_from(kept[0] @ U.T, D @ U.T, cutoff)

        return (_on_nonzero_rows(norms, G.dtype, solve) @ G64).to(G.dtype)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 α from M: with s_j = 1/‖g_j‖, g_i·u_j = M_ij s_j, so
        (g_1 Uᵀ)_j = M_11 s_1 − M_1j s_j and (D Uᵀ)_ij = (M_11 − M_i1) s_1 − (M_1j − M_ij) s_j."""
        K = check_gramian(M, finite=True)
        check_losses(losses, K, M.device, required=False, owner="IMTLG")
        M64 = M.double()
        norms = M64.diagonal().clamp(min=0).sqrt()

        def solve(rows: Tensor, cutoff: float) -> Tensor:
            on_unit = M64[rows][:, rows] * _inverse(norms[rows])[None, :]  # g_i · u_j
            first_on_U = on_unit[0, :1] - on_unit[0, 1:]
            D_on_U = (on_unit[:1, :1] - on_unit[1:, :1]) - (on_unit[:1, 1:] - on_unit[1:, 1:])
            return _alpha_from(first_on_U, D_on_U, cutoff)

        return _on_nonzero_rows(norms, M.dtype, solve)
