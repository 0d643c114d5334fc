"""Benchmark of a whole training step: a 4.7 M-parameter MLP trunk with K heads (issue 5's model).

Per step (median): plain summed backward; ``flatmtl_fast.backward`` with a fused aggregator, with
its breakdown (forward, the K backward passes, gram + solve + combine); torchjd's ``mtl_backward``
+ ``jac_to_grad``; a plain loop of K ``autograd.grad`` calls + torchjd's aggregator. F-MTL steps
(K + 1 forwards, 2K backwards): ``flatmtl_fast.FMTL`` vs the official code's loop with torchjd's
aggregator called on g and on h. Peak extra
memory of each (above the model and one step's activations) in a fresh process on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch
from torch import nn

import flatmtl_fast

from .common import Row, median_time

SUITE = "training"
TORCHJD_NAMES = {"UPGrad": "UPGrad", "MGDA": "MGDA", "PCGrad": "PCGrad", "Mean": "Mean"}


class Model(nn.Module):
    """MLP trunk 1024 → 1536 → 1536 → 512 (4.7 M parameters) and K linear heads."""

    def __init__(self, K: int, width: int = 1536, d_in: int = 1024, d_out: int = 512) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(d_out, 1) for _ in range(K))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)]


def make_step(impl: str, method: str, K: int, batch: int, device: torch.device):
    """Build the model and a closure running one training step with ``impl``."""
    torch.manual_seed(0)
    model = Model(K).to(device)
    x, y = torch.randn(batch, 1024, device=device), torch.randn(batch, K, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    if impl == "plain":

        def step():
            optimizer.zero_grad()
            sum(model.losses(x, y)[1]).backward()
            optimizer.step()

    elif impl == "flatmtl":
        shared = flatmtl_fast.FlatParameters(model.trunk)
        agg = getattr(flatmtl_fast, method)()

        def step():
            optimizer.zero_grad()
            flatmtl_fast.backward(model.losses(x, y)[1], shared, agg, task_params=model.heads.parameters())
            optimizer.step()

    elif impl == "torchjd":
        from torchjd.aggregation import __dict__ as aggregations
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = aggregations[TORCHJD_NAMES[method]]()
        shared_params = list(model.trunk.parameters())

        def step():
            optimizer.zero_grad()
            z, losses = model.losses(x, y)
            mtl_backward(losses, features=z)
            jac_to_grad(shared_params, agg)
            optimizer.step()

    elif impl == "autograd-loop":
        from torchjd.aggregation import __dict__ as aggregations

        agg = aggregations[TORCHJD_NAMES[method]]()
        shared_params = list(model.trunk.parameters())
        head_params = list(model.heads.parameters())

        def step():
            optimizer.zero_grad()
            _, losses = model.losses(x, y)
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
        shared = flatmtl_fast.FlatParameters(model.trunk)
        fmtl = flatmtl_fast.FMTL(shared, getattr(flatmtl_fast, method)(), rho=0.05, task_params=list(model.heads))

        def step():
            optimizer.zero_grad()
            fmtl.step(lambda: model.losses(x, y)[1])
            optimizer.step()

    elif impl == "fmtl-loop":
        step = _literal_fmtl_step(model, x, y, optimizer, method)
    else:
        raise ValueError(impl)
    return model, step


def _literal_fmtl_step(model: Model, x: torch.Tensor, y: torch.Tensor, optimizer, method: str):
    """F-MTL as the official code runs it: autograd.grad per task, a Python perturbation per parameter,
    explicit h_i = s_i − g_i and two calls of torchjd's aggregator (ρ = 0.05, separate norms)."""
    from torchjd.aggregation import __dict__ as aggregations

    agg, flat_agg = aggregations[TORCHJD_NAMES[method]](), aggregations[TORCHJD_NAMES[method]]()
    shared = list(model.trunk.parameters())

    def flat(grads) -> torch.Tensor:
        return torch.cat([g.flatten() for g in grads])

    def step():
        optimizer.zero_grad()
        losses = model.losses(x, y)[1]
        heads = [list(h.parameters()) for h in model.heads]
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
            sam = torch.autograd.grad(model.losses(x, y)[1][i], shared + heads[i])
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


def breakdown(method: str, K: int, batch: int, device: torch.device, repeat: int) -> dict[str, float]:
    """Seconds of the parts of flatmtl_fast.backward: forward, K backward passes, gram + solve + combine."""
    model, _ = make_step("plain", method, K, batch, device)
    x, y = torch.randn(batch, 1024, device=device), torch.randn(batch, K, device=device)
    shared = flatmtl_fast.FlatParameters(model.trunk)
    agg = getattr(flatmtl_fast, method)()
    capture = flatmtl_fast.TaskGradients(shared, K)
    forward = median_time(lambda: model.losses(x, y), device, repeat=repeat)
    with_backward = median_time(lambda: capture.capture(model.losses(x, y)[1]), device, repeat=repeat)
    G = capture.buffer
    aggregate = median_time(lambda: agg(G, out=shared.grad), device, repeat=repeat)
    capture.close()
    return {"forward": forward, "K_backward": with_backward - forward, "aggregate": aggregate}


def peak_extra_memory(impl: str, method: str, K: int, batch: int) -> int:
    """Peak bytes a step needs above a plain summed-backward step of the same model (fresh CPU process;
    VmHWM, see aggregators.py). Includes buffers kept between steps (our K × N task-gradient buffer)."""
    code = f"""
import re, torch
from bench.training import make_step

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

torch.manual_seed(0)
model, plain = make_step("plain", {method!r}, {K}, {batch}, torch.device("cpu"))
plain(); plain()
open("/proc/self/clear_refs", "w").write("5")
plain()
base = status("VmHWM")  # peak of a plain step: model, grads, activations
del model, plain
model, step = make_step({impl!r}, {method!r}, {K}, {batch}, torch.device("cpu"))
open("/proc/self/clear_refs", "w").write("5")
step(); step()
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    return int(json.loads(result.stdout.strip().splitlines()[-1])) if result.returncode == 0 else -1


def run(device: torch.device, method: str, Ks: list[int], batch: int, repeat: int) -> list[Row]:
    rows: list[Row] = []
    peers = importlib.util.find_spec("torchjd") and method in TORCHJD_NAMES
    impls = (
        ["plain", "flatmtl"]
        + (["torchjd", "autograd-loop"] if peers else [])
        + ["fmtl"]
        + (["fmtl-loop"] if peers else [])
    )
    for K in Ks:
        for impl in impls:
            model, step = make_step(impl, method, K, batch, device)
            n_shared = sum(p.numel() for p in model.trunk.parameters())
            row = Row(
                SUITE, f"step:{method}", impl, K, n_shared, "float32", median_time(step, device, repeat=repeat), 0
            )
            if device.type == "cpu":
                row.extra["peak_extra_MB"] = peak_extra_memory(impl, method, K, batch) / 1e6
            rows.append(row)
        parts = breakdown(method, K, batch, device, repeat)
        for part, seconds in parts.items():
            rows.append(Row(SUITE, f"part:{part}", "flatmtl", K, n_shared, "float32", seconds, 0))
    return rows
