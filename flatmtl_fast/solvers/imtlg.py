"""IMTL-G's closed form from the Gram matrix, as the reference (pseudo-inverse with an absolute cut-off)."""

from __future__ import annotations

import torch
from torch import Tensor


def imtlg_weights(M: Tensor, input_dtype: torch.dtype) -> Tensor:
    """α = [1 − Σ α_{2:K}, α_{2:K}], α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁺, from the float64 Gram M.

    With s_j = 1/‖g_j‖: g_i·u_j = M_ij s_j. The pseudo-inverse drops singular values below 4 K eps(input_dtype)
    max‖g_i‖ (the reference's cut-off, passed as a tensor: no host sync). Zero rows take no part (α_i = 0, as in
    the reference) with fixed shapes: the first nonzero row is swapped into the pivot's place, and each zero row's
    unknown and equation become α_i = 0 — a block of D Uᵀ of its own, so the pseudo-inverse of the rest is the
    one of the nonzero rows' problem.
    """
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device)
    norms = M.diagonal().clamp_min(0.0).sqrt()
    nonzero = norms != 0  # a NaN row is kept: NaN propagates
    index = torch.arange(K, device=M.device)
    pivot = nonzero.to(torch.uint8).argmax()  # the first nonzero row (0 if none)
    swap = torch.where(index == 0, pivot, torch.where(index == pivot, 0, index))  # its own inverse
    M, norms, nonzero = M[swap][:, swap], norms[swap], nonzero[swap]
    inverse = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
    on_unit = M * inverse.unsqueeze(0)  # g_i · u_j
    first_on_U = on_unit[0, :1] - on_unit[0, 1:]
    D_on_U = (on_unit[:1, :1] - on_unit[1:, :1]) - (on_unit[:1, 1:] - on_unit[1:, 1:])
    zero = ~nonzero[1:]
    # The decoupled block at the pivot's scale ‖g_1‖ (1 if every row is zero), not 1: the SVD's absolute error
    # ~ eps σ_max would otherwise leak α_i ~ eps ‖g‖ into it; α_i = 0 is then also set exactly.
    unit = torch.where(on_unit[0, 0] > 0, on_unit[0, 0], 1.0)
    block = torch.eye(K - 1, dtype=M.dtype, device=M.device) * unit
    D_on_U = torch.where(zero.unsqueeze(0) | zero.unsqueeze(1), block, D_on_U)
    first_on_U = torch.where(zero, 0.0, first_on_U)
    cutoff = 4 * K * torch.finfo(input_dtype).eps * norms.max()
    # torch.linalg.pinv(…, atol=tensor) compares on the host; the same SVD-based pseudo-inverse by hand:
    U, S, Vh = torch.linalg.svd(D_on_U)
    inverse_S = torch.where(S > cutoff, 1.0 / torch.where(S > cutoff, S, 1.0), 0.0)
    rest = torch.where(zero, 0.0, first_on_U @ (Vh.mT * inverse_S) @ U.mT)
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])[swap]
