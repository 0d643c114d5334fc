"""Benchmark of a whole training step: a shared trunk with K linear heads on its feature, MSE targets.

Models (``--train-model``): ``mlp``, issue 5's 4.7 M-parameter MLP trunk (batch 64 by default),
``vit-b``, a ViT-B/16-sized transformer trunk (86 M shared parameters, 3 × 224 × 224 images, batch 32 by
default: a common per-GPU batch for ViT-B, whose float32 activations, kept for the K backward passes,
take a few GB), and ``deep-narrow``, ViT-B's 150 parameter tensors in 20 k parameters (batch 8): host time.

Per step (median of back-to-back steps; flatmtl's parts timed in turn with its step): plain summed backward;
``flatmtl_fast.backward`` with a fused aggregator, with its breakdown (forward, the K backward passes, gram + solve
+ combine, the optimizer's step), and with ``batched=True`` (one vmapped backward pass for the K rows); torchjd's
``mtl_backward`` + ``jac_to_grad``; a plain loop of K ``autograd.grad`` calls + torchjd's aggregator. F-MTL steps
(K + 1 forwards, 2K backwards): ``flatmtl_fast.FMTL`` vs the official code's loop with torchjd's aggregator called
on g and on h. Peak extra memory of each step above a plain summed-backward step of the same model: in a fresh
process on the CPU (VmHWM), from the caching allocator's high-water mark on CUDA; both include the buffers kept
between steps (our K × N task-gradient buffer, optimizer state).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

import flatmtl_fast

from .common import Row, cuda_peak_bytes, time_call

SUITE = "training"
TORCHJD_NAMES = {"UPGrad": "UPGrad", "MGDA": "MGDA", "PCGrad": "PCGrad", "Mean": "Mean"}
IMPLS = ("plain", "flatmtl", "flatmtl-batched", "torchjd", "autograd-loop", "fmtl", "fmtl-loop")
PEER_IMPLS = ("torchjd", "autograd-loop", "fmtl-loop")  # need torchjd's aggregators

Forward = Callable[[], tuple[Tensor, list[Tensor]]]


class MultiTaskModel(nn.Module):
    """A shared ``trunk`` (the parameters to flatten) and K linear heads on its feature z, MSE targets."""

    def __init__(self, trunk: nn.Module, feature: int, K: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(feature, 1) for _ in range(K))
        self.input_shape = input_shape

    def inputs(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """A random batch: inputs and one regression target per task."""
        return torch.randn(batch, *self.input_shape, device=device), torch.randn(batch, len(self.heads), device=device)

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The shared feature z (for torchjd's ``mtl_backward(losses, features=z)``) and the K losses."""
        z = self.trunk(x)
        return z, [((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)]


class Model(MultiTaskModel):
    """MLP trunk 1024 → 1536 → 1536 → 512 (4.7 M parameters) and K linear heads."""

    def __init__(self, K: int, width: int = 1536, d_in: int = 1024, d_out: int = 512) -> None:
        trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out), nn.ReLU()
        )
        super().__init__(trunk, d_out, K, (d_in,))


class ViTTrunk(nn.Module):
    """A ViT encoder in plain torch: patch embedding, class token, learned positions, pre-norm layers, final
    LayerNorm; returns the class token's feature. The defaults are ViT-B/16 (85.8 M parameters)."""

    def __init__(
        self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp: int = 3072
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        # Independent layers (nn.TransformerEncoder would deep-copy one, giving 12 identical initialisations).
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                num_heads,
                mlp,
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=1e-6,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(images), -1, -1), tokens], dim=1) + self.position
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens[:, 0])  # only the class token feeds the heads


class ViT(MultiTaskModel):
    """ViT-B/16-sized trunk (86 M shared parameters by default; smaller with the keyword arguments) and K heads."""

    def __init__(
        self,
        K: int,
        image: int = 224,
        patch: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp: int = 3072,
    ) -> None:
        super().__init__(ViTTrunk(image, patch, dim, depth, num_heads, mlp), dim, K, (3, image, image))


