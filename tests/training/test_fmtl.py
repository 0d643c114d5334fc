"""F-MTL: one step equals a literal per-task SAM loop (explicit ε_i, explicit h_i, two aggregations)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from support.host_sync import forbid_host_sync
from torch import nn

import flatmtl_fast
import flatmtl_fast.reference as reference

K = 3


class Net(nn.Module):
    """A trunk with BatchNorm (whose statistics the perturbed passes must not move) and K heads."""

    def __init__(self, d: int = 6, width: int = 9, K: int = K, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(d, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(width, 1)) for _ in range(K))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)]


def _data(seed: int = 1, n: int = 32, d: int = 6, K: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.stack([torch.sin(x @ torch.randn(d, generator=g)) for _ in range(K)], dim=1)
    return x, y


def _literal_step(model: Net, x, y, aggregator, *, rho, adaptive=False, normalize="separate", variant="flat"):
    """The F-MTL step written out on explicit vectors (algorithms.md §1.1), in float64 where it is free to.

    Returns the shared direction d, each head's gradient and d's flat part Agg(h) (None for variant "a");
    leaves the model as it found it, except for the BatchNorm statistics of the one clean forward pass.
    """
    K = len(model.heads)
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    losses = model.losses(x, y)
    clean = [torch.autograd.grad(losses[i], shared + heads[i], retain_graph=True) for i in range(K)]
    g = [torch.cat([t.flatten() for t in c[: len(shared)]]) for c in clean]
    bn = model.trunk[1]
    stats = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    s, head_grads = [], []
    for i in range(K):
        shared_vals = [p.detach().clone() for p in shared]
        head_vals = [p.detach().clone() for p in heads[i]]
        T_shared = torch.cat([p.flatten() for p in shared_vals]).double().abs() if adaptive else 1.0
        gh = [t.double() for t in clean[i][len(shared) :]]
        T_head = [p.double().abs() if adaptive else 1.0 for p in head_vals]
        norm_s = (T_shared * g[i].double()).norm()
        norm_h = torch.sqrt(sum(((t * gg) ** 2).sum() for t, gg in zip(T_head, gh, strict=True)))
        if normalize == "joint":
            norm_s = norm_h = torch.sqrt(norm_s**2 + norm_h**2)
        eps_s = rho * T_shared**2 * g[i].double() / (norm_s + 1e-12)
        with torch.no_grad():
            offset = 0
            for p in shared:
                p.copy_(p.double() + eps_s[offset : offset + p.numel()].view_as(p))  # one rounding to p.dtype
                offset += p.numel()
            for p, t, gg in zip(heads[i], T_head, gh, strict=True):
                p.copy_(p.double() + rho * t**2 * gg / (norm_h + 1e-12))
        perturbed = model.losses(x, y)[i]
        grads = torch.autograd.grad(perturbed, shared + heads[i])
        s.append(torch.cat([t.flatten() for t in grads[: len(shared)]]))
        head_grads.append(list(grads[len(shared) :]))
        with torch.no_grad():
            for p, v in zip(shared + heads[i], shared_vals + head_vals, strict=True):
                p.copy_(v)
            bn.running_mean.copy_(stats[0])
            bn.running_var.copy_(stats[1])
            bn.num_batches_tracked.copy_(stats[2])
    G, S = torch.stack(g), torch.stack(s)
    loss_values = torch.stack([loss.detach().double() for loss in losses])
    if variant == "a":
        return aggregator(S, loss_values), head_grads, None
    flat_aggregator = copy.deepcopy(aggregator)  # its own state (generators) from the start, as FMTL's
    flat = flat_aggregator(S - G, loss_values)
    return aggregator(G, loss_values) + flat, head_grads, flat


def _fmtl_step(model: Net, x, y, aggregator, **options):
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, aggregator, task_params=list(model.heads), model=model, **options)
    losses = fmtl.step(lambda: model.losses(x, y))
    return shared, fmtl, losses


# The literal and the fused step differ by roundings: the perturbed weights (float32 kernel vs float64 then
# one rounding: ≤ 1 ulp of θ), float32 vs float64 accumulation in gram/combine (~√N·u) and the solvers
# (WEIGHT_RTOL in tests/fused/_util.py, ≤ 3e-4 for CAGrad/IMGrad); all are far below 1e-3 of ‖d‖.
RTOL = 1e-3
METHODS = ["Mean", "MGDA", "PCGrad", "CAGrad", "IMGrad", "NashMTL", "UPGrad", "GradDrop"]


def _make(name: str, fused: bool):
    module = flatmtl_fast if fused else reference
    kwargs = {"generator": torch.Generator().manual_seed(3)} if name in ("PCGrad", "GradDrop") else {}
    return getattr(module, name)(**kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("name", METHODS)
def test_step_equals_literal_loop(name: str, fused: bool) -> None:
    x, y = _data()
    literal_model, model = Net(), Net()
    expected_d, expected_heads, _ = _literal_step(literal_model, x, y, _make(name, fused=False), rho=0.5)
    shared, _, losses = _fmtl_step(model, x, y, _make(name, fused=fused), rho=0.5)
    tol = RTOL * expected_d.norm()
    assert (shared.grad - expected_d).norm() <= tol, f"{(shared.grad - expected_d).norm():.3g} > {tol:.3g}"
    for head, grads in zip(model.heads, expected_heads, strict=True):
        for p, expected in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, torch.stack(literal_model.losses(x, y)).detach())


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("name", METHODS)
def test_a_float64_model_steps_in_float64(name: str, adaptive: bool) -> None:
    """float64 parameters: perturbation, task gradients, Grams and combination all in float64 (the reference
    primitives serve them), so the step is the literal loop's to float64 rounding — except CAGrad's and IMGrad's,
    where the reference's conic solver is the looser side (WEIGHT_RTOL in tests/fused/_util.py). ASAM's weighted
    norms must not rewrite the float64 task gradients they read."""
    x, y = (t.double() for t in _data())
    literal_model, model = Net().double(), Net().double()
    expected_d, expected_heads, _ = _literal_step(
        literal_model, x, y, _make(name, fused=False), rho=0.5, adaptive=adaptive
    )
    shared, _, losses = _fmtl_step(model, x, y, _make(name, fused=True), rho=0.5, adaptive=adaptive)
    assert shared.grad.dtype == torch.float64 and losses.dtype == torch.float64
    relative = 1e-4 if name in ("CAGrad", "IMGrad") else 1e-13
    assert (shared.grad - expected_d).norm() <= relative * expected_d.norm()
    for head, grads in zip(model.heads, expected_heads, strict=True):
        for p, expected in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


def test_a_model_cast_between_steps_gets_a_buffer_of_its_dtype() -> None:
    """``model.double()`` between steps re-flattens the shared parameters: the kept 2K-row buffer (float32) must be
    rebuilt in float64, not bound as float32 ``.grad`` views of float64 parameters."""
    x, y = _data()
    literal_model, model = Net(), Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=list(model.heads), model=model, rho=0.5)
    fmtl.step(lambda: model.losses(x, y))
    literal_model.double(), model.double()
    x, y = x.double(), y.double()
    expected_d, _, _ = _literal_step(literal_model, x, y, reference.UPGrad(), rho=0.5)
    fmtl.step(lambda: model.losses(x, y))
    assert shared.grad.dtype == torch.float64
    assert (shared.grad - expected_d).norm() <= 1e-12 * expected_d.norm()


@pytest.mark.parametrize(
    "options",
    [
        {"adaptive": True, "rho": 2.0},
        {"normalize": "joint", "rho": 0.3},
        {"variant": "a", "rho": 0.3},
        {"rho": 1e-3},  # h small beside g: formed directly, no cancellation through the Grams
    ],
    ids=["asam", "joint", "variant-a", "small-rho"],
)
@pytest.mark.parametrize("name", ["UPGrad", "MGDA"])
def test_options_equal_literal_loop(name: str, options: dict) -> None:
    x, y = _data(seed=2)
    literal_model, model = Net(seed=4), Net(seed=4)
    expected_d, _, expected_flat = _literal_step(literal_model, x, y, _make(name, fused=False), **options)
    shared, _, _ = _fmtl_step(model, x, y, _make(name, fused=True), **options)
    assert (shared.grad - expected_d).norm() <= RTOL * expected_d.norm()
    if expected_flat is not None:
        # The flat part Agg(h) on its own (at ρ = 1e-3 it is ~0.3 % of d, so the check above barely sees it):
        # d − Agg(g) with the literal's float64 Agg(g), whose distance to the fused one (~1e-6 ‖d‖, float32 Grams
        # and combination) is ~3e-4 of Agg(h) at worst, and h itself formed in float32 (~1e-7 ‖g‖ ≈ 1e-4 ‖h‖).
        plain = _make(name, fused=False)(_clean_gradients(Net(seed=4), x, y), None)
        flat = shared.grad.double() - plain
        assert (flat - expected_flat).norm() <= 1e-2 * expected_flat.norm()


def _clean_gradients(model: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G: the K clean task gradients of the shared parameters, in float64."""
    shared = list(model.trunk.parameters())
    losses = model.losses(x, y)
    return torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    ).double()


