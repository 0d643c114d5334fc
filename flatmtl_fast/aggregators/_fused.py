"""The shared fused path of the Gramian aggregators: one ``gram`` pass, a K × K solve, one ``combine`` pass."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ..primitives import check_runnable, combine, gram
from ..primitives.checks import check_flag
from ..solvers.native import solve_natively
from .base import GramianAggregator
from .checks import check_gramian, check_losses, check_matrix, check_streaming


class FusedGramian(GramianAggregator):
    """``agg(G, losses=None, *, out=None, check_finite=False)``: M = gram(G) in float64, w = weights(M), d = wᵀG.

    Peak extra memory O(K² + N) (none at all beyond K² with ``out``); every scale or norm clip of the
    method is folded into w. ``out`` receives d (e.g. a flat ``.grad`` view) and fixes the result dtype
    (G's otherwise). Nothing synchronises with the device.

    Non-finite input: a NaN/Inf in G makes M non-finite; the solver then runs on M = 0 (so it cannot
    fail or loop) and the weights are set to NaN, so the whole direction is NaN — never a finite
    direction computed from corrupted input. ``check_finite=True`` raises ``FloatingPointError`` instead
    (one host synchronisation, in ``gram``). State kept between steps is then updated as for M = 0.
    """

    #: False for methods whose weights ignore M (Mean, Sum, RLW): the Gram pass is skipped.
    _uses_gram: bool = True
    #: True where the reference's ``weights`` returns M's dtype rather than float64.
    _weights_in_input_dtype: bool = False

    def __call__(
        self, G: Tensor, losses: Tensor | None = None, *, out: Tensor | None = None, check_finite: bool = False
    ) -> Tensor:
        K, _ = check_matrix(G)
        check_losses(losses, K, G.device, required=self.needs_losses, owner=type(self).__name__)
        check_finite = check_flag(check_finite, type(self).__name__, "check_finite")
        out = check_streaming(G, out, type(self).__name__)  # before the solve, which may advance state
        check_runnable("combine", G.device, G.dtype, G.dtype if out is None else out.dtype)
        if self._uses_gram:
            w = self._guarded_weights(gram(G, dtype=torch.float64, check_finite=check_finite), losses, G.dtype)
        else:
            if check_finite and not bool(torch.isfinite(G).all()):
                raise FloatingPointError(f"{type(self).__name__}: G contains NaN or Inf")
            # The weights ignore M: these methods read only its shape and device, so it is left unfilled (no launch
            # on a GPU) and needs no guard; a NaN in G reaches d column by column.
            w = self._solve(torch.empty(K, K, dtype=torch.float64, device=G.device), losses, G.dtype)
        return combine(w, G, out=out)

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gramian(M)
        check_losses(losses, K, M.device, required=self.needs_losses, owner=type(self).__name__)
        w = self._guarded_weights(M.to(torch.float64), losses, M.dtype)
        return w.to(M.dtype) if self._weights_in_input_dtype else w

    def _guarded_weights(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        losses = None if losses is None else losses.detach()  # the weights are constants, as the native solvers'
        # A native solver applies the non-finite policy (class docstring) to M inside its own call.
        w = solve_natively(self, M, losses, input_dtype)
        if w is None:
            finite = torch.isfinite(M).all()
            w = torch.where(finite, self._solve(torch.where(finite, M, 0.0), losses, input_dtype), torch.nan)
        if self.needs_losses:  # a NaN/Inf loss the weights depend on: NaN weights too, not a silent divisor of 1
            w = torch.where(torch.isfinite(losses).all(), w, torch.nan)
        return w

    #: Methods with a compiled solver (csrc/include/flatmtl/solvers) define
    #: ``_native_solver(M, losses, input_dtype) -> (solver name, parameters) | None``; see solvers/native.py.

    @abstractmethod
    def _solve(self, M: Tensor, losses: Tensor | None, input_dtype: torch.dtype) -> Tensor:
        """The float64 weights from the finite float64 Gram ``M``; ``input_dtype`` is G's (or M's) dtype."""
