"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone, Liu; NeurIPS 2023, arXiv 2306.03792).

Official code: GitHub ``Cranial-XIX/FAMO`` (``methods/weight_methods.py``, class ``FAMO``). A loss
weighting, not a gradient aggregator: it needs no per-task gradients, so its cost is O(K) per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregators.checks import check_count, check_real, check_state_keys


class FAMO:
    """Loss weighting that balances the tasks' log-loss decrease rates.

    Per step: z = softmax(ξ), D_i = L_i − L_i^min + ε; the loss to backpropagate is
    Σ_i z_i log D_i / Σ_i (z_i / D_i) (the denominator detached), which gives the shared parameters
    the gradient Σ_i (z_i / D_i) g_i / c. After the optimizer step, :meth:`update` with the new losses
    of the same batch forms δ_i = log D_i^prev − log D_i^new and moves ξ by one Adam step along
    (∂z/∂ξ)ᵀ δ (the softmax Jacobian, as the official code's ``autograd.grad(softmax(w), w, δ)``).

    Defaults are the official class's: Adam with lr 0.025 and weight decay ``gamma`` = 0.01 on ξ
    (betas 0.9/0.999, eps 1e-8 as torch's Adam), ε = 1e-8, minimum losses 0. Everything stays on the
    device (the Adam step is written out in tensor operations: no host synchronisation).

    Usage::

        famo = flatmtl_fast.FAMO(num_tasks=3)
        famo.backward(losses)           # instead of sum(losses).backward()
        optimizer.step()
        with torch.no_grad():
            famo.update(model_losses(batch))  # the same batch, after the step
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        gamma: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        eps: float = 1e-8,
        min_losses: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_tasks = check_count(num_tasks, "FAMO", "num_tasks", minimum=1)
        self.lr = check_real(lr, "FAMO", "lr", above=0.0)
        self.gamma = check_real(gamma, "FAMO", "gamma (weight decay)", minimum=0.0)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"FAMO: betas must be a pair (β1, β2), got {betas!r}")
        self.betas = tuple(check_real(b, "FAMO", f"betas[{i}]", minimum=0.0, below=1.0) for i, b in enumerate(betas))
        self.adam_eps = check_real(adam_eps, "FAMO", "adam_eps", above=0.0)
        self.eps = check_real(eps, "FAMO", "eps (added to the losses before their log)", above=0.0)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if min_losses is None:
            self.min_losses = torch.zeros(num_tasks, device=device)
        else:
            self.min_losses = torch.as_tensor(min_losses).detach().clone()  # a list of numbers too
            if not self.min_losses.is_floating_point():
                self.min_losses = self.min_losses.float()
        if self.min_losses.shape != (num_tasks,):
            raise ValueError(f"FAMO: min_losses must have shape ({num_tasks},), got {tuple(self.min_losses.shape)}")
        self.reset()

    def reset(self) -> None:
        """Back to uniform weights and a fresh Adam state."""
        device = self.min_losses.device
        self.logits = torch.zeros(self.num_tasks, device=device)
        self._exp_avg = torch.zeros(self.num_tasks, device=device)
        self._exp_avg_sq = torch.zeros(self.num_tasks, device=device)
        self._step = torch.zeros((), device=device)
        self._prev_losses: Tensor | None = None

    @property
    def weights(self) -> Tensor:
        """z = softmax(ξ), the current task weights."""
        return torch.softmax(self.logits, dim=0)

    def _as_vector(self, losses: Sequence[Tensor] | Tensor, what: str) -> Tensor:
        vector = (
            losses
            if isinstance(losses, Tensor)
            else torch.stack([torch.as_tensor(loss).reshape(()) for loss in losses])
        )
        if vector.shape != (self.num_tasks,):
            raise ValueError(f"FAMO.{what}: expected {self.num_tasks} losses, got shape {tuple(vector.shape)}")
        if vector.device != self.logits.device:
            self._to(vector.device)
        return vector

    def _to(self, device: torch.device) -> None:
        for name in ("logits", "_exp_avg", "_exp_avg_sq", "_step", "min_losses"):
            setattr(self, name, getattr(self, name).to(device))

    def loss(self, losses: Sequence[Tensor] | Tensor) -> Tensor:
        """The scalar to backpropagate; remembers the losses for :meth:`update`."""
        L = self._as_vector(losses, "loss")
        self._prev_losses = L.detach().clone()
        z = self.weights
        D = L - self.min_losses + self.eps
        c = (z / D).sum().detach()
        return (z * D.log()).sum() / c

    def backward(self, losses: Sequence[Tensor] | Tensor, **backward_kwargs: Any) -> None:
        """``self.loss(losses).backward(**backward_kwargs)``."""
        self.loss(losses).backward(**backward_kwargs)

    @torch.no_grad()
    def update(self, new_losses: Sequence[Tensor] | Tensor) -> None:
        """One Adam step on ξ from the decrease of the log-losses across the optimizer step."""
        if self._prev_losses is None:
            raise RuntimeError(
                "FAMO.update: call FAMO.loss / FAMO.backward first (it records the losses before the step)"
            )
        new = self._as_vector(new_losses, "update").detach()
        delta = (self._prev_losses - self.min_losses + self.eps).log() - (new - self.min_losses + self.eps).log()
        z = self.weights
        grad = z * (delta - (z * delta).sum())  # (∂softmax/∂ξ)ᵀ δ
        grad = grad + self.gamma * self.logits  # torch.optim.Adam's (L2) weight decay
        beta1, beta2 = self.betas
        self._step += 1
        self._exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self._step
        bias2 = 1 - beta2**self._step
        denom = (self._exp_avg_sq / bias2).sqrt() + self.adam_eps
        self.logits -= self.lr * (self._exp_avg / bias1) / denom

    def state_dict(self) -> dict[str, Tensor | None]:
        return {
            "logits": self.logits.clone(),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
            "step": self._step.clone(),
            "min_losses": self.min_losses.clone(),
            "prev_losses": None if self._prev_losses is None else self._prev_losses.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        expected = {"logits", "exp_avg", "exp_avg_sq", "step", "min_losses", "prev_losses"}
        check_state_keys(state, expected, "FAMO.load_state_dict")
        # Checked before anything is set: a rejected state leaves this FAMO as it was.
        shapes = {"logits": (self.num_tasks,), "exp_avg": (self.num_tasks,), "exp_avg_sq": (self.num_tasks,)}
        shapes |= {"step": (), "min_losses": (self.num_tasks,), "prev_losses": (self.num_tasks,)}
        for key, shape in shapes.items():
            value = state[key]
            if key == "prev_losses" and value is None:
                continue
            if not isinstance(value, Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"FAMO.load_state_dict: {key} must be a tensor of shape {shape} (this FAMO has {self.num_tasks} "
                    f"tasks), got {got}"
                )
        self.logits = state["logits"].clone()
        self._exp_avg = state["exp_avg"].clone()
        self._exp_avg_sq = state["exp_avg_sq"].clone()
        self._step = state["step"].clone()
        self.min_losses = state["min_losses"].clone()
        self._prev_losses = None if state["prev_losses"] is None else state["prev_losses"].clone()