@pytest.mark.parametrize("K", [1, 2, 7])
@pytest.mark.parametrize("name", ["UPGrad", "MGDA", "PCGrad"])
def test_step_equals_literal_loop_for_other_task_counts(name: str, K: int) -> None:
    """As test_step_equals_literal_loop (same tolerances) with 1, 2 and 7 tasks."""
    x, y = _data(K=K)
    literal_model, model = Net(K=K), Net(K=K)
    expected_d, expected_heads, _ = _literal_step(literal_model, x, y, _make(name, fused=False), rho=0.5)
    shared, _, _ = _fmtl_step(model, x, y, _make(name, fused=True), rho=0.5)
    assert (shared.grad - expected_d).norm() <= RTOL * expected_d.norm()
    for head, grads in zip(model.heads, expected_heads, strict=True):
        for p, expected in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


def test_flat_part_is_not_the_plain_direction() -> None:
    """Guard against a test that cannot fail: with ρ > 0 the F-MTL direction differs from Agg(g)."""
    x, y = _data()
    model = Net()
    shared, _, _ = _fmtl_step(model, x, y, flatmtl_fast.UPGrad(), rho=0.5)
    plain_model = Net()
    plain_shared = flatmtl_fast.FlatParameters(plain_model.trunk)
    flatmtl_fast.backward(plain_model.losses(x, y), plain_shared, flatmtl_fast.UPGrad())
    assert (shared.grad - plain_shared.grad).norm() > 1e-3 * plain_shared.grad.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_restore_is_bit_exact_and_batchnorm_sees_only_the_clean_pass(dtype: torch.dtype) -> None:
    x, y = (t.to(dtype) for t in _data())
    model = Net().to(dtype)  # bf16: the weight backup must keep the weights' dtype to restore them exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference_model = Net().to(dtype)
    reference_model.losses(x, y)  # one clean training forward: what BatchNorm may see
    _fmtl_step(model, x, y, flatmtl_fast.UPGrad(), rho=1.0, adaptive=True)
    after = model.state_dict()
    for name, value in before.items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(after[name], reference_model.state_dict()[name]), name
        else:
            assert torch.equal(after[name], value), f"{name} was not restored exactly"


