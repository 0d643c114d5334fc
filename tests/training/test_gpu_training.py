"""The drop-in training step on a GPU (issue 5): a whole step — forward, ``flatmtl_fast.backward`` or
``FMTL.step``, ``optimizer.step()`` — replayed from one CUDA graph equals the eager steps; warmed-up steps
never wait for the device; fp16 (GradScaler) and bf16 autocast give the reference aggregator's direction on
per-task ``torch.autograd.grad`` gradients, and a step that overflows is skipped on the device.

Every test runs on ``cuda`` (marked ``gpu``; see bench/gpu_session.sh) and on the CPU, where the same code
checks the test's own bookkeeping: the "graph" is the eager step, and host synchronisation is caught by making
the Tensor methods that read a device value raise (the CPU proxy of ``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from support.host_sync import forbid_host_sync, on_side_stream
from torch.nn.utils import parameters_to_vector
from training.test_backward import Net, _batch, _expected, _make

import flatmtl_fast
from flatmtl_fast import reference
from flatmtl_fast.aggregators.base import Aggregator

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
METHODS = ("Mean", "MGDA", "UPGrad")  # stateless, so a replay sees the state an eager step would
Step = Callable[[torch.Tensor, torch.Tensor], None]


def _gradients(
    kind: str,
    net: Net,
    shared: flatmtl_fast.FlatParameters,
    aggregator: Aggregator,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: torch.dtype | None = None,
) -> Step:
    """A function that fills ``.grad`` from a batch (x, y) without waiting for the device: ``FMTL.step`` or
    ``flatmtl_fast.backward`` (of the losses scaled by ``scaler`` if given; non-finite values propagate;
    ``batched=True`` for ``kind="batched-backward"``), with the forward passes under ``autocast`` if given."""

    def losses(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return net.losses(x, y)

    if kind == "fmtl":
        fmtl = flatmtl_fast.FMTL(shared, aggregator, task_params=list(net.heads), nonfinite="propagate")
        return lambda x, y: fmtl.step(lambda: losses(x, y))

    def backward(x: torch.Tensor, y: torch.Tensor) -> None:
        scaled = [loss if scaler is None else scaler.scale(loss) for loss in losses(x, y)]
        heads = net.heads.parameters()
        batched = kind == "batched-backward"
        flatmtl_fast.backward(
            scaled, shared, aggregator, task_params=heads, scaler=scaler, nonfinite="propagate", batched=batched
        )

    return backward


def _training(device: torch.device, method: str, kind: str, optimizer: str) -> tuple[Net, Step]:
    """A seeded model and its training step on a batch: ``backward`` or ``fmtl``, then Adam or SGD."""
    net = Net().to(device)
    gradients = _gradients(kind, net, flatmtl_fast.FlatParameters(net.trunk), getattr(flatmtl_fast, method)())
    if optimizer == "adam":  # capturable: the step count lives on the device and advances inside the graph
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, capturable=device.type == "cuda")
    else:
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        # Unset gradients are allocated by the step itself (from the graph's pool when captured).
        opt.zero_grad(set_to_none=True)
        gradients(x, y)
        opt.step()

    return net, step


def _replayable(step: Step, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """``step`` on the static batch (x, y) captured in a CUDA graph; its replay. On the CPU: the eager step."""
    if device.type != "cuda":
        return lambda: step(x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, y)
    return graph.replay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("kind", ["backward", "fmtl"])
@pytest.mark.parametrize("method", METHODS)
def test_a_whole_training_step_replays_from_one_cuda_graph(method: str, kind: str, optimizer: str, device: str):
    device = torch.device(device)
    warmup, replays = 3, 3
    batches = [tuple(t.to(device) for t in _batch(seed)) for seed in range(warmup + replays)]
    graphed_net, graphed_step = _training(device, method, kind, optimizer)
    eager_net, eager_step = _training(device, method, kind, optimizer)
    static_x, static_y = (t.clone() for t in batches[0])

    def feed(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        static_x.copy_(batch[0])
        static_y.copy_(batch[1])

    def warm_up() -> None:  # buffers, optimizer state, kernels: everything the capture must find in place
        for batch in batches[:warmup]:
            feed(batch)
            graphed_step(static_x, static_y)

    on_side_stream(warm_up, device)
    for batch in batches[:warmup]:
        eager_step(*batch)
    replay = _replayable(graphed_step, static_x, static_y, device)
    start = parameters_to_vector(eager_net.parameters()).detach().clone()
    for batch in batches[warmup:]:  # a new batch each step: the graph must read the static inputs
        feed(batch)
        replay()
        eager_step(*batch)
    got = parameters_to_vector(graphed_net.parameters()).detach()
    expected = parameters_to_vector(eager_net.parameters()).detach()
    moved = (expected - start).norm()
    assert moved > 0
    # A replay launches the kernels recorded from this very step with the same arguments: bit-identical on a
    # deterministic device. Only reductions ordered by atomics (cuBLAS split-K, cross-block sums) may differ,
    # by ~1e-7 relative per step in the direction; Adam's division by √v maps a relative error of an entry's
    # gradient to at most the same relative error of its update. Three steps: 1e-4 of the distance moved.
    assert (got - expected).norm() <= 1e-4 * moved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kind", "scaled"), [("backward", False), ("backward", True), ("batched-backward", True), ("fmtl", False)]
)
def test_a_warmed_up_step_never_waits_for_the_device(kind: str, scaled: bool, device: str):
    device = torch.device(device)
    net = Net().to(device)
    x, y = (t.to(device) for t in _batch())
    shared = flatmtl_fast.FlatParameters(net.trunk)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0) if scaled else None
    gradients = _gradients(kind, net, shared, flatmtl_fast.UPGrad(), scaler=scaler)
    gradients(x, y)  # warm-up: buffers, lazy imports, compiled kernels
    shared.grad.zero_()
    with forbid_host_sync(device):
        gradients(x, y)
    assert torch.isfinite(shared.grad).all() and shared.grad.norm() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_batched_capture_gives_the_k_passes_direction(device: str):
    """One vmapped backward pass on the device gives the K passes' .grad, to float32 rounding: batched matmuls
    may sum in another order (~1e-7 relative per entry), which the solve carries to ~1e-6 of ‖d‖."""
    device = torch.device(device)
    x, y = (t.to(device) for t in _batch())
    grads = []
    for kind in ("backward", "batched-backward"):
        net = Net().to(device)
        shared = flatmtl_fast.FlatParameters(net.trunk)
        _gradients(kind, net, shared, flatmtl_fast.UPGrad())(x, y)
        grads.append(shared.grad.clone())
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


# precision -> (autocast dtype, with a GradScaler)
AUTOCAST = {"float16": (torch.float16, True), "bfloat16": (torch.bfloat16, False)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", AUTOCAST)
@pytest.mark.parametrize("method", [*METHODS, "NashMTL"])  # NashMTL: not scale-invariant (its norm clip)
def test_autocast_grad_is_the_reference_on_per_task_autograd_gradients(method: str, precision: str, device: str):
    if method == "UPGrad":
        pytest.importorskip("quadprog", reason="the reference UPGrad solves its QP with quadprog")
    device = torch.device(device)
    dtype, scaled = AUTOCAST[precision]
    x, y = (t.to(device) for t in _batch())
    reference_net, net = Net().to(device), Net().to(device)
    with torch.autocast(device.type, dtype=dtype):
        expected_d, expected_heads = _expected(reference_net, _make(method, reference), x, y)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if scaled else None
    _gradients("backward", net, shared, _make(method, flatmtl_fast), scaler=scaler, autocast=dtype)(x, y)
    if scaler is not None:
        scaler.unscale_(optimizer)  # the written direction is scaled like any gradient; its weights were not
    # Both sides run the same low-precision forward and backward kernels on the same batch; a power-of-two loss
    # scale commutes with every rounding except where the unscaled fp16 reference falls below fp16's normal
    # range (6e-5; absolute error ≤ 3e-8 there). What is left is the fused-vs-reference aggregation of
    # tests/training/test_backward.py (float32 Gram, solvers to ~1e-9): 1e-4 of the direction's norm.
    tolerance = 1e-4 * expected_d.norm() + 1e-7
    assert (shared.grad - expected_d).norm() <= tolerance
    for p, g in zip(net.heads.parameters(), expected_heads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [1e30, float("nan")], ids=["overflow", "nan"])
def test_a_nonfinite_fp16_step_is_skipped_on_the_device(bad: float, device: str):
    """GradScaler + fused Adam (which takes the scaler's inf flag on the device): a step whose loss overflows
    or is NaN leaves the parameters and the optimizer state as they were and halves the scale, without a host
    sync. ``.grad`` then holds the non-finite direction: ``backward``'s "propagate" policy under a scaler."""
    device = torch.device(device)
    net = Net().to(device)
    x, y = (t.to(device) for t in _batch())
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    gradients = _gradients("backward", net, shared, flatmtl_fast.UPGrad(), scaler=scaler, autocast=torch.float16)

    def step(targets: torch.Tensor) -> None:
        optimizer.zero_grad()
        gradients(x, targets)
        scaler.step(optimizer)
        scaler.update()

    step(y)  # a finite step: the optimizer state exists
    params = [p.detach().clone() for p in net.parameters()]
    state = {p: {name: t.clone() for name, t in s.items()} for p, s in optimizer.state.items()}
    scale = scaler.get_scale()
    bad_y = y.clone()
    bad_y[0, 1] = bad  # (h − 1e30)² overflows float32 (or is NaN): task 1's loss and gradient are not finite
    with forbid_host_sync(device):
        step(bad_y)
    assert not torch.isfinite(shared.grad).all()
    for p, before in zip(net.parameters(), params, strict=True):
        assert torch.equal(p.detach(), before)
    for p, s in optimizer.state.items():
        for name, t in s.items():
            assert torch.equal(t, state[p][name]), name
    assert scaler.get_scale() == scale / 2
