"""What each launched rank runs: every scenario of the distributed tests in one gloo process group.

Launching processes that import torch is the slow part (seconds each on two cores), so one launch of three
ranks runs everything: world size 3 on the global group, 2 on the subgroup {0, 1}, 1 on the subgroup {0}.
Each scenario's results (tensors, byte logs, error messages) go to ``rank<r>.pt`` after every scenario; the
tests compare them with single-process computations of their own.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from distributed._cases import (
    AVERAGED,
    EMPTY_SHARD_N,
    EXACT,
    HIDDEN,
    N_VALUES,
    STEPS,
    K,
    Net,
    TinyNet,
    WideNet,
    batch,
    column_slices,
    make,
    mean_inputs,
    rank_inputs,
    task_losses,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import flatmtl_fast
from flatmtl_fast.distributed import LAYOUTS, DistributedStepError, aggregate

GROUP_TIMEOUT = timedelta(seconds=60)  # generous: two loaded cores; only a broken test ever waits this long
SHORT_TIMEOUT = timedelta(seconds=3)  # the group on which a rank raises mid-step

#: The torch.distributed functions the byte counter wraps: every collective and point-to-point call.
_COUNTED = (
    "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_gather_single",
    "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce", "gather", "scatter",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
)  # fmt: skip
_log: list[tuple[str, list[int]]] | None = None


def _install_counter() -> None:
    """Wrap the torch.distributed functions: while :func:`counting` is active each call is logged as
    (function name, byte size of each tensor argument in order)."""

    def sizes(args: tuple[Any, ...]) -> list[int]:
        flat = [t for a in args for t in (a if isinstance(a, list | tuple) else [a]) if isinstance(t, Tensor)]
        return [t.numel() * t.element_size() for t in flat]

    for name in _COUNTED:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            if _log is not None:
                _log.append((_name, sizes(args)))
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)


@contextlib.contextmanager
def counting() -> Iterator[list[tuple[str, list[int]]]]:
    global _log
    _log = []
    try:
        yield _log
    finally:
        _log = None


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Leave the model's own communication (tensor parallelism's gathers) out of an active count."""
    global _log
    saved, _log = _log, None
    try:
        yield
    finally:
        _log = saved


def main(rank: int, world: int, store_path: str, out_dir: str, suite: str = "main") -> None:
    """Run the scenarios of ``suite`` on this rank: ``"main"`` (three ranks) or ``"hsdp"`` (four: a 2 × 2 mesh)."""
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    _install_counter()
    scenarios = _hsdp_scenarios(rank) if suite == "hsdp" else _main_scenarios(rank, store)
    results: dict[str, Any] = {"errors": {}}
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario()
        except Exception:
            results["errors"][name] = traceback.format_exc()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _main_scenarios(rank: int, store: dist.Store) -> dict[str, Callable[[], Any]]:
    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    return {
        "aggregate": lambda: _aggregate_cases(rank, groups),
        "averaged_rows": lambda: _averaged_rows(rank, groups),
        "mismatch": lambda: _mismatch(rank),
        "dbmtl_state": lambda: _dbmtl_state(rank),
        "backward_ddp": lambda: _backward_ddp(rank, groups),
        "backward_tensor_parallel": lambda: _backward_tensor_parallel(rank, groups),
        "backward_fsdp2": lambda: _backward_fsdp2(rank, groups),
        "fsdp2_misuse": lambda: _fsdp2_misuse(rank, groups[2]),
        "fmtl_after_reshard": lambda: _fmtl_after_reshard(rank, groups[2]),
        "fmtl_fsdp2": lambda: _fmtl_fsdp2(rank, groups),
        "fsdp2_bfloat16": lambda: _fsdp2_bfloat16(rank, groups),
        "fmtl": lambda: _fmtl(rank, groups),
        "fmtl_tensor_parallel": lambda: _fmtl_tensor_parallel(rank, groups),
        "nonfinite": lambda: _nonfinite(rank),
        "float16": lambda: _float16(rank, groups),
        "fsdp2_empty_shard": lambda: _fsdp2_empty_shard(rank, groups),
        "fmtl_skipped_traffic": lambda: _fmtl_skipped_traffic(rank, groups),
        "raises_mid_step": lambda: _raises_mid_step(rank, store),  # last: it leaves its subgroup broken
    }


