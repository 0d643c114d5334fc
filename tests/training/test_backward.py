"""flatmtl_fast.backward against plain per-task torch.autograd.grad + the reference aggregator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatmtl_fast
from flatmtl_fast import reference

METHODS = [
    "Mean", "Sum", "MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "FairGrad",
    "UPGrad", "DualProj", "GradVac", "GradDrop", "RLW", "DBMTL", "IMGrad",
]  # fmt: skip
RANDOM = {"PCGrad", "GradVac", "GradDrop", "RLW"}


def _make(name: str, namespace=reference, seed: int = 0):
    cls = getattr(namespace, name)
    return cls(generator=torch.Generator().manual_seed(seed)) if name in RANDOM else cls()


class Net(nn.Module):
    """A shared MLP trunk with K linear heads."""

    def __init__(self, K: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, i]) ** 2).mean() + 0.1 for i, head in enumerate(self.heads)]


def _batch(seed: int = 1, K: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=gen), torch.randn(32, K, generator=gen)


def _expected(net: Net, agg, x, y):
    """Per-task gradients by plain autograd.grad, aggregated by ``agg``; heads: Σ_i ∂L_i/∂θ."""
    shared = list(net.trunk.parameters())
    heads = list(net.heads.parameters())
    losses = net.losses(x, y)
    G = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(l, shared, retain_graph=True)]) for l in losses]
    )
    head_grads = torch.autograd.grad(sum(losses), heads)
    loss_values = torch.stack([l.detach() for l in losses]).double()
    return agg(G, loss_values), head_grads


@pytest.mark.parametrize("namespace", [reference, flatmtl_fast], ids=["reference", "fused"])
@pytest.mark.parametrize("name", METHODS)
def test_backward_equals_autograd_plus_reference(name, namespace):
    net = Net()
    x, y = _batch()
    expected_d, expected_heads = _expected(net, _make(name), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    losses = net.losses(x, y)
    w = flatmtl_fast.backward(losses, shared, _make(name, namespace), task_params=net.heads.parameters())
    got = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
    # float32 gradients, float32-accumulated Gram, solvers to ~1e-9 (CAGrad/IMGrad: the reference's conic
    # solver is only ~1e-5 accurate in w, see tests/fused) -> 1e-4 of the direction's norm
    tol = 1e-4 * expected_d.norm() + 1e-7
    assert (got - expected_d).norm() <= tol, f"{name}: {(got - expected_d).norm():.3g} > {tol:.3g}"
    assert torch.equal(got, shared.grad)  # the .grad tensors are views of the flat buffer
    for p, g in zip(net.heads.parameters(), expected_heads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-7)
    if isinstance(_make(name), flatmtl_fast.aggregators.GramianAggregator):
        assert w is not None and w.shape == (3,)


@pytest.mark.parametrize("name", METHODS)
def test_a_float64_model_trains_in_float64(name):
    """float64 parameters: the task gradients, the Gram and the combination stay in float64 (the kernels take
    16- and 32-bit floats: auto serves float64 with the reference primitives), so the step equals the reference's
    to float64 rounding — except where the reference's own solve is looser (CAGrad's and IMGrad's conic solver,
    ~1e-8 here) and DB-MTL, whose EMA state is float32 by design (2^-24 relative)."""
    net = Net().double()
    x, y = (t.double() for t in _batch())
    expected_d, expected_heads = _expected(net, _make(name), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    flatmtl_fast.backward(net.losses(x, y), shared, _make(name, flatmtl_fast), task_params=net.heads.parameters())
    assert shared.grad.dtype == torch.float64
    relative = 1e-7 if name in ("CAGrad", "IMGrad", "DBMTL") else 1e-13
    assert (shared.grad - expected_d).norm() <= relative * expected_d.norm(), name
    for p, g in zip(net.heads.parameters(), expected_heads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-13, atol=0)


def test_bfloat16_task_gradient_storage():
    net = Net()
    x, y = _batch()
    expected_d, _ = _expected(net, reference.UPGrad(), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    flatmtl_fast.backward(net.losses(x, y), shared, reference.UPGrad(), grad_dtype=torch.bfloat16)
    # each g_i is rounded to bf16 (relative 2^-8 per entry); UPGrad is Lipschitz in G near this input
    assert (shared.grad - expected_d).norm() <= 2e-2 * expected_d.norm()


def test_representation_mode_weights_come_from_feature_gradients():
    net = Net()
    x, y = _batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    z = net.trunk(x)
    losses = [((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(net.heads)]
    Z = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].flatten() for l in losses]).double()
    expected_w = reference.MGDA().weights(Z @ Z.T)
    w = flatmtl_fast.backward(losses, shared, reference.MGDA(), representation=z, task_params=net.heads.parameters())
    assert torch.allclose(w, expected_w)
    z2 = net.trunk(x)
    weighted = sum(
        float(wi) * ((h(z2).squeeze(1) - y[:, i]) ** 2).mean()
        for i, (wi, h) in enumerate(zip(w, net.heads, strict=True))
    )
    expected = torch.autograd.grad(weighted, list(net.trunk.parameters()))
    assert torch.allclose(shared.grad, torch.cat([g.flatten() for g in expected]), rtol=1e-5, atol=1e-7)


def test_grad_scaler_weights_see_unscaled_gradients():
    net = Net()
    x, y = _batch()
    expected_d, _ = _expected(net, reference.NashMTL(), x, y)  # not scale-invariant: norm clip
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    losses = [scaler.scale(l) for l in net.losses(x, y)]
    flatmtl_fast.backward(losses, shared, reference.NashMTL(), scaler=scaler)
    assert torch.allclose(shared.grad / 1024.0, expected_d, rtol=1e-5, atol=1e-8)
    scaler.unscale_(optimizer)
    assert torch.allclose(shared.grad, expected_d, rtol=1e-5, atol=1e-8)


def test_nan_loss_raises_and_leaves_optimizer_untouched():
    net = Net()
    x, y = _batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    flatmtl_fast.backward(net.losses(x, y), shared, reference.UPGrad(), task_params=net.heads.parameters())
    optimizer.step()
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state.items()}
    params_before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad()
    losses = net.losses(x, y)
    losses[1] = losses[1] * float("nan")
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        flatmtl_fast.backward(losses, shared, reference.UPGrad(), task_params=net.heads.parameters())
    assert all(p.grad is None for p in net.parameters())
    optimizer.step()  # every parameter is skipped
    for p, before in zip(net.parameters(), params_before, strict=True):
        assert torch.equal(p.detach(), before)
    for k, v in optimizer.state.items():
        for n, t in v.items():
            assert torch.equal(t, state_before[k][n])


def test_nan_skip_policy_returns_none_without_raising():
    net = Net()
    x, y = _batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    losses = net.losses(x, y)
    losses[0] = losses[0] * float("inf")
    assert flatmtl_fast.backward(losses, shared, reference.Mean(), nonfinite="skip") is None
    assert all(p.grad is None for p in net.trunk.parameters())


def test_bad_inputs():
    net = Net()
    x, y = _batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    losses = net.losses(x, y)
    with pytest.raises(ValueError, match="loss 0 must be a scalar"):
        flatmtl_fast.backward([net.trunk(x).sum(1), *losses[1:]], shared, reference.Mean())
    with pytest.raises(ValueError, match="loss 2 does not depend on the shared parameters"):
        flatmtl_fast.backward(
            [*net.losses(x, y)[:2], net.heads[0].weight.sum()],
            shared,
            reference.Mean(),
            task_params=net.heads.parameters(),
        )
    flatmtl_fast.release_buffers(shared)
    flatmtl_fast.backward(net.losses(x, y), shared, reference.Mean())
    with pytest.raises(ValueError, match="number of losses changed from 3 to 2"):
        flatmtl_fast.backward(net.losses(x, y)[:2], shared, reference.Mean())
    with pytest.raises(TypeError, match="shared must be a FlatParameters"):
        flatmtl_fast.backward(net.losses(x, y), list(net.trunk.parameters()), reference.Mean())
    with pytest.raises(ValueError, match="nonfinite must be"):
        flatmtl_fast.backward(net.losses(x, y), shared, reference.Mean(), nonfinite="ignore")
    with pytest.raises(ValueError, match="parameters are on several devices"):
        flatmtl_fast.FlatParameters([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="meta"))])


def test_flat_parameters_survive_state_dict_and_optimizer():
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = _batch()
    flatmtl_fast.backward(net.losses(x, y), shared, reference.UPGrad(), task_params=net.heads.parameters())
    optimizer.step()
    assert shared.is_flat()
    assert not torch.equal(net.state_dict()["trunk.0.weight"], state["trunk.0.weight"])
    net.load_state_dict(state)
    assert shared.is_flat() and torch.equal(net.state_dict()["trunk.0.weight"], state["trunk.0.weight"])
    net.double()  # gives the parameters new storage: refresh re-flattens, keeping the values
    assert not shared.is_flat()
    shared.refresh()
    assert shared.is_flat() and shared.dtype == torch.float64
    assert torch.equal(net.trunk[0].weight.detach(), state["trunk.0.weight"].double())


def test_flat_parameters_and_task_gradients_bad_inputs():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no parameters given"):
        flatmtl_fast.FlatParameters([])
    with pytest.raises(ValueError, match="a parameter appears twice"):
        flatmtl_fast.FlatParameters([p, p])
    with pytest.raises(ValueError, match="one floating dtype"):
        flatmtl_fast.FlatParameters([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(TypeError, match="expected parameters"):
        flatmtl_fast.FlatParameters([1.0])
    shared = flatmtl_fast.FlatParameters([nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="num_tasks must be"):
        flatmtl_fast.TaskGradients(shared, 0)
    with pytest.raises(ValueError, match="num_tasks must be an integer"):
        flatmtl_fast.TaskGradients(shared, 2.0)
    with pytest.raises(TypeError, match="shared must be a FlatParameters, got Linear"):
        flatmtl_fast.TaskGradients(nn.Linear(2, 2), 2)
    with pytest.raises(TypeError, match="TaskGradients: dtype must be float32, bfloat16, float16 or float64"):
        flatmtl_fast.TaskGradients(shared, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="single one: \\[param\\]\\), got a tensor"):  # not its rows
        flatmtl_fast.FlatParameters(nn.Parameter(torch.ones(3, 4)))
    with pytest.raises(TypeError, match="got int"):
        flatmtl_fast.FlatParameters(3)
    with pytest.raises(ValueError, match="parameter 0 is computed by autograd"):
        flatmtl_fast.FlatParameters([p * 2.0])
    with pytest.raises(TypeError, match="release_buffers: shared must be a FlatParameters"):
        flatmtl_fast.release_buffers(3)
    with pytest.raises(ValueError, match="expected one view per parameter"):
        shared.bind_grad_views([])
    capture = flatmtl_fast.TaskGradients(shared, 2)
    assert capture.fits() and not capture.fits(torch.bfloat16)
    loss = (shared.params[0] ** 2).sum()
    with pytest.raises(ValueError, match="expected 2 losses"):
        capture.capture([loss])
    with pytest.raises(ValueError, match="loss 1 must be a scalar tensor that requires grad"):
        capture.capture([loss, torch.tensor(1.0)])


def test_the_loss_values_are_one_stack_and_one_conversion():
    """K losses become the (K,) float64 values with two kernels (stack, conversion), not a conversion per loss (a
    launch each on a GPU); losses of several dtypes (e.g. some computed under autocast) still stack, exactly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flatmtl_fast.training.backward import detached_losses

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in ("detach", "view", "alias", "_reshape_alias"):
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    weights = torch.randn(10, requires_grad=True)
    losses = [(weights[i] * 3).exp() for i in range(10)]
    with Kernels() as kernels:
        values = detached_losses(losses)
    assert sorted(kernels.names) == ["_to_copy", "stack"], kernels.names
    assert values.dtype == torch.float64 and not values.requires_grad
    assert torch.equal(values, torch.stack([loss.detach().double() for loss in losses]))
    mixed = [losses[0].bfloat16(), losses[1], losses[2].half()]
    assert torch.equal(
        detached_losses(mixed), torch.tensor([float(loss.detach()) for loss in mixed], dtype=torch.float64)
    )


