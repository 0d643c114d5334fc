"""IMTL-G's closed form from the Gram matrix, as the reference (pseudo-inverse with an absolute cut-off)."""

from __future__ import annotations

import torch
from torch import Tensor


def imtlg_weights(M: Tensor, input_dtype: torch.dtype) -> Tensor:
    """α = [1 − Σ α_{2:K}, α_{2:K}], α_{2:K} = (g_1 Uᵀ)(D Uᵀ)⁺, from the float64 Gram M.

    With s_j = 1/‖g_j‖ (0 for a zero row): g_i·u_j = M_ij s_j. The pseudo-inverse drops singular values
    below 4 K eps(input_dtype) max‖g_i‖ (the reference's cut-off, passed as a tensor: no host sync).
    """
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device)
    norms = M.diagonal().clamp_min(0.0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    on_unit = M * inverse.unsqueeze(0)  # g_i · u_j
    first_on_U = on_unit[0, :1] - on_unit[0, 1:]
    D_on_U = (on_unit[:1, :1] - on_unit[1:, :1]) - (on_unit[:1, 1:] - on_unit[1:, 1:])
    cutoff = 4 * K * torch.finfo(input_dtype).eps * norms.max()
    # torch.linalg.pinv(…, atol=tensor) compares on the host; the same SVD-based pseudo-inverse by hand:
    U, S, Vh = torch.linalg.svd(D_on_U)
    inverse_S = torch.where(S > cutoff, 1.0 / torch.where(S > cutoff, S, 1.0), 0.0)
    rest = first_on_U @ (Vh.mT * inverse_S) @ U.mT
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])