#: (N, layout) of the ``aggregate`` cases: both layouts for each N, and a sharded N that leaves rank 2 of 3 no columns.
AGGREGATE_CASES = (*((N, layout) for N in N_VALUES for layout in LAYOUTS), (EMPTY_SHARD_N, "sharded"))


def _aggregate_cases(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """Every method × world size × (N, layout) × step through ``aggregate``."""
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for N, layout in AGGREGATE_CASES:
            for name in (*EXACT, "GradDrop"):
                aggregator = make(name)
                for step in range(STEPS):
                    G, losses = rank_inputs(P, rank, N, step)
                    if layout == "sharded":  # this rank's columns of the already averaged gradients
                        G = mean_inputs(P, N, step)[0][:, column_slices(N, P)[rank]].contiguous()
                    with counting() as calls:
                        result = aggregate(G, aggregator, losses=losses, group=group, layout=layout)
                    out[P, N, name, layout, step] = {
                        "direction": result.direction,
                        "weights": result.weights,
                        "traffic": asdict(result.traffic),
                        "calls": calls,
                    }
    return out


def _averaged_rows(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """``aggregate(averaged_rows=AVERAGED)``: the leading rows are already the mean (identical on every rank),
    the others this rank's own; only the latter are reduce-scattered."""
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for N in N_VALUES:
            G, losses = rank_inputs(P, rank, N, 0)
            G[:AVERAGED] = mean_inputs(P, N, 0)[0][:AVERAGED]
            with counting() as calls:
                result = aggregate(G, make("UPGrad"), losses=losses, group=group, averaged_rows=AVERAGED)
            out[P, N] = {"direction": result.direction, "traffic": asdict(result.traffic), "calls": calls}
    return out


def _mismatch(rank: int) -> dict[tuple[str, str], tuple[str, str, float] | None]:
    """Ranks that disagree on K, N or the aggregator, in ``aggregate`` and in an F-MTL step (which communicates
    before its aggregation): every rank must raise, quickly (no timeout)."""
    cases = {
        "K": (3 if rank == 0 else 4, 10, flatmtl_fast.UPGrad),
        "N": (K, 10 + rank, flatmtl_fast.UPGrad),
        "aggregator": (K, 10, flatmtl_fast.MGDA if rank == 1 else flatmtl_fast.UPGrad),
        "hyperparameters": (K, 10, lambda: flatmtl_fast.CAGrad(c=0.4 if rank == 1 else 0.5)),
    }
    out = {}
    for what, (rows, columns, make_aggregator) in cases.items():
        for path, run in (("aggregate", _aggregate_ones), ("FMTL", _fmtl_step_on_a_vector)):
            start = time.monotonic()
            try:
                run(rows, columns, make_aggregator())
                out[path, what] = None
            except DistributedStepError as err:
                out[path, what] = (type(err).__name__, str(err), time.monotonic() - start)
    return out


def _dbmtl_state(rank: int) -> dict[str, Any]:
    """DB-MTL's buffer holds this rank's columns: one step, then rank 0's state loaded on every rank (a checkpoint
    saved by rank 0 only), then each rank's own."""
    aggregator, world = make("DBMTL"), dist.get_world_size()
    G, losses = rank_inputs(world, rank, N_VALUES[1], 0)
    aggregate(G, aggregator, losses=losses)
    own = aggregator.state_dict()
    shared = [own if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    out: dict[str, Any] = {"rank in state": own["rank"]}
    G, losses = rank_inputs(world, rank, N_VALUES[1], 1)
    aggregator.load_state_dict(shared[0])
    start = time.monotonic()
    try:
        aggregate(G, aggregator, losses=losses)
        out["rank 0's state"] = None
    except DistributedStepError as err:
        out["rank 0's state"] = (str(err), time.monotonic() - start)
    aggregator.load_state_dict(own)
    out["own state"] = aggregate(G, aggregator, losses=losses).direction
    return out


def _aggregate_ones(rows: int, columns: int, aggregator: flatmtl_fast.aggregators.Aggregator) -> None:
    aggregate(torch.ones(rows, columns), aggregator)


def _fmtl_step_on_a_vector(rows: int, columns: int, aggregator: flatmtl_fast.aggregators.Aggregator) -> None:
    """One F-MTL step over the global group on a shared vector of ``columns`` scalars with ``rows`` losses."""
    theta = nn.Parameter(torch.linspace(0.5, 1.5, columns))
    fmtl = flatmtl_fast.FMTL(flatmtl_fast.FlatParameters([theta]), aggregator, process_group=dist.group.WORLD)
    fmtl.step(lambda: [(theta * (i + 1)).square().sum() for i in range(rows)])


def _backward_ddp(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """``flatmtl_fast.backward`` on a DDP-wrapped model inside ``no_sync``, each rank on its slice of the batch."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for name in ("UPGrad", "PCGrad", "DBMTL", "UPGrad+micro-batches"):
            net = Net()
            ddp = DistributedDataParallel(net, process_group=group)
            ddp_calls: list[int] = []
            ddp.register_comm_hook((ddp_calls, group), _counting_comm_hook)
            shared = flatmtl_fast.FlatParameters(net.trunk)
            aggregator = make(name.removesuffix("+micro-batches"))
            with ddp.no_sync():
                w, calls = _rank_step(
                    ddp, net, shared, aggregator, P, rank, group, micro=name.endswith("+micro-batches")
                )
            out[P, name] = {
                "shared": shared.grad.clone(),
                "heads": [p.grad.clone() for p in net.heads.parameters()],
                "weights": w,
                "calls": calls,
                "ddp_allreduces": len(ddp_calls),
            }
            # Outside no_sync DDP's reducer does run (so the hook would have seen it above).
            ddp(x.chunk(P)[rank], y.chunk(P)[rank]).sum().backward()
            out[P, name]["ddp_allreduces_outside_no_sync"] = len(ddp_calls)
    return out


def _rank_step(
    forward: Callable[[Tensor, Tensor], Tensor],
    net: Net,
    shared: flatmtl_fast.FlatParameters,
    aggregator: flatmtl_fast.aggregators.Aggregator,
    P: int,
    rank: int,
    group: dist.ProcessGroup,
    micro: bool,
    **options: Any,
) -> tuple[Tensor | None, list[tuple[str, list[int]]]]:
    """``backward`` on this rank's slice of the batch: in one call, or (``micro``) in two micro-batches of halved
    losses accumulated locally (aggregate=False) before the one distributed aggregation — the same step. Returns
    the weights and the collectives of the aggregating call."""
    x, y = batch()
    parts = 2 if micro else 1
    slices = zip(x.chunk(P)[rank].chunk(parts), y.chunk(P)[rank].chunk(parts), strict=True)
    for part, (xs, ys) in enumerate(slices):
        losses = forward(xs, ys) / parts
        with counting() as calls:
            w = flatmtl_fast.backward(
                losses,
                shared,
                aggregator,
                task_params=net.heads.parameters(),
                process_group=group,
                aggregate=part == parts - 1,
                **options,
            )
    return w, calls


def _counting_comm_hook(state: tuple[list[int], dist.ProcessGroup], bucket):  # DDP rejects string annotations
    """A DDP communication hook that records each bucket all-reduce DDP would run (and runs it)."""
    calls, group = state
    calls.append(bucket.buffer().numel())
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda f: f.value()[0])


class GatherFeatures(torch.autograd.Function):
    """Tensor parallelism's gather: forward concatenates every rank's features; since every rank then
    computes the same (replicated) downstream gradient, the backward keeps this rank's slice of it."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(ctx.world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.chunk(ctx.world, dim=1)[ctx.rank], None


def _tensor_parallel_net(rank: int, P: int) -> tuple[WideNet, nn.Parameter, nn.Parameter, flatmtl_fast.FlatParameters]:
    """A WideNet whose wide layer is split by rows over P ranks: this rank's weight and bias rows, flattened."""
    net = WideNet()
    rows = torch.arange(HIDDEN).chunk(P)[rank]
    weight = nn.Parameter(net.layer.weight.detach()[rows].clone())
    bias = nn.Parameter(net.layer.bias.detach()[rows].clone())
    return net, weight, bias, flatmtl_fast.FlatParameters([weight, bias])


def _tensor_parallel_grads(net: WideNet, weight: Tensor, bias: Tensor) -> dict[str, Any]:
    """This rank's gradients of its slice of the wide layer and of the heads."""
    return {
        "weight": weight.grad.clone(),
        "bias": bias.grad.clone(),
        "heads": [p.grad.clone() for p in net.heads.parameters()],
    }


def _backward_tensor_parallel(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[int, dict[str, Any]]:
    """``backward(layout="sharded")``: each rank owns rows of the wide layer, all ranks see the whole batch."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        net, weight, bias, shared = _tensor_parallel_net(rank, P)
        z = GatherFeatures.apply(torch.tanh(nn.functional.linear(x, weight, bias)), group)
        losses = task_losses(net.heads, z, y)
        with counting() as calls:
            w = flatmtl_fast.backward(
                losses,
                shared,
                make("UPGrad"),
                task_params=net.heads.parameters(),
                process_group=group,
                layout="sharded",
            )
        out[P] = {**_tensor_parallel_grads(net, weight, bias), "weights": w, "calls": calls}
    return out


#: The FSDP2 cases: aggregator, then options of backward (each rank its slice of the batch, every step then
#: an SGD step with momentum on the DTensor parameters).
FSDP2_CASES = {
    "UPGrad": {},
    "MGDA": {},
    "PCGrad": {},
    "DBMTL": {},
    "UPGrad+bfloat16": {"grad_dtype": torch.bfloat16},
    "UPGrad+micro-batches": {},
}


def _backward_fsdp2(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """``backward(layout="sharded")`` on a model sharded by FSDP2's ``fully_shard``: FSDP's reduce-scatter
    averages each task's gradients into this rank's slice of the buffer row, only the Gram is all-reduced."""
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for case, options in FSDP2_CASES.items():
            net, shared = _fsdp2_net(group)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            aggregator = make(case.split("+")[0])
            steps = []
            for _ in range(STEPS):
                micro = case.endswith("+micro-batches")
                w, calls = _rank_step(net, net, shared, aggregator, P, rank, group, micro, layout="sharded", **options)
                with uncounted():  # every rank takes part in the gathers (on one rank: the .grad itself, so clone)
                    grads = [p.grad.full_tensor().clone() for p in net.parameters()]
                optimizer.step()
                optimizer.zero_grad()
                steps.append({"weights": w, "grads": grads, "calls": calls})
            out[P, case] = {"steps": steps, "params": [p.full_tensor().detach().clone() for p in net.parameters()]}
    return out


def _fsdp2_net(group: dist.ProcessGroup | Any) -> tuple[Net, flatmtl_fast.FlatParameters]:
    """A Net whose trunk and root are sharded by ``fully_shard`` over ``group`` (or a DeviceMesh), and its flattened
    trunk shards."""
    net = _sharded_net(group)
    return net, flatmtl_fast.FlatParameters(net.trunk)


def _sharded_net(
    group: dist.ProcessGroup | Any,
    *,
    shard_trunk: bool = True,
    evaluated: bool = False,
    bfloat16: bool = False,
    trunk_reshards: bool = True,
    model: type[Net] = Net,
) -> Net:
    """A Net sharded by ``fully_shard`` over ``group`` (or a DeviceMesh): the trunk on its own unless
    ``shard_trunk`` is False, then the root. ``evaluated``: after a forward pass under ``no_grad``, which leaves
    the root's parameters (the heads, and the trunk's when it is not sharded on its own) FSDP's gathered copies.
    ``bfloat16``: FSDP's mixed precision, bfloat16 parameters and inputs in the passes, gradients averaged in
    float32. ``trunk_reshards=False``: the trunk stays gathered from its forward pass to its backward pass.
    ``model``: the net's class (:class:`TinyNet` leaves rank 2 of 3 no shard of the trunk)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = group if isinstance(group, DeviceMesh) else DeviceMesh.from_group(group, "cpu")
    options: dict[str, Any] = {"mesh": mesh}
    if bfloat16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    net = model()
    if shard_trunk:
        fully_shard(net.trunk, reshard_after_forward=trunk_reshards, **options)
    fully_shard(net, **options)
    if evaluated:
        with torch.no_grad():
            net(*batch())
    return net


#: FSDP2 with mixed precision (bfloat16 passes, float32 averaging): the step, and whether the trunk reshards after
#: its forward pass (FSDP's default) or stays gathered until its backward pass.
FSDP2_BFLOAT16_CASES = {
    "backward": True,
    "F-MTL": True,
    "F-MTL+trunk kept gathered": False,
}


def _fsdp2_bfloat16(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, list[Tensor]]:
    """One UPGrad step (``backward`` or F-MTL) on a model under FSDP2's mixed precision, each rank on its slice of
    the batch: the float32 gradients of the whole model."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        xs, ys = x.chunk(P)[rank], y.chunk(P)[rank]
        for case, trunk_reshards in FSDP2_BFLOAT16_CASES.items():
            net = _sharded_net(group, bfloat16=True, trunk_reshards=trunk_reshards)
            _sharded_upgrad_step(net, group, case, xs, ys)
            with uncounted():
                out[P, case] = [p.grad.full_tensor().clone() for p in net.parameters()]
    return out


def _sharded_upgrad_step(net: Net, group: dist.ProcessGroup, case: str, xs: Tensor, ys: Tensor) -> None:
    """One UPGrad step on FSDP2 shards of ``net``: ``backward``'s (``case`` "backward") or F-MTL's."""
    if case == "backward":
        flatmtl_fast.backward(
            net(xs, ys),
            flatmtl_fast.FlatParameters(net.trunk),
            make("UPGrad"),
            task_params=net.heads.parameters(),
            process_group=group,
            layout="sharded",
        )
    else:
        _fmtl_on(net, group).step(lambda: net(xs, ys))


#: The F-MTL cases on FSDP2 shards: aggregator, then options of FMTL.
FMTL_FSDP2_CASES = {
    "UPGrad": {},
    "MGDA": {},
    "UPGrad+a": {"variant": "a"},
    "UPGrad+adaptive+joint": {"adaptive": True, "normalize": "joint"},
}


def _fmtl_fsdp2(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """F-MTL on a model sharded by ``fully_shard`` (each rank its slice of the batch, two steps of SGD with
    momentum): every rank perturbs its own shards of the trunk and heads by the ε_i of the whole batch."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for case, options in FMTL_FSDP2_CASES.items():
            net = _sharded_net(group)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            fmtl = _fmtl_on(net, group, case.split("+")[0], **options)
            steps = []
            for _ in range(STEPS):
                with uncounted():
                    before = [p.full_tensor().detach().clone() for p in net.parameters()]
                with counting() as calls:
                    fmtl.step(lambda net=net, P=P: net(x.chunk(P)[rank], y.chunk(P)[rank]))
                with uncounted():
                    grads = [p.grad.full_tensor().clone() for p in net.parameters()]
                    after = [p.full_tensor().detach().clone() for p in net.parameters()]
                restored = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
                optimizer.step()
                optimizer.zero_grad()
                steps.append({"grads": grads, "restored": restored, "traffic": asdict(fmtl.traffic), "calls": calls})
            out[P, case] = {"steps": steps, "params": [p.full_tensor().detach().clone() for p in net.parameters()]}
    return out


#: The HSDP cases (a 2 × 2 mesh: two replicas of two shards, each rank its quarter of the batch): aggregator, and
#: whether the step is F-MTL's (ASAM, joint norm) rather than backward's.
HSDP_CASES = {"UPGrad": False, "NashMTL": False, "UPGrad+F-MTL": True}
HSDP_WORLD = 4


def _hsdp_scenarios(rank: int) -> dict[str, Callable[[], Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return {"hsdp": lambda: _hsdp(rank, mesh), "hsdp_misuse": lambda: _hsdp_misuse(mesh)}


def _hsdp(rank: int, mesh: Any) -> dict[str, dict[str, Any]]:
    """``backward`` and ``FMTL`` on HSDP shards with the shard dimension's group: FSDP averages each task's
    gradients over all four ranks, the Gram (and F-MTL's norms) are summed over the two shards only."""
    x, y = batch()
    shard_group = mesh.get_group("shard")
    out = {}
    for case, is_fmtl in HSDP_CASES.items():
        net, shared = _fsdp2_net(mesh)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        aggregator = make(case.split("+")[0])
        fmtl = flatmtl_fast.FMTL(
            shared, aggregator, rho=0.5, adaptive=True, normalize="joint", task_params=list(net.heads),
            process_group=shard_group, layout="sharded",
        ) if is_fmtl else None  # fmt: skip
        steps = []
        for _ in range(STEPS):
            if fmtl is not None:
                fmtl.step(lambda net=net: net(x.chunk(HSDP_WORLD)[rank], y.chunk(HSDP_WORLD)[rank]))
            else:
                _rank_step(net, net, shared, aggregator, HSDP_WORLD, rank, shard_group, False, layout="sharded")
            steps.append([p.grad.full_tensor().clone() for p in net.parameters()])
            optimizer.step()
            optimizer.zero_grad()
        out[case] = {"steps": steps, "params": [p.full_tensor().detach().clone() for p in net.parameters()]}
    return out


def _hsdp_misuse(mesh: Any) -> dict[str, tuple[str, str] | None]:
    """HSDP shards aggregated over a group other than the shard dimension's: each raises before any collective."""
    net, shared = _fsdp2_net(mesh)
    x, y = batch()
    attempts: dict[str, Callable[[], object]] = {
        group_name: lambda group=group: flatmtl_fast.backward(
            net(x, y), shared, make("UPGrad"), task_params=net.heads.parameters(), process_group=group, layout="sharded"
        )
        for group_name, group in (("every rank", dist.group.WORLD), ("the replicas", mesh.get_group("replicate")))
    }
    return _outcomes(attempts)


def _outcomes(attempts: dict[str, Callable[[], object]]) -> dict[str, tuple[str, str] | None]:
    """Each attempt's exception as (type name, message), or None where it did not raise."""
    out: dict[str, tuple[str, str] | None] = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            out[what] = None
        except Exception as err:
            out[what] = (type(err).__name__, str(err))
    return out


def _fsdp2_misuse(rank: int, group: dist.ProcessGroup) -> dict[str, tuple[str, str] | None]:
    """FSDP2 shards used in ways that cannot give the right step: each must raise before any collective."""
    from torch.distributed.tensor import DTensor, Partial

    if rank >= 2:
        return {}
    net, shared = _fsdp2_net(group)
    mesh = shared.params[0].device_mesh
    x, y = batch()
    partial = nn.Parameter(DTensor.from_local(torch.ones(4, 2), mesh, [Partial()]))
    attempts: dict[str, Callable[[], object]] = {
        "mixed": lambda: flatmtl_fast.FlatParameters([*net.trunk.parameters(), nn.Parameter(torch.ones(2))]),
        "partial placement": lambda: flatmtl_fast.FlatParameters([partial]),
        "another group": lambda: flatmtl_fast.backward(
            net(x, y), shared, make("UPGrad"), process_group=dist.group.WORLD, layout="sharded"
        ),
        "no process group": lambda: flatmtl_fast.backward(net(x, y), shared, make("UPGrad")),
        "replicated layout": lambda: flatmtl_fast.backward(net(x, y), shared, make("UPGrad"), process_group=group),
        "batched": lambda: flatmtl_fast.backward(
            net(x, y), shared, make("UPGrad"), process_group=group, layout="sharded", batched=True
        ),
        "fmtl without a group": lambda: flatmtl_fast.FMTL(shared, make("UPGrad")),
        "fmtl replicated layout": lambda: flatmtl_fast.FMTL(shared, make("UPGrad"), process_group=group),
        "fmtl without heads": lambda: flatmtl_fast.FMTL(shared, make("UPGrad"), process_group=group, layout="sharded"),
        "fmtl sharded heads": lambda: flatmtl_fast.FMTL(
            # A fresh model: after a forward pass FSDP keeps the root's parameters (the heads) unsharded.
            flatmtl_fast.FlatParameters(nn.Linear(2, 2)),
            make("UPGrad"),
            task_params=[_fsdp2_net(group)[0].heads[0]],
        ),
        "flat after evaluation": lambda: flatmtl_fast.FlatParameters(
            _sharded_net(group, shard_trunk=False, evaluated=True).trunk
        ),
        "fmtl heads after evaluation": lambda: _fmtl_on(_sharded_net(group, evaluated=True), group),
    }
    return _outcomes(attempts)


def _fmtl_on(net: Net, group: dist.ProcessGroup, name: str = "UPGrad", **options: Any) -> flatmtl_fast.FMTL:
    """F-MTL (ρ = 0.5, FMTL's ``options``) around the aggregator ``name`` on FSDP2 shards of ``net``: its flattened
    trunk, its heads as the task parameters."""
    shared = flatmtl_fast.FlatParameters(net.trunk)
    return flatmtl_fast.FMTL(
        shared, make(name), rho=0.5, task_params=list(net.heads), process_group=group, layout="sharded", **options
    )


def _fmtl_after_reshard(rank: int, group: dist.ProcessGroup) -> bool:
    """Whether F-MTL built after an evaluation and ``reshard()`` gives the gradients of one built before any
    forward pass (both on rank ``rank``'s slice of the batch)."""
    if rank >= 2:
        return True
    x, y = batch()
    grads = []
    for evaluated in (False, True):
        net = _sharded_net(group, evaluated=evaluated)
        net.reshard()  # no-op on a fresh model
        _fmtl_on(net, group).step(lambda net=net: net(x.chunk(2)[rank], y.chunk(2)[rank]))
        grads.append([p.grad.full_tensor() for p in net.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def _fmtl(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, dict[str, Any]]:
    """One F-MTL step (DDP-style: each rank its slice of the batch) per aggregator, world size and variant."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for name, variant in (("UPGrad", "flat"), ("MGDA", "flat"), ("UPGrad", "a")):
            net = Net()
            shared = flatmtl_fast.FlatParameters(net.trunk)
            fmtl = flatmtl_fast.FMTL(
                shared, make(name), rho=0.5, variant=variant, task_params=list(net.heads), process_group=group
            )
            with counting() as calls:
                fmtl.step(lambda net=net, P=P: net(x.chunk(P)[rank], y.chunk(P)[rank]))
            out[P, name, variant] = {
                "shared": shared.grad.clone(),
                "heads": [p.grad.clone() for p in net.heads.parameters()],
                "weights": [p.detach().clone() for p in net.parameters()],
                "traffic": asdict(fmtl.traffic),
                "calls": calls,
            }
    return out


def _fmtl_tensor_parallel(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[int, dict[str, Any]]:
    """``FMTL(layout="sharded")``: each rank owns rows of the wide layer (and perturbs only those), all ranks
    see the whole batch, the perturbation norms are summed over the slices."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        net, weight, bias, shared = _tensor_parallel_net(rank, P)
        fmtl = flatmtl_fast.FMTL(
            shared, make("UPGrad"), rho=0.5, task_params=list(net.heads), process_group=group, layout="sharded"
        )

        def closure(net: WideNet = net, weight: Tensor = weight, bias: Tensor = bias, group=group) -> Tensor:
            with uncounted():
                z = GatherFeatures.apply(torch.tanh(nn.functional.linear(x, weight, bias)), group)
            return task_losses(net.heads, z, y)

        with counting() as calls:
            fmtl.step(closure)
        out[P] = {**_tensor_parallel_grads(net, weight, bias), "traffic": asdict(fmtl.traffic), "calls": calls}
    return out


def _nonfinite(rank: int) -> tuple[str, str, bool] | None:
    """A NaN in rank 1's batch only: the global Gram is NaN, so every rank raises and writes no .grad."""
    x, y = batch()
    x_local, y_local = x.chunk(3)[rank].clone(), y.chunk(3)[rank]
    if rank == 1:
        x_local[0, 0] = float("nan")
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    try:
        losses = net(x_local, y_local)
        flatmtl_fast.backward(
            losses, shared, make("UPGrad"), task_params=net.heads.parameters(), process_group=dist.group.WORLD
        )
    except FloatingPointError as err:
        return type(err).__name__, str(err), all(p.grad is None for p in net.parameters())
    return None


#: float16 gradients of each rank: 40000 plus rank_inputs' multiples of 1/16, so that the sum over 2 or 3 ranks
#: overflows float16 (max 65504) while their mean does not.
FLOAT16_OFFSET = 40_000.0


def float16_inputs(P: int, rank: int, N: int) -> Tensor:
    return (FLOAT16_OFFSET + rank_inputs(P, rank, N, 0)[0]).half()


def _float16(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, Tensor]:
    """``aggregate`` and ``backward``'s head averaging on float16 values whose sum over the ranks overflows."""
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for N in N_VALUES:
            for name in ("Mean", "UPGrad"):
                out[P, N, name] = aggregate(float16_inputs(P, rank, N), make(name), group=group).direction
        head = nn.Parameter(torch.zeros(3, dtype=torch.float16))
        head.grad = torch.full((3,), FLOAT16_OFFSET + rank, dtype=torch.float16)
        G = float16_inputs(P, rank, N_VALUES[0])
        flatmtl_fast.distributed.DistributedStep(G, make("Mean"), group=group, task_params=[head])
        out[P, "head"] = head.grad
    return out


def _fsdp2_empty_shard(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[tuple, list[Tensor]]:
    """``backward`` and F-MTL on FSDP2 shards of :class:`TinyNet`, whose trunk rank 2 of 3 holds no part of."""
    x, y = batch()
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        for case in ("backward", "F-MTL"):
            net = _sharded_net(group, model=TinyNet)
            _sharded_upgrad_step(net, group, case, x.chunk(P)[rank], y.chunk(P)[rank])
            numel = sum(p.to_local().numel() for p in net.trunk.parameters())
            with uncounted():
                out[P, case] = [p.grad.full_tensor().clone() for p in net.parameters()], numel
    return out


def _fmtl_skipped_traffic(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict[int, tuple[Any, dict[str, int]]]:
    """An F-MTL step skipped (``nonfinite="skip"``) for a NaN perturbed loss: what it returned, and its traffic."""
    out = {}
    for P, group in groups.items():
        if rank >= P:
            continue
        theta = nn.Parameter(torch.linspace(0.5, 1.5, 10))
        fmtl = flatmtl_fast.FMTL(
            flatmtl_fast.FlatParameters([theta]), make("UPGrad"), nonfinite="skip", process_group=group
        )
        calls = []

        def closure(theta: Tensor = theta, calls: list = calls) -> list[Tensor]:
            calls.append(1)
            losses = [(theta * (i + 1)).square().sum() for i in range(K)]
            return losses if len(calls) == 1 else [losses[0] * float("nan"), *losses[1:]]

        with counting() as log:
            result = fmtl.step(closure)
        out[P] = result, asdict(fmtl.traffic), log
    return out


class Exploding(flatmtl_fast.UPGrad):
    """UPGrad that raises on rank 1 of the global group while solving (after the Gram's all-reduce)."""

    def weights(self, M: Tensor, losses: Tensor | None = None) -> Tensor:
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 fails in the middle of the step")
        return super().weights(M, losses)


def _raises_mid_step(rank: int, store: dist.Store) -> tuple[str, str, float] | None:
    """Rank 1 raises between the Gram's all-reduce and the weights' broadcast and stays alive: rank 0 must get
    a DistributedStepError once the group's timeout expires, not wait forever."""
    group = dist.new_group([0, 1], timeout=SHORT_TIMEOUT)
    if rank >= 2:
        return None
    start = time.monotonic()
    try:
        aggregate(torch.ones(K, 10) * (rank + 1), Exploding(), group=group)
        outcome = None
    except Exception as err:
        outcome = (type(err).__name__, str(err), time.monotonic() - start)
    if rank == 0:
        store.set("rank 0 is done", "1")
    else:  # stay alive until rank 0 has seen the timeout (exiting would close the connection instead)
        store.wait(["rank 0 is done"], timedelta(seconds=30))
    return outcome
