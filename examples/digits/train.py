"""One training run per (method, seed): the loop of each method family and the step-time accounting.

Three families share the model, data, optimizer (Adam) and evaluation:

- plain aggregators: one forward, ``flatmtl_fast.backward`` (K backward passes + gram + solve + combine);
- ``+F-MTL``: ``flatmtl_fast.FMTL(...).step(closure)`` around the same aggregator (K + 1 forwards, 2K backwards);
- ``Selective``: ``flatmtl_fast.SelectiveGroupUpdate``, one optimizer step per task group and batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from data import CANVAS, NUM_CLASSES, TASK_NAMES, MultiDigits
from model import MultiDigitNet
from torch import Tensor
from tqdm import tqdm

import flatmtl_fast

# EW follows LibMTL: the losses summed with weight 1 each (Sum). CAGrad's c = 0.4, as in F-MTL's official runs
# (algorithms.md §1.1); every other method at its library defaults (the official ones).
AGGREGATORS: dict[str, Callable[[torch.Generator], flatmtl_fast.aggregators.base.Aggregator]] = {
    "EW": lambda generator: flatmtl_fast.Sum(),
    "PCGrad": lambda generator: flatmtl_fast.PCGrad(generator=generator),
    "CAGrad": lambda generator: flatmtl_fast.CAGrad(c=0.4),
    "IMGrad": lambda generator: flatmtl_fast.IMGrad(),
    "NashMTL": lambda generator: flatmtl_fast.NashMTL(),
    "UPGrad": lambda generator: flatmtl_fast.UPGrad(),
}
FMTL_SUFFIX = "+F-MTL"
SELECTIVE = "Selective"
METHODS = (*AGGREGATORS, *(name + FMTL_SUFFIX for name in AGGREGATORS), SELECTIVE)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every method.

    Attributes:
        steps: batches per run (one optimizer step each; Selective takes one per task group of the batch).
        batch_size: images per batch.
        lr: Adam's learning rate (Adam, being invariant to a constant gradient scale, makes the methods' different
            output scales — sum, mean, unit norm — largely irrelevant).
        rho: F-MTL's radius (0.05 non-adaptive: the official Multi-MNIST default).
        device: where the model and data live.
    """

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    rho: float = 0.05
    device: str = "cpu"