class DeepNarrow(MultiTaskModel):
    """75 layers Linear(16, 16) + ReLU: 150 parameter tensors, as many as ViT-B/16, but 20 k parameters. Its steps
    are host-bound, so they compare what each implementation costs per parameter tensor and per task."""

    def __init__(self, K: int, depth: int = 75, width: int = 16) -> None:
        trunk = nn.Sequential(*(module for _ in range(depth) for module in (nn.Linear(width, width), nn.ReLU())))
        super().__init__(trunk, width, K, (width,))


MODELS: dict[str, type[MultiTaskModel]] = {"mlp": Model, "vit-b": ViT, "deep-narrow": DeepNarrow}
DEFAULT_BATCH = {"mlp": 64, "vit-b": 32, "deep-narrow": 8}


def available_impls(method: str) -> list[str]:
    """Every implementation this machine can run for ``method`` (torchjd's only when it is installed)."""
    peers = importlib.util.find_spec("torchjd") is not None and method in TORCHJD_NAMES
    return [impl for impl in IMPLS if peers or impl not in PEER_IMPLS]


@dataclasses.dataclass(frozen=True)
class Case:
    """What a step trains: ``model`` (an entry of :data:`MODELS`, ``config`` keyword arguments of its
    constructor, e.g. a tiny ViT for tests) with K heads, on ``batch`` inputs on ``device``, every forward pass
    under bf16 autocast when ``amp``."""

    K: int
    batch: int
    device: torch.device
    model: str = "mlp"
    config: dict | None = None
    amp: bool = False


def build(case: Case) -> tuple[MultiTaskModel, Forward]:
    """The seeded model and ``forward()``, its (z, losses) on a fixed random batch."""
    torch.manual_seed(0)
    with case.device:  # initialised where it runs: an 86 M-parameter CPU init and copy per case is slow
        net = MODELS[case.model](case.K, **(case.config or {}))
    x, y = net.inputs(case.batch, case.device)

    def forward() -> tuple[Tensor, list[Tensor]]:
        with torch.autocast(case.device.type, dtype=torch.bfloat16, enabled=case.amp):
            return net.losses(x, y)

    return net, forward


def make_step(impl: str, method: str, case: Case) -> tuple[MultiTaskModel, Callable[[], None]]:
    """Build the model and a closure running one training step (SGD) with ``impl``."""
    net, forward = build(case)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    if impl == "plain":

        def step():
            optimizer.zero_grad()
            sum(forward()[1]).backward()
            optimizer.step()

    elif impl in ("flatmtl", "flatmtl-batched"):
        shared = flatmtl_fast.FlatParameters(net.trunk)
        agg = getattr(flatmtl_fast, method)()
        batched = impl == "flatmtl-batched"

        def step():
            optimizer.zero_grad()
            flatmtl_fast.backward(forward()[1], shared, agg, task_params=net.heads.parameters(), batched=batched)
            optimizer.step()

    elif impl == "torchjd":
        from torchjd.aggregation import __dict__ as aggregations
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = aggregations[TORCHJD_NAMES[method]]()
        shared_params = list(net.trunk.parameters())

        def step():
            optimizer.zero_grad()
            z, losses = forward()
            mtl_backward(losses, features=z)
            jac_to_grad(shared_params, agg)
            optimizer.step()

    elif impl == "autograd-loop":
        from torchjd.aggregation import __dict__ as aggregations

        agg = aggregations[TORCHJD_NAMES[method]]()
        shared_params = list(net.trunk.parameters())
        head_params = list(net.heads.parameters())

        def step():
            optimizer.zero_grad()
            _, losses = forward()
            rows = [torch.autograd.grad(loss, shared_params, retain_graph=True) for loss in losses]
            J = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
            d = agg(J)
            offset = 0
            for p in shared_params:
                p.grad = d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            for p, g in zip(head_params, torch.autograd.grad(sum(losses), head_params), strict=True):
                p.grad = g
            optimizer.step()

    elif impl == "fmtl":
        shared = flatmtl_fast.FlatParameters(net.trunk)
        fmtl = flatmtl_fast.FMTL(shared, getattr(flatmtl_fast, method)(), rho=0.05, task_params=list(net.heads))

        def step():
            optimizer.zero_grad()
            fmtl.step(lambda: forward()[1])
            optimizer.step()

    elif impl == "fmtl-loop":
        step = _literal_fmtl_step(net, forward, optimizer, method)
    else:
        raise ValueError(impl)
    return net, step