def test_training_with_fmtl_decreases_every_loss() -> None:
    x, y = _data(n=64)
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=0.05, task_params=list(model.heads), model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        losses = fmtl.step(lambda: model.losses(x, y))
        first = losses if first is None else first
        optimizer.step()
    last = torch.stack(model.losses(x, y)).detach()
    assert (last < 0.7 * first).all(), (first, last)


def test_state_dict_round_trip_continues_identically() -> None:
    x, y = _data()
    runs = []
    for resume in (False, True):
        model = Net()
        shared = flatmtl_fast.FlatParameters(model.trunk)
        fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), task_params=list(model.heads), model=model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(4):
            if resume and step == 2:
                state = copy.deepcopy(fmtl.state_dict())
                fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), task_params=list(model.heads), model=model)
                fmtl.load_state_dict(state)
            optimizer.zero_grad()
            fmtl.step(lambda model=model: model.losses(x, y))
            optimizer.step()
        runs.append(shared.grad.clone())
    assert torch.equal(runs[0], runs[1])


def test_without_heads_and_single_task() -> None:
    x, y = _data()
    model = Net(K=1)
    shared = flatmtl_fast.FlatParameters(list(model.trunk.parameters()) + list(model.heads.parameters()))
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.MGDA(), rho=0.2)
    losses = fmtl.step(lambda: model.losses(x, y[:, :1]))
    assert losses.shape == (1,) and torch.isfinite(shared.grad).all()
    literal = Net(K=1)
    params = list(literal.parameters())
    (g,) = [torch.cat([t.flatten() for t in torch.autograd.grad(literal.losses(x, y[:, :1])[0], params)])]
    # K = 1: MGDA returns g; F-MTL adds h = s − g, so d = s, the SAM gradient, which differs from g.
    assert (shared.grad - g).norm() > 1e-4 * g.norm()