def test_steady_steps_rebind_the_kept_gradient_views():
    """The K + 1 rebindings of every ``p.grad`` per step reuse views cut once (a slice and a view per parameter per
    task would cost host time proportional to K·P): a second step slices nothing, and each step's ``.grad`` is
    still that step's direction, also after the optimizer unbinds the gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Slices(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ in ("slice", "split", "split_with_sizes")
            return func(*args, **(kwargs or {}))

    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        x, y = _batch(seed=step)
        expected_d, _ = _expected(net, reference.UPGrad(), x, y)
        optimizer.zero_grad(set_to_none=True)
        losses = net.losses(x, y)
        with Slices() as slices:
            flatmtl_fast.backward(losses, shared, flatmtl_fast.UPGrad(), task_params=net.heads.parameters())
        got = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
        assert (got - expected_d).norm() <= 1e-4 * expected_d.norm() + 1e-7, step
        assert all(p.grad.data_ptr() == view.data_ptr() for p, view in shared.views(shared.grad))
        if step > 0:
            assert slices.count == 0
        optimizer.step()


def test_a_dtype_change_under_a_storage_dtype_rebuilds_the_task_buffer():
    """bfloat16 task-gradient storage for float32 parameters goes through a float32 scratch row; after
    ``module.double()`` the kept buffer's storage dtype still matches, but its scratch row no longer fits the
    parameters: the buffer is rebuilt (a float64 scratch row) instead of binding float32 views to float64 ones."""
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    x, y = _batch()
    flatmtl_fast.backward(net.losses(x, y), shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16)
    net.double()
    x, y = x.double(), y.double()
    expected_d, _ = _expected(net, reference.UPGrad(), x, y)
    flatmtl_fast.backward(net.losses(x, y), shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16)
    assert shared.grad.dtype == torch.float64
    # bfloat16 rows (relative rounding 2⁻⁹ per entry) move the direction by well under 2 % of its norm
    assert (shared.grad - expected_d).norm() <= 2e-2 * expected_d.norm()


def test_a_loss_reaching_some_shared_parameters_is_captured_and_none_raises():
    """Reachability is read from the row's version counter (autograd adds into the bound views in place): a loss
    through only the last shared layer still counts, its other entries stay zero; the parameters carry no hooks."""
    net = Net()
    x, y = _batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    last_bias = net.trunk[2].bias
    losses = [*net.losses(x, y)[:2], (last_bias**2).sum()]
    captured = flatmtl_fast.TaskGradients(shared, 3)
    G = captured.capture(losses)
    start = shared.offsets[-2]  # the last bias is the last shared parameter
    assert shared.params[-1] is last_bias
    torch.testing.assert_close(G[2, start:], 2 * last_bias.detach(), rtol=0, atol=0)
    assert not G[2, :start].any()
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in shared.params)
    with pytest.raises(ValueError, match="loss 1 does not depend on the shared parameters"):
        captured.capture([losses[0], net.heads[0].weight.sum(), losses[2]])


def test_a_parameter_given_new_storage_is_seen_and_reflattened():
    """``p.data = ...`` with a fresh tensor (same shape, dtype and device) leaves the flat storage: refresh notices
    by address and re-flattens, keeping the new values."""
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    weight = net.trunk[0].weight
    fresh = torch.randn_like(weight)
    weight.data = fresh.clone()
    assert not shared.is_flat()
    shared.refresh()
    assert shared.is_flat() and torch.equal(weight.detach(), fresh)
    assert weight.data_ptr() == shared.data.data_ptr()


def _micro_batch_losses(net: Net, x, y, parts: int) -> list[list[torch.Tensor]]:
    """Each micro-batch's K losses divided by the number of micro-batches: they sum to the whole batch's."""
    return [
        [loss / parts for loss in net.losses(xs, ys)] for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True)
    ]


@pytest.mark.parametrize("name", METHODS)
def test_accumulated_micro_batches_step_as_the_whole_batch(name):
    """aggregate=False on all micro-batches but the last: their task gradients and losses add up in the kept
    buffer, then one aggregation — the .grad and weights of one call on the whole batch. Between the calls the
    shared .grad is None (no partial sum for an optimizer to read); heads accumulate as autograd does."""
    x, y = _batch()
    whole, micro = Net(), Net()
    shared_whole = flatmtl_fast.FlatParameters(whole.trunk)
    w_whole = flatmtl_fast.backward(
        whole.losses(x, y), shared_whole, _make(name, flatmtl_fast), task_params=whole.heads.parameters()
    )
    shared = flatmtl_fast.FlatParameters(micro.trunk)
    aggregator = _make(name, flatmtl_fast)
    *first, last = _micro_batch_losses(micro, x, y, parts=4)
    for losses in first:
        returned = flatmtl_fast.backward(
            losses, shared, aggregator, task_params=micro.heads.parameters(), aggregate=False
        )
        assert returned is None and all(p.grad is None for p in micro.trunk.parameters())
    w = flatmtl_fast.backward(last, shared, aggregator, task_params=micro.heads.parameters())
    # the same gradients summed in another order (float32, ~√4·u relative), the same solver -> 1e-4 of ‖d‖
    assert (shared.grad - shared_whole.grad).norm() <= 1e-4 * shared_whole.grad.norm() + 1e-7
    for p, q in zip(micro.heads.parameters(), whole.heads.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    if w_whole is not None:
        torch.testing.assert_close(w, w_whole, rtol=1e-4, atol=1e-6)
    # the next round starts from zero: a second whole-batch step through two micro-batches
    x2, y2 = _batch(seed=5)
    flatmtl_fast.backward(whole.losses(x2, y2), shared_whole, _make(name, flatmtl_fast, seed=1))
    aggregator = _make(name, flatmtl_fast, seed=1)
    first, last = _micro_batch_losses(micro, x2, y2, parts=2)
    flatmtl_fast.backward(first, shared, aggregator, aggregate=False)
    flatmtl_fast.backward(last, shared, aggregator)
    assert (shared.grad - shared_whole.grad).norm() <= 1e-4 * shared_whole.grad.norm() + 1e-7


def test_accumulation_in_bfloat16_storage_and_its_misuses():
    """bfloat16 rows add each micro-batch through the float32 scratch row (one rounding per micro-batch); a
    non-finite micro-batch is judged at the aggregating call, and "skip" drops the whole accumulated batch;
    accumulation does not mix with representation= or a change of storage."""
    net = Net()
    x, y = _batch()
    expected_d, _ = _expected(net, reference.UPGrad(), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    *first, last = _micro_batch_losses(net, x, y, parts=4)
    for losses in first:
        flatmtl_fast.backward(losses, shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16, aggregate=False)
    flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16)
    # 4 roundings of the rows to bfloat16 (2⁻⁹ relative each) move d by well under 2 % of its norm
    assert (shared.grad - expected_d).norm() <= 2e-2 * expected_d.norm()

    first, last = _micro_batch_losses(net, x, y, parts=2)
    flatmtl_fast.backward([first[0] * float("nan"), *first[1:]], shared, flatmtl_fast.UPGrad(), aggregate=False)
    with pytest.raises(ValueError, match="changed while micro-batches were accumulating"):
        flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not accumulate micro-batches"):
        flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), representation=torch.ones(1, requires_grad=True))
    first, last = _micro_batch_losses(net, x, y, parts=2)
    assert flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), nonfinite="skip") is None
    assert all(p.grad is None for p in net.trunk.parameters())
    first, last = _micro_batch_losses(net, x, y, parts=2)  # the skipped batch is gone: a fresh round
    flatmtl_fast.backward(first, shared, flatmtl_fast.UPGrad(), aggregate=False)
    flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad())
    assert (shared.grad - expected_d).norm() <= 1e-4 * expected_d.norm()
    with pytest.raises(ValueError, match="does not accumulate micro-batches"):
        flatmtl_fast.backward(
            net.losses(x, y), shared, flatmtl_fast.UPGrad(), representation=net.trunk(x), aggregate=False
        )
    with pytest.raises(TypeError, match="aggregate must be a bool"):
        flatmtl_fast.backward(net.losses(x, y), shared, flatmtl_fast.UPGrad(), aggregate=None)


@pytest.mark.parametrize("name", METHODS)
def test_batched_capture_steps_as_the_k_passes(name):
    """batched=True: one vmapped backward pass for the K rows, one plain pass for the heads — the same .grad (and
    heads' .grad, through AccumulateGrad) as the K passes, to float32 rounding (vmapped products may sum in
    another order)."""
    x, y = _batch()
    passes, batched = Net(), Net()
    shared_passes = flatmtl_fast.FlatParameters(passes.trunk)
    flatmtl_fast.backward(
        passes.losses(x, y), shared_passes, _make(name, flatmtl_fast), task_params=passes.heads.parameters()
    )
    shared = flatmtl_fast.FlatParameters(batched.trunk)
    reached = []
    batched.heads[0].weight.register_post_accumulate_grad_hook(lambda p: reached.append(p))
    losses = batched.losses(x, y)
    flatmtl_fast.backward(
        losses, shared, _make(name, flatmtl_fast), task_params=batched.heads.parameters(), batched=True
    )
    assert (shared.grad - shared_passes.grad).norm() <= 1e-5 * shared_passes.grad.norm() + 1e-7
    for p, q in zip(batched.heads.parameters(), passes.heads.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert reached == [batched.heads[0].weight]  # the heads' hooks ran
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in shared.views(shared.grad))


def test_batched_capture_accumulates_stores_bfloat16_and_reads_unreached_parameters_as_zero():
    net = Net()
    x, y = _batch()
    expected_d, _ = _expected(net, reference.UPGrad(), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    *first, last = _micro_batch_losses(net, x, y, parts=4)
    for losses in first:
        flatmtl_fast.backward(
            losses, shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16, aggregate=False, batched=True
        )
    flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), grad_dtype=torch.bfloat16, batched=True)
    assert (shared.grad - expected_d).norm() <= 2e-2 * expected_d.norm()  # 4 bfloat16 roundings, as above
    # a loss through the last layer only: the first layer's columns of its row are zero; rows of the others full
    captured = flatmtl_fast.TaskGradients(shared, 2)
    captured.buffer.fill_(float("nan"))  # stale content must not survive where no gradient arrives
    z = net.trunk(x)
    G = captured.capture([(net.trunk[2].bias ** 2).sum(), net.heads[0](z).sum()], batched=True)
    assert torch.isfinite(G).all() and not G[0, : shared.offsets[-2]].any() and G[1].abs().sum() > 0
    with pytest.raises(ValueError, match="no loss depends on the shared parameters"):
        captured.capture([net.heads[0].weight.sum(), net.heads[1].weight.sum()], batched=True)
    with pytest.raises(ValueError, match="not batched=True"):
        flatmtl_fast.backward(net.losses(x, y), shared, flatmtl_fast.UPGrad(), representation=z, batched=True)
    with pytest.raises(TypeError, match="batched must be a bool"):
        flatmtl_fast.backward(net.losses(x, y), shared, flatmtl_fast.UPGrad(), batched="yes")


def test_a_failed_capture_leaves_no_gradient_and_drops_the_accumulated_micro_batches():
    """A loss that does not reach the shared parameters fails the capture half-way: the rows already hold some of
    the call's gradients and .grad is bound to one of them. The error must leave every .grad None (an optimizer
    step then changes nothing) and drop the pending micro-batches (they would aggregate with a partial one), so
    the next accumulation equals a clean one."""
    x, y = _batch()
    net, clean = Net(), Net()
    shared, shared_clean = flatmtl_fast.FlatParameters(net.trunk), flatmtl_fast.FlatParameters(clean.trunk)
    heads = list(net.heads.parameters())
    first, last = _micro_batch_losses(net, x, y, parts=2)
    flatmtl_fast.backward(first, shared, flatmtl_fast.UPGrad(), task_params=heads, aggregate=False)

    def broken() -> list[torch.Tensor]:
        return [*net.losses(x, y)[:2], net.heads[0].weight.sum()]

    with pytest.raises(ValueError, match="loss 2 does not depend") as raised:
        flatmtl_fast.backward(broken(), shared, flatmtl_fast.UPGrad(), task_params=heads, aggregate=False)
    assert "micro-batches accumulated so far (aggregate=False) were dropped" in "".join(raised.value.__notes__)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="loss 2 does not depend") as raised:  # no pending batches: no note
        flatmtl_fast.backward(broken(), shared, flatmtl_fast.UPGrad(), task_params=heads)
    assert not getattr(raised.value, "__notes__", []) and all(p.grad is None for p in net.parameters())
    first, last = _micro_batch_losses(net, x, y, parts=2)
    flatmtl_fast.backward(first, shared, flatmtl_fast.UPGrad(), task_params=heads, aggregate=False)
    flatmtl_fast.backward(last, shared, flatmtl_fast.UPGrad(), task_params=heads)
    first, last = _micro_batch_losses(clean, x, y, parts=2)
    flatmtl_fast.backward(first, shared_clean, flatmtl_fast.UPGrad(), aggregate=False)
    flatmtl_fast.backward(last, shared_clean, flatmtl_fast.UPGrad())
    assert torch.equal(shared.grad, shared_clean.grad)


def test_zero_dim_shared_parameters_and_bad_task_parameters():
    """A 0-dim shared parameter (a learnable temperature) is a one-element view; frozen shared parameters and
    task parameters that are a tensor, frozen, shared or given twice, or a scaler of another type, raise clearly."""
    torch.manual_seed(0)
    layer, temperature = nn.Linear(4, 3), nn.Parameter(torch.tensor(0.7))
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    shared = flatmtl_fast.FlatParameters([*layer.parameters(), temperature])
    assert temperature.shape == () and shared.numel == 16
    x = torch.randn(8, 4)
    z = torch.tanh(layer(x) * temperature)
    losses = [head(z).pow(2).mean() for head in heads]
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared.params, retain_graph=True)])
                     for loss in losses])  # fmt: skip
    flatmtl_fast.backward(losses, shared, reference.Mean(), task_params=heads.parameters())
    torch.testing.assert_close(shared.grad, G.mean(0))
    assert temperature.grad.shape == ()

    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter 1 does not require grad \(frozen\)"):
        flatmtl_fast.FlatParameters(frozen)
    z = torch.tanh(layer(x) * temperature)
    losses = [head(z).pow(2).mean() for head in heads]
    bad = {
        "a tensor": (heads[0].weight, TypeError, "task_params must be an iterable of parameters"),
        "frozen": ([torch.zeros(3)], TypeError, "must contain parameters that require grad"),
        "shared": ([layer.weight], ValueError, "is shared or appears twice"),
        "twice": ([heads[0].bias, heads[0].bias], ValueError, "is shared or appears twice"),
        # A tensor computed from a parameter: the passes would stop at it and leave that parameter without .grad.
        "not a leaf": ([heads[0].weight * 2], ValueError, "must contain leaf tensors"),
    }
    for task_params, error, message in bad.values():
        with pytest.raises(error, match=message):
            flatmtl_fast.backward(losses, shared, reference.Mean(), task_params=task_params)
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler, got int"):
        flatmtl_fast.backward(losses, shared, reference.Mean(), scaler=3)
    # A module is taken as its parameters, as FMTL takes a head.
    flatmtl_fast.backward(losses, shared, reference.Mean(), task_params=heads)
    assert all(p.grad is not None for p in heads.parameters())


def test_flat_parameters_refuse_shared_memory_and_a_mixed_cast():
    """Two parameters that are views of one tensor would each get their own copy (silently untied); casting part
    of the set would be undone by re-flattening into the first parameter's dtype. Both raise instead."""
    weight = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        flatmtl_fast.FlatParameters([weight, nn.Parameter(weight.data.T)])
    with pytest.raises(ValueError, match="parameters 1 and 2 share memory"):
        flatmtl_fast.FlatParameters([nn.Parameter(torch.ones(2)), weight, nn.Parameter(weight.data[3])])
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    net.trunk[0].double()
    with pytest.raises(ValueError, match="several dtypes"):
        shared.refresh()
    net.trunk.double()  # the whole set: re-flattened in float64, values kept
    shared.refresh()
    assert shared.dtype == torch.float64 and shared.is_flat()


def test_flat_parameters_read_and_write_values():
    """read_values/write_values round-trip the values exactly and refuse a vector of another length or a non-tensor."""
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    saved = shared.read_values(torch.empty(shared.numel))
    assert torch.equal(saved, shared.data) and saved.data_ptr() != shared.data.data_ptr()
    shared.write_values(torch.zeros(shared.numel))
    assert all(not p.any() for p in net.trunk.parameters())
    shared.write_values(saved)
    assert torch.equal(shared.data, saved)
    with pytest.raises(ValueError, match=r"read_values: out must be an \(N,\) = \(\d+,\) tensor on cpu, got \(3,\)"):
        shared.read_values(torch.empty(3))
    with pytest.raises(ValueError, match=r"write_values: flat must be an .* got list"):
        shared.write_values([0.0])
