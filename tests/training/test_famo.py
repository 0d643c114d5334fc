"""FAMO against a literal transcription of the official algorithm (torch.optim.Adam + autograd through softmax)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.host_sync import forbid_host_sync

import flatmtl_fast


class OfficialFAMO:
    """The official class's arithmetic, written the way its code does it (independent of ours)."""

    def __init__(self, n_tasks: int, gamma: float = 0.01, w_lr: float = 0.025) -> None:
        self.min_losses = torch.zeros(n_tasks)
        self.w = torch.zeros(n_tasks, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def get_weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + 1e-8
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr_loss: torch.Tensor) -> None:
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - (curr_loss - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randn(64, 3) * torch.tensor([1.0, 5.0, 0.2])
    return model, x, y


def _losses(model, x, y):
    return ((model(x) - y) ** 2).mean(0)


def test_matches_the_official_algorithm_over_many_steps():
    model_a, x, y = _problem()
    model_b, _, _ = _problem()
    ours, official = flatmtl_fast.FAMO(3), OfficialFAMO(3)
    opt_a, opt_b = torch.optim.SGD(model_a.parameters(), lr=0.05), torch.optim.SGD(model_b.parameters(), lr=0.05)
    for _ in range(50):
        opt_a.zero_grad()
        ours.backward(_losses(model_a, x, y))
        opt_a.step()
        with torch.no_grad():
            ours.update(_losses(model_a, x, y))
        opt_b.zero_grad()
        official.get_weighted_loss(_losses(model_b, x, y)).backward()
        opt_b.step()
        with torch.no_grad():
            official.update(_losses(model_b, x, y))
    # Same float32 arithmetic in another order (explicit softmax Jacobian vs autograd): ~1e-7 relative per
    # step; Adam divides by √v, so where a logit's gradient is near 0 the steps can differ by more. 50
    # steps of lr 0.025 stay within 1e-5.
    assert torch.allclose(ours.logits, official.w.detach(), rtol=1e-4, atol=1e-5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours.weights, torch.full((3,), 1 / 3))  # it did learn something


def test_state_dict_round_trip_continues_identically():
    model, x, y = _problem()
    famo = flatmtl_fast.FAMO(3)
    for _ in range(5):
        famo.loss(_losses(model, x, y))
        famo.update(_losses(model, x, y) * 0.9)
    clone = flatmtl_fast.FAMO(3)
    clone.load_state_dict(famo.state_dict())
    for agent in (famo, clone):
        agent.loss(_losses(model, x, y))
        agent.update(_losses(model, x, y) * 0.8)
    assert torch.equal(famo.logits, clone.logits)


def test_no_host_sync():
    model, x, y = _problem()
    famo = flatmtl_fast.FAMO(3)
    with forbid_host_sync():
        famo.backward(_losses(model, x, y))
        with torch.no_grad():
            famo.update(_losses(model, x, y))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_tasks must be"):
        flatmtl_fast.FAMO(0)
    bad = {
        "num_tasks": ((3.5,), {}),
        "lr": ((3,), {"lr": float("inf")}),
        "gamma": ((3,), {"gamma": float("nan")}),
        r"betas\[0\]": ((3,), {"betas": (1.0, 0.999)}),
        r"betas\[1\]": ((3,), {"betas": (0.9, -1.0)}),
        "betas must be a pair": ((3,), {"betas": 0.9}),
        "adam_eps": ((3,), {"adam_eps": -1.0}),
        "eps": ((3,), {"eps": 0.0}),
    }
    for name, (args, kwargs) in bad.items():
        with pytest.raises(ValueError, match=f"FAMO: {name}"):
            flatmtl_fast.FAMO(*args, **kwargs)
    famo = flatmtl_fast.FAMO(3)
    with pytest.raises(RuntimeError, match=r"call FAMO\.loss"):
        famo.update(torch.ones(3))
    with pytest.raises(ValueError, match="expected 3 losses"):
        famo.loss(torch.ones(2, requires_grad=True))


def test_a_state_of_another_shape_is_refused_and_min_losses_take_a_list():
    famo = flatmtl_fast.FAMO(3)
    saved = famo.state_dict()
    with pytest.raises(
        ValueError, match=r"logits must be a tensor of shape \(3,\) \(this FAMO has 3 tasks\), got \(1,\)"
    ):
        famo.load_state_dict(flatmtl_fast.FAMO(1).state_dict())
    with pytest.raises(ValueError, match="prev_losses must be a tensor of shape"):
        famo.load_state_dict(saved | {"prev_losses": torch.ones(5)})
    with pytest.raises(TypeError, match=r"FAMO\.load_state_dict: state must be a dict"):
        famo.load_state_dict(None)
    with pytest.raises(KeyError, match=r"FAMO.load_state_dict: missing keys \['step'\], unexpected keys \['steps'\]"):
        famo.load_state_dict({("steps" if k == "step" else k): v for k, v in saved.items()})
    assert all(torch.equal(v, saved[k]) for k, v in famo.state_dict().items() if v is not None)  # untouched
    assert torch.equal(flatmtl_fast.FAMO(3, min_losses=[0, 0.5, 1]).min_losses, torch.tensor([0.0, 0.5, 1.0]))
