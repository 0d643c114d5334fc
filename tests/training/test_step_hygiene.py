"""What ``backward`` and ``FlatParameters`` leave behind: memory freed with the parameters, no ``.grad`` pointing
into internal buffers after a capture or an error, parameters frozen or reshaped after flattening refused, and
DB-MTL's gradient state kept unscaled under a GradScaler."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from training.test_backward import Net, _batch, _expected

import flatmtl_fast
from flatmtl_fast import reference


def test_the_kept_buffer_is_freed_with_its_parameters():
    """backward keeps its K × N buffer with the parameters (not in a registry that would keep them alive)."""

    def one_step() -> weakref.ref:
        net = Net()
        shared = flatmtl_fast.FlatParameters(net.trunk)
        flatmtl_fast.backward(net.losses(*_batch()), shared, flatmtl_fast.UPGrad())
        return weakref.ref(shared)

    gone = one_step()
    gc.collect()
    assert gone() is None


def test_capture_leaves_no_grad_bound_to_the_returned_rows():
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    G = flatmtl_fast.TaskGradients(shared, 3).capture(net.losses(*_batch()))
    captured = G.clone()
    assert all(p.grad is None for p in shared.params)
    sum(p.square().sum() for p in net.trunk.parameters()).backward()  # an unrelated pass, then zero_grad
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad(set_to_none=False)
    assert torch.equal(G, captured)


class _FailingSolve(reference.UPGrad):
    def weights(self, M: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("the solver failed")


def test_an_error_after_the_capture_leaves_no_gradient():
    """The task gradients are captured (a buffer row and the heads' sums sit in .grad) when the solve fails: every
    .grad is left None, so an optimizer step after the caught error moves nothing."""
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    with pytest.raises(RuntimeError, match="the solver failed"):
        flatmtl_fast.backward(net.losses(*_batch()), shared, _FailingSolve(), task_params=list(net.heads.parameters()))
    assert all(p.grad is None for p in net.parameters())


def test_a_shared_parameter_frozen_or_reshaped_after_flattening_is_refused():
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    net.trunk[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter 0 \(16, 6\) no longer requires grad"):
        flatmtl_fast.backward(net.losses(*_batch()), shared, flatmtl_fast.UPGrad())
    net.trunk[0].weight.requires_grad_(True)
    net.trunk[0].bias.data = torch.ones(1)  # would broadcast into the bias's 16 slots
    with pytest.raises(ValueError, match=r"parameter 1 changed shape from \(16,\) to \(1,\)"):
        shared.refresh()


def test_parameters_replaced_by_load_state_dict_assign_are_named_in_the_error():
    """assign=True swaps in new Parameter objects, which FlatParameters never saw: the error says so."""
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    net.load_state_dict(Net().state_dict(), assign=True)
    with pytest.raises(ValueError, match=r"load_state_dict\(assign=True\).*build FlatParameters again"):
        flatmtl_fast.backward(net.losses(*_batch()), shared, flatmtl_fast.UPGrad())


@pytest.mark.parametrize("namespace", [reference, flatmtl_fast], ids=["reference", "fused"])
def test_dbmtl_under_a_changing_grad_scale_steps_as_without_a_scaler(namespace):
    """DB-MTL's EMA keeps gradients: under a scale that grows at every step it must see them unscaled, so every
    unscaled .grad equals the run without a scaler. An overflowed step then gives NaN (the scaler skips it) and
    leaves the EMA finite: it advances as for zero gradients (as the Gramian methods' state does for M = 0)."""
    x, y = _batch()
    nets = [Net(), Net()]
    shared = [flatmtl_fast.FlatParameters(net.trunk) for net in nets]
    aggregators = [namespace.DBMTL(), namespace.DBMTL()]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.05) for net in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)

    def scaled_step(losses: list[torch.Tensor]) -> None:
        flatmtl_fast.backward([scaler.scale(loss) for loss in losses], shared[1], aggregators[1], scaler=scaler)
        scaler.unscale_(optimizers[1])

    for _ in range(4):
        flatmtl_fast.backward(nets[0].losses(x, y), shared[0], aggregators[0])
        scaled_step(nets[1].losses(x, y))
        torch.testing.assert_close(shared[1].grad, shared[0].grad, rtol=1e-5, atol=1e-7)
        for optimizer in optimizers:
            scaler.step(optimizer) if optimizer is optimizers[1] else optimizer.step()
            optimizer.zero_grad()
        scaler.update()
    assert scaler.get_scale() == 16.0 * 2**4
    before = [p.detach().clone() for p in nets[1].parameters()]
    overflowed = nets[1].losses(x, y)
    overflowed[1] = overflowed[1] * float("inf")
    scaled_step(overflowed)
    assert shared[1].grad.isnan().all()
    scaler.step(optimizers[1])
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(nets[1].parameters(), before, strict=True))
    assert scaler.get_scale() == 16.0 * 2**3 and torch.isfinite(torch.as_tensor(aggregators[1].buffer)).all()
    optimizers[1].zero_grad()
    scaled_step(nets[1].losses(x, y))
    assert shared[1].grad.isfinite().all()


@pytest.mark.parametrize("name", ["UPGrad", "AlignedMTL", "IMTLG", "DBMTL"])
def test_a_scaler_overflow_with_a_reference_aggregator_gives_a_skipped_step(name):
    """The reference solvers refuse a non-finite Gram: under "propagate" backward writes NaN itself, the scaler
    skips the step, and the next step equals a clean one."""
    x, y = _batch()
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    overflowed = [scaler.scale(loss) for loss in net.losses(x, y)]
    overflowed[0] = overflowed[0] * float("inf")
    aggregator = getattr(reference, name)()
    flatmtl_fast.backward(overflowed, shared, aggregator, scaler=scaler)
    assert not shared.grad.isfinite().any()
    expected, _ = _expected(net, getattr(reference, name)(), x, y)
    flatmtl_fast.backward(
        [scaler.scale(loss) for loss in net.losses(x, y)], shared, getattr(reference, name)(), scaler=scaler
    )
    torch.testing.assert_close(shared.grad / 8.0, expected.float(), rtol=1e-5, atol=1e-7)