def test_bad_inputs_raise_clearly() -> None:
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    heads = list(model.heads)
    for returned in (None, 1.5):
        with pytest.raises(TypeError, match=r"closure's .*losses must be a sequence of scalar tensors or a 1-D tensor"):
            flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad()).step(lambda returned=returned: returned)
    with pytest.raises(TypeError, match="FMTL: adaptive must be True or False, got 'no'"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), adaptive="no")  # a truthy string would mean True
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=bad)
    with pytest.raises(ValueError, match="normalize"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), normalize="both")
    with pytest.raises(ValueError, match="variant"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), variant="b")
    with pytest.raises(TypeError, match="aggregator"):
        flatmtl_fast.FMTL(shared, torch.mean)
    with pytest.raises(TypeError, match="FlatParameters"):
        flatmtl_fast.FMTL(list(model.trunk.parameters()), flatmtl_fast.UPGrad())
    with pytest.raises(ValueError, match="shared"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=[model.trunk, *heads[1:]])

    calls = []

    def shrinking_closure():
        calls.append(1)
        losses = model.losses(x, y)
        return losses if len(calls) == 1 else losses[:2]

    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=heads, model=model)
    before = shared.data.clone()
    with pytest.raises(ValueError, match="returned 2 losses, expected 3"):
        fmtl.step(shrinking_closure)
    assert torch.equal(shared.data, before), "a failing step must still restore the weights"
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=heads[:2], model=model)
    with pytest.raises(ValueError, match="expected 2"):
        fmtl.step(lambda: model.losses(x, y))
    with pytest.raises(ValueError, match="scalar"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad()).step(lambda: [torch.stack(model.losses(x, y))])


def test_nonfinite_gradient_raises_before_writing_grad() -> None:
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=list(model.heads), model=model)
    bad_y = y.clone()
    bad_y[0, 1] = float("nan")
    shared.grad.fill_(7.0)
    before = shared.data.clone()
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        fmtl.step(lambda: model.losses(x, bad_y))
    assert all(p.grad is None for p in model.trunk.parameters())
    assert torch.equal(shared.data, before)
    skipping = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), nonfinite="skip", task_params=list(model.heads))
    assert skipping.step(lambda: model.losses(x, bad_y)) is None
    assert all(p.grad is None for p in model.parameters())


def test_no_host_synchronisation() -> None:
    """With nonfinite="propagate" a step never reads a device value on the host (CPU proxy for the GPU)."""
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(
        shared, flatmtl_fast.UPGrad(), nonfinite="propagate", task_params=list(model.heads), model=model
    )
    fmtl.step(lambda: model.losses(x, y))  # warm-up: buffers and lazy imports

    with forbid_host_sync():
        fmtl.step(lambda: model.losses(x, y))
    assert torch.isfinite(shared.grad).all()


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_every_backend_gives_the_literal_step(backend: str) -> None:
    """The norms, perturbations, Gram and combination of the step on each streaming backend."""
    x, y = _data(seed=5)
    literal_model, model = Net(seed=6), Net(seed=6)
    expected_d, _, _ = _literal_step(literal_model, x, y, reference.UPGrad(), rho=0.5, adaptive=True)
    with flatmtl_fast.use_backend(backend):
        shared, _, _ = _fmtl_step(model, x, y, flatmtl_fast.UPGrad(), rho=0.5, adaptive=True)
    assert (shared.grad - expected_d).norm() <= RTOL * expected_d.norm()


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_perturbed_pass_follows_the_policy(policy, where) -> None:
    """A NaN that appears only at a perturbed point (the clean pass is finite) is caught too: no .grad, weights
    restored, and the aggregators' state untouched (Nash-MTL's step counter and warm start)."""
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(
        shared, flatmtl_fast.NashMTL(), task_params=list(model.heads), model=model, nonfinite=policy
    )
    fmtl.step(lambda: model.losses(x, y))
    state = copy.deepcopy(fmtl.state_dict())
    before = shared.data.clone()
    calls = []

    def closure() -> list[torch.Tensor]:
        calls.append(None)
        losses = model.losses(x, y)
        if len(calls) == 3:  # the perturbed pass of task 1
            losses[1] = losses[1] * float("nan") if where == "loss" else _NaNGradient.apply(losses[1])
        return losses

    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
            fmtl.step(closure)
    else:
        assert fmtl.step(closure) is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(shared.data, before)
    for family in state:
        for key, value in state[family].items():
            assert _same(fmtl.state_dict()[family][key], value), f"{family}.{key} moved"


