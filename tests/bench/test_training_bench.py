"""CPU smoke test of the training benchmark (bench/training.py): every step implementation runs on the MLP and
on a tiny ViT, the implementations of one method agree with each other, and the breakdown and the memory
measurement of a ViT row work (the GPU session runs this code at ViT-B size; see bench/gpu_session.sh)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from bench import training

CPU = torch.device("cpu")
# The ViT code path at 24 k parameters: 16 patches of 8 × 8, two layers of width 32.
TINY_VIT = {"image": 32, "patch": 8, "dim": 32, "depth": 2, "num_heads": 2, "mlp": 64}
CASES = {"mlp": (None, 8), "vit-b": (TINY_VIT, 4), "deep-narrow": ({"depth": 4}, 4)}  # model -> (arguments, batch)
# Implementations that take the step of another one (same method, same ρ): peer -> ours.
SAME_STEP = {"torchjd": "flatmtl", "autograd-loop": "flatmtl", "flatmtl-batched": "flatmtl", "fmtl-loop": "fmtl"}
# Relative distance allowed between two implementations of one step. Each computes the same float32 task
# gradients (in another summation order, ~1e-7 per entry); torchjd forms the Gram in float32 over N = 4.7 M
# terms (~1e-5 relative) and both solve UPGrad's QP to ~1e-9; the official F-MTL loop forms h = s − g in
# float32 with ‖h‖ ≈ 1e-2 ‖g‖, losing two digits there. Observed: ≤ 1.3e-4 (MLP), ≤ 3e-6 (tiny ViT). Mean
# instead of UPGrad moves the MLP's update by 1.4e-2 (checked below), so 1e-3 still tells the methods apart.
PEER_RTOL = 1e-3


def _update(impl: str, method: str, model: str, amp: bool = False) -> torch.Tensor:
    """The change of the shared parameters in one step of ``impl`` (K = 3, SGD, seeded model and batch)."""
    config, batch = CASES[model]
    net, step = training.make_step(impl, method, training.Case(3, batch, CPU, model, config, amp))
    before = parameters_to_vector(net.trunk.parameters()).detach().clone()
    step()
    return parameters_to_vector(net.trunk.parameters()).detach() - before


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torchjd's vmap over CPU attention backward
@pytest.mark.parametrize(("model", "amp"), [("mlp", False), ("vit-b", False), ("vit-b", True), ("deep-narrow", False)])
def test_every_step_moves_the_shared_parameters_as_its_peers_do(model: str, amp: bool) -> None:
    updates = {impl: _update(impl, "UPGrad", model, amp) for impl in training.available_impls("UPGrad")}
    for impl, update in updates.items():
        assert torch.isfinite(update).all() and update.norm() > 0, impl
    for peer, ours in SAME_STEP.items():
        if peer in updates:
            assert _distance(updates[ours], updates[peer]) <= PEER_RTOL, f"{ours} vs {peer}"
    if "torchjd" in updates:
        assert _distance(_update("flatmtl", "Mean", model, amp), updates["torchjd"]) > 10 * PEER_RTOL
    # Without torchjd too: Sum over the captured rows is the plain summed backward: in float32 the same three
    # gradients added in another order (~1e-5 observed); under bf16 the summed backward rounds the three tasks'
    # signal together once per op (2^-9) where the K passes round each alone (6e-3 observed). Mean is 0.67 away.
    assert _distance(_update("flatmtl", "Sum", model, amp), updates["plain"]) <= (3e-2 if amp else 1e-4)
    if amp:
        # bf16 rounds every activation of the forward pass (2^-9 relative): the update moves by ~1 % (tiny ViT),
        # neither by nothing (autocast ignored) nor by much more (a broken loss)
        assert 1e-4 < _distance(updates["flatmtl"], _update("flatmtl", "UPGrad", model)) <= 0.1


@pytest.mark.parametrize("model", CASES)
def test_the_parts_called_in_order_are_the_flatmtl_step(model: str) -> None:
    """The breakdown times the parts of a real step: two steps made of them move every parameter (heads
    included) exactly as two make_step steps do, so none is missing, repeated or out of order."""
    config, batch = CASES[model]
    case = training.Case(3, batch, CPU, model, config)
    net, step = training.make_step("flatmtl", "UPGrad", case)
    parted, parts = training.step_parts("UPGrad", case)
    for _ in range(2):
        step()
        for part in parts.values():
            part()
    before = parameters_to_vector(training.build(case)[0].parameters())
    moved = parameters_to_vector(net.parameters()).detach()
    assert not torch.equal(moved, before)
    assert torch.equal(parameters_to_vector(parted.parameters()).detach(), moved)


def test_round_robin_medians_time_every_call_in_turn() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    medians = training.round_robin_medians(calls, CPU, 3)
    assert list(medians) == ["a", "b", "c"] and all(seconds > 0 for seconds in medians.values())
    assert order == ["a", "b", "c"] * 5  # two warm-up rounds, then three timed ones


def test_run_gives_prefixed_vit_rows_with_their_memory() -> None:
    rows = training.run(CPU, "UPGrad", [2], 4, 1, "vit-b", ["flatmtl"], config=TINY_VIT)
    n_shared = sum(p.numel() for p in training.ViT(2, **TINY_VIT).trunk.parameters())
    ops = ["vit-b:step:UPGrad", *(f"vit-b:part:{part}" for part in ("forward", "K_backward", "aggregate", "optimizer"))]
    assert [r.op for r in rows] == ops and {r.impl for r in rows} == {"flatmtl"}
    assert all(r.N == n_shared and r.K == 2 and r.dtype == "float32" and r.seconds > 0 for r in rows)
    # -1: the fresh measuring process failed; ≥ 50 MB: it measured another model than this 0.2 MB K × N buffer's
    # (ViT-B's is 690 MB)
    assert rows[0].extra["peak_extra_MB"] != -1.0 and rows[0].extra["peak_extra_MB"] < 50


def test_vit_b_has_the_size_of_vit_b_16() -> None:
    with torch.device("meta"):  # shapes only: no 86 M-parameter allocation
        net = training.ViT(3)
    assert sum(p.numel() for p in net.trunk.parameters()) == 85_798_656  # timm's vit_base_patch16_224, no head
    assert net.input_shape == (3, 224, 224)
    assert [head.in_features for head in net.heads] == [768] * 3