class StepTimer:
    """Splits each training step's time into the model's forward and backward passes, the optimizer, and the rest.

    "The rest" is everything the method adds between the passes: for the aggregators the Gram matrix, the
    solve and the combine (plus the binding of gradient rows), for F-MTL also the norms, perturbation and restore
    of the weights, for selective updates the affinity bookkeeping and the regrouping.

    Forward passes and the optimizer are timed around the calls. Backward passes run inside the library, so
    they are timed from hooks: a hook on each loss marks where a pass starts (its first node), a hook on each
    parameter where it last produced a gradient; a pass ends at its last parameter gradient. On CUDA the marks
    are events, read after one synchronisation per step.
    """

    def __init__(self, params: list[Tensor], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = {"model_s": 0.0, "aggregation_s": 0.0, "optimizer_s": 0.0}
        self._spans: list[tuple[str, object, object]] = []
        self._pass: list[object] | None = None  # [start, end or None] of the backward pass in progress
        self._step_start: object = None
        for p in params:
            p.register_hook(self._on_parameter_gradient)

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start: object, end: object) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def _on_loss_gradient(self, grad: Tensor) -> None:
        # Several losses summed (a task group) start one pass: only the first mark of a pass counts.
        if self._pass is not None and self._pass[1] is None:
            return
        self._close_pass()
        self._pass = [self._mark(), None]

    def _on_parameter_gradient(self, grad: Tensor) -> None:
        if self._pass is not None:
            self._pass[1] = self._mark()

    def _close_pass(self) -> None:
        if self._pass is not None and self._pass[1] is not None:
            self._spans.append(("model_s", *self._pass))
        self._pass = None

    def watch(self, losses: list[Tensor]) -> list[Tensor]:
        """Mark the start of any backward pass through ``losses``; returns them."""
        for loss in losses:
            loss.register_hook(self._on_loss_gradient)
        return losses

    def timed(self, category: str, fn: Callable[[], object]) -> object:
        """Run ``fn()``, adding its time to ``category`` ("model_s" or "optimizer_s")."""
        start = self._mark()
        result = fn()
        self._spans.append((category, start, self._mark()))
        return result

    def begin(self) -> None:
        """Start a training step."""
        self._spans.clear()
        self._pass = None
        self._step_start = self._mark()

    def end(self) -> None:
        """End the step: the rest of its time goes to ``aggregation_s``."""
        self._close_pass()
        end = self._mark()
        if self.cuda:
            torch.cuda.synchronize()
        accounted = 0.0
        for category, start, stop in self._spans:
            seconds = self._seconds(start, stop)
            self.totals[category] += seconds
            accounted += seconds
        self.totals["aggregation_s"] += max(0.0, self._seconds(self._step_start, end) - accounted)


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches, reshuffling at each pass over the n examples (a last short batch is dropped)."""
    per_epoch = max(1, n // batch_size)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        start = (step % per_epoch) * batch_size
        yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: MultiDigitNet, data: MultiDigits, batch_size: int = 1000) -> list[float]:
    """Per-task accuracy against the true labels."""
    correct = torch.zeros(data.clean_labels.shape[1], dtype=torch.long, device=data.images.device)
    for start in range(0, len(data), batch_size):
        logits = model(data.images[start : start + batch_size])
        truth = data.clean_labels[start : start + batch_size]
        correct += torch.stack([(out.argmax(1) == truth[:, k]).sum() for k, out in enumerate(logits)])
    return (correct.double() / len(data)).tolist()


def run(method: str, train: MultiDigits, test: MultiDigits, seed: int, config: TrainConfig, progress: bool) -> dict:
    """Train one fresh model with ``method`` and return its test accuracies and time split (JSON-ready)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    device = torch.device(config.device)
    torch.manual_seed(seed)
    K = train.labels.shape[1]
    model = MultiDigitNet(NUM_CLASSES[:K], CANVAS).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    shared = flatmtl_fast.FlatParameters(model.trunk)
    heads = [list(head.parameters()) for head in model.heads]
    timer = StepTimer(list(model.parameters()), device)
    train, test = train.to(device), test.to(device)

    def optimizer_step() -> None:
        timer.timed("optimizer_s", optimizer.step)

    def make_forward(index: Tensor) -> Callable[[], list[Tensor]]:
        images, labels = train.images[index], train.labels[index]

        def forward() -> list[Tensor]:
            losses = timer.timed(
                "model_s", lambda: [F.cross_entropy(out, labels[:, k]) for k, out in enumerate(model(images))]
            )
            return timer.watch(losses)

        return forward

    step = _step_function(method, model, shared, heads, optimizer, optimizer_step, seed, config, device)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(
        batches(len(train), config.batch_size, config.steps, generator),
        total=config.steps,
        desc=f"{method} (seed {seed})",
        disable=not progress,
        leave=False,
    )
    started = time.perf_counter()
    for number, index in enumerate(bar):
        forward = make_forward(index.to(device))
        timer.begin()
        losses = step(forward)
        timer.end()
        if progress and number % 20 == 0:
            bar.set_postfix_str(" ".join(f"{loss:.3f}" for loss in losses.tolist()))
    wall = time.perf_counter() - started
    accuracies = accuracy(model, test)
    return {
        "method": method,
        "seed": seed,
        "accuracy": dict(zip(TASK_NAMES[:K], accuracies, strict=True)),
        "mean_accuracy": sum(accuracies) / K,
        "time": {**timer.totals, "wall_s": wall},
        "config": asdict(config),
    }


def _step_function(
    method: str,
    model: MultiDigitNet,
    shared: flatmtl_fast.FlatParameters,
    heads: list[list[Tensor]],
    optimizer: torch.optim.Optimizer,
    optimizer_step: Callable[[], None],
    seed: int,
    config: TrainConfig,
    device: torch.device,
) -> Callable[[Callable[[], list[Tensor]]], Tensor]:
    """The body of one training step for ``method``: takes the batch's forward function, returns the K losses."""
    if method == SELECTIVE:
        # The paper's settings (regrouping at every batch; the native clustering stops once converged).
        sgu = flatmtl_fast.SelectiveGroupUpdate(len(heads), generator=torch.Generator().manual_seed(seed))

        def selective_step(forward: Callable[[], list[Tensor]]) -> Tensor:
            for group in sgu.groups():
                losses = forward()
                optimizer.zero_grad()
                sgu.loss(losses, group).backward()
                optimizer_step()
            return torch.stack(losses).detach()

        return selective_step

    base = method.removesuffix(FMTL_SUFFIX)
    aggregator = AGGREGATORS[base](torch.Generator(device).manual_seed(seed))
    if method.endswith(FMTL_SUFFIX):
        fmtl = flatmtl_fast.FMTL(shared, aggregator, rho=config.rho, task_params=heads, model=model)

        def fmtl_step(forward: Callable[[], list[Tensor]]) -> Tensor:
            optimizer.zero_grad()
            losses = fmtl.step(forward)
            optimizer_step()
            return losses

        return fmtl_step

    head_params = [p for head in heads for p in head]

    def plain_step(forward: Callable[[], list[Tensor]]) -> Tensor:
        losses = forward()
        optimizer.zero_grad()
        flatmtl_fast.backward(losses, shared, aggregator, task_params=head_params)
        optimizer_step()
        return torch.stack(losses).detach()

    return plain_step


def steps_for(epochs: float, n_full: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over the full-resource training set (also used in low-resource runs,
    so that a smaller training set changes the data, not the compute)."""
    return max(1, math.ceil(epochs * max(1, n_full // batch_size)))