class _NaNGradient(torch.autograd.Function):
    """Identity whose gradient is NaN: a finite loss with a NaN gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _same(a: object, b: object) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_an_error_in_a_perturbed_pass_leaves_no_gradient() -> None:
    """The weights are restored and no .grad points into the internal rows or holds a partial SAM gradient."""
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=list(model.heads), model=model)
    before = shared.data.clone()
    calls = []

    def closure() -> list[torch.Tensor]:
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("the data loader failed")
        return model.losses(x, y)

    with pytest.raises(RuntimeError, match="the data loader failed"):
        fmtl.step(closure)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(shared.data, before)


def test_bad_step_arguments() -> None:
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    with pytest.raises(TypeError, match="closure must be a callable returning the K losses, got NoneType"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad()).step(None)
    with pytest.raises(ValueError, match="task_params is empty"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), task_params=[])


def test_a_refused_state_changes_neither_aggregator() -> None:
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), task_params=list(model.heads), model=model)
    fmtl.step(lambda: model.losses(x, y))
    saved = copy.deepcopy(fmtl.state_dict())
    fresh = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL()).state_dict()
    variant_a = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), variant="a").state_dict()
    refused = {
        r"state must be a dict": None,
        r"FMTL.load_state_dict: missing keys \['flat_aggregator'\]": variant_a,  # a valid "aggregator" entry
        r"NashMTL.load_state_dict: missing keys \['_alpha', '_step'\]": fresh | {"flat_aggregator": {"junk": 1}},
        r"NashMTL.load_state_dict: state must be a dict": fresh | {"flat_aggregator": None},
    }
    for message, state in refused.items():
        with pytest.raises((KeyError, TypeError), match=message):
            fmtl.load_state_dict(state)
        after = fmtl.state_dict()
        for key in saved:
            for name, value in saved[key].items():
                same = torch.equal(after[key][name], value) if torch.is_tensor(value) else after[key][name] == value
                assert same, (message, key, name)
    with pytest.raises(KeyError, match=r"unexpected keys \['flat_aggregator'\]"):  # not silently dropped
        flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), variant="a").load_state_dict(saved)


def test_a_step_inside_an_autocast_region_perturbs_the_weights_its_forwards_see() -> None:
    # Autocast caches its casts of the parameters until its region ends: without clearing that cache, every
    # perturbed forward would run the unperturbed weights, so s_i = g_i and d = Agg(g) with no error.
    x, y = _data()
    directions = []
    for outer in (False, True):
        model = Net()
        shared = flatmtl_fast.FlatParameters(model.trunk)
        fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=0.5, task_params=list(model.heads), model=model)

        def closure(model=model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return [loss.float() for loss in model.losses(x, y)]

        # (Not enabled=False for the plain run: a disabled autocast region still nests, and keeps the cache.)
        with torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext():
            fmtl.step(closure)
        directions.append(shared.grad.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext():
            assert torch.equal(model.trunk(x), Net().trunk(x)), "the forward after the step sees the restored weights"
    assert torch.equal(directions[0], directions[1])


def test_hyperparameters_and_reset() -> None:
    x, y = _data()
    model = Net()
    shared = flatmtl_fast.FlatParameters(model.trunk)
    assert flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=np.float32(0.25)).rho == 0.25
    with pytest.raises(ValueError, match="FMTL: rho must be a finite real number, got 'a'"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho="a")
    with pytest.raises(ValueError, match="FMTL: rho_task must be > 0"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho_task=0)
    with pytest.raises(ValueError, match="rho_task is the heads' radius under normalize='separate'"):
        flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho_task=0.1, normalize="joint")

    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), task_params=list(model.heads), model=model)
    model.heads[1][1].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"a parameter of task_params\[1\] no longer requires grad"):
        fmtl.step(lambda: model.losses(x, y))
    model.heads[1][1].bias.requires_grad_(True)

    fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), model=model)
    fmtl.step(lambda: model.losses(x, y))
    with pytest.raises(ValueError, match="expected 3"):
        fmtl.step(lambda: model.losses(x, y)[:2])
    fmtl.reset()  # a new K: a first step again, as a fresh FMTL's
    fmtl.step(lambda: model.losses(x, y)[:2])
    first = shared.grad.clone()
    flatmtl_fast.FMTL(shared, flatmtl_fast.NashMTL(), model=model).step(lambda: model.losses(x, y)[:2])
    assert torch.equal(shared.grad, first)