def _literal_fmtl_step(net: MultiTaskModel, forward: Forward, optimizer, method: str) -> Callable[[], None]:
    """F-MTL as the official code runs it: autograd.grad per task, a Python perturbation per parameter,
    explicit h_i = s_i − g_i and two calls of torchjd's aggregator (ρ = 0.05, separate norms)."""
    from torchjd.aggregation import __dict__ as aggregations

    agg, flat_agg = aggregations[TORCHJD_NAMES[method]](), aggregations[TORCHJD_NAMES[method]]()
    shared = list(net.trunk.parameters())

    def flat(grads) -> torch.Tensor:
        return torch.cat([g.flatten() for g in grads])

    def step():
        optimizer.zero_grad()
        losses = forward()[1]
        heads = [list(h.parameters()) for h in net.heads]
        pairs = zip(losses, heads, strict=True)
        clean = [torch.autograd.grad(loss, shared + head, retain_graph=True) for loss, head in pairs]
        g_rows, s_rows = [], []
        for i, grads in enumerate(clean):
            g_rows.append(flat(grads[: len(shared)]))
            saved = [p.detach().clone() for p in shared + heads[i]]
            with torch.no_grad():
                for params, part in ((shared, grads[: len(shared)]), (heads[i], grads[len(shared) :])):
                    radius = 0.05 / float(flat(part).norm() + 1e-12)  # a host sync per task, as the official code
                    for p, g in zip(params, part, strict=True):
                        p.add_(g, alpha=radius)
            sam = torch.autograd.grad(forward()[1][i], shared + heads[i])
            s_rows.append(flat(sam[: len(shared)]))
            with torch.no_grad():
                for p, v in zip(shared + heads[i], saved, strict=True):
                    p.copy_(v)
            for p, g in zip(heads[i], sam[len(shared) :], strict=True):
                p.grad = g
        G, S = torch.stack(g_rows), torch.stack(s_rows)
        d = agg(G) + flat_agg(S - G)
        offset = 0
        for p in shared:
            p.grad = d[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        optimizer.step()

    return step


def step_parts(method: str, case: Case) -> tuple[MultiTaskModel, dict[str, Callable[[], None]]]:
    """make_step's flatmtl step cut into its parts, to be called in this order: the forward pass, the K backward
    passes (over the heads too, as backward() runs them), gram + solve + combine (the parts of
    flatmtl_fast.backward), and the optimizer's step (then the zero_grad that begins make_step's next step).
    Called in order, they are that step (tests/bench)."""
    net, forward = build(case)
    shared = flatmtl_fast.FlatParameters(net.trunk)
    agg = getattr(flatmtl_fast, method)()
    capture = flatmtl_fast.TaskGradients(shared, case.K)
    heads = list(net.heads.parameters())
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    carried: dict[str, object] = {}

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    return net, {
        "forward": lambda: carried.update(losses=forward()[1]),
        "K_backward": lambda: carried.update(G=capture.capture(carried.pop("losses"), extra_inputs=heads)),
        "aggregate": lambda: agg(carried["G"], out=shared.bind_grad()),
        "optimizer": optimizer_step,
    }


def round_robin_medians(calls: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each call, the calls timed in turn, in order, ``repeat`` rounds (after two): on a machine
    whose load drifts (a shared 2-core CPU: ±30 % between minutes), every call meets the same load, so their
    ratios hold where the absolute times move. The parts of a step (step_parts) run in order within a round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for n in range(2 + repeat):
        for name, call in calls.items():
            seconds = time_call(call, device)
            if n >= 2:
                times[name].append(seconds)
    return {name: statistics.median(call_times) for name, call_times in times.items()}


def peak_extra_memory(impl: str, method: str, case: Case) -> int:
    """Peak bytes a step needs above a plain summed-backward step of the same model, including buffers kept
    between steps (our K × N task-gradient buffer). CPU: in a fresh process (VmHWM, see aggregators.py);
    CUDA: the caching allocator's high-water mark of a warmed-up step; -1 if the measurement failed."""
    if case.device.type == "cuda":
        return _cuda_step_peak(impl, method, case) - _cuda_step_peak("plain", method, case)
    fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(case) if f.name != "device"}
    code = f"""
import re, torch
from bench.training import Case, make_step

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

case = Case(device=torch.device("cpu"), **{fields!r})
torch.manual_seed(0)
model, plain = make_step("plain", {method!r}, case)
plain(); plain()
open("/proc/self/clear_refs", "w").write("5")
plain()
base = status("VmHWM")  # peak of a plain step: model, grads, activations
del model, plain
model, step = make_step({impl!r}, {method!r}, case)
open("/proc/self/clear_refs", "w").write("5")
step(); step()
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    return int(json.loads(result.stdout.strip().splitlines()[-1])) if result.returncode == 0 else -1


def _cuda_step_peak(impl: str, method: str, case: Case) -> int:
    """Bytes allocated at the peak of a warmed-up step: model, optimizer state, kept buffers, activations."""
    gc.collect()  # the previous case's model (kept alive by hook reference cycles) must not count
    torch.cuda.empty_cache()
    _, step = make_step(impl, method, case)
    return cuda_peak_bytes(step, case.device, warmup=2)[0]


def run(
    device: torch.device,
    method: str,
    Ks: list[int],
    batch: int,
    repeat: int,
    model: str = "mlp",
    impls: list[str] | None = None,
    amp: bool = False,
    config: dict | None = None,
) -> list[Row]:
    """Time a step of every implementation in ``impls`` (default: every available one) at each K, with its
    peak extra memory, and the parts of ``flatmtl_fast.backward`` (when "flatmtl" is among them)."""
    available = available_impls(method)
    if skipped := [impl for impl in impls or () if impl not in available]:
        print(f"training: skipping {skipped} (torchjd is not installed or has no {method})")
    impls = available if impls is None else [impl for impl in impls if impl in available]
    # The MLP keeps its original row names; other models prefix theirs.
    prefix = "" if model == "mlp" else f"{model}:"
    dtype = "bfloat16" if amp else "float32"
    rows: list[Row] = []
    for K in Ks:
        case = Case(K, batch, device, model, config, amp)
        parts: list[Row] = []
        for impl in impls:
            net, step = make_step(impl, method, case)
            n_shared = sum(p.numel() for p in net.trunk.parameters())
            # Each implementation's steps back to back, as a training loop runs them: the allocator's state is
            # part of a step's cost (timed in turn with other implementations, torchjd's step, which allocates
            # 225 MB, read 46 ms instead of 76). flatmtl's parts are timed in turn with its step, inside whole
            # steps of their own (step_parts), so that they meet the caches and the load the step meets.
            calls: dict[str, Callable[[], object]] = {f"step:{method}": step}
            if impl == "flatmtl":
                calls.update({f"part:{part}": call for part, call in step_parts(method, case)[1].items()})
            medians = round_robin_medians(calls, device, repeat)
            del net, step, calls  # before the memory measurement builds its own
            for op, seconds in medians.items():
                row = Row(SUITE, f"{prefix}{op}", impl, K, n_shared, dtype, seconds, 0)
                (parts if op.startswith("part:") else rows).append(row)
            peak = peak_extra_memory(impl, method, case)
            rows[-1].extra["peak_extra_MB"] = -1.0 if peak == -1 else peak / 1e6  # -1: the measurement failed
        rows += parts
    return rows
