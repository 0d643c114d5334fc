"""A process group of one rank, created in this process: NCCL on a GPU (the issue's world-size-1 case) and, with the
same test bodies, gloo on the CPU, which proves the tests themselves here.

With one rank every collective is the identity (a sum over one rank, ÷ 1, rank 0's broadcast) and the O(N) ones
are skipped, so the distributed path must give exactly — bit for bit — what the plain path gives. The group is
destroyed after each test, so nothing leaks into other tests of this process (the gloo launch of
test_distributed.py runs in processes of its own).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from distributed._cases import K, Net, batch
from support.host_sync import forbid_host_sync

import flatmtl_fast
from bench.distributed import group_of_one
from flatmtl_fast.distributed import LAYOUTS, aggregate

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch was built without torch.distributed")

AGGREGATORS = {
    "MGDA": flatmtl_fast.MGDA,
    "MGDA-loss": lambda: flatmtl_fast.MGDA(normalize="loss"),  # the losses' mean over the group reaches the solver
    "UPGrad": flatmtl_fast.UPGrad,
    "CAGrad": flatmtl_fast.CAGrad,
}
#: The Tensor methods that read a device value on the host (what Python code could call to synchronise).


@pytest.fixture(
    params=[
        pytest.param("cpu", id="gloo-cpu"),
        pytest.param(
            "cuda",
            id="nccl-cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not dist.is_nccl_available(), reason="torch was built without NCCL"),
            ],
        ),
    ]
)
def group(request: pytest.FixtureRequest) -> Iterator[tuple[dist.ProcessGroup, torch.device]]:
    """The default process group with this process as its only rank (NCCL on CUDA, gloo on the CPU: the helper of
    the distributed benchmark), destroyed after the test, and the device its tensors live on."""
    device = torch.device(request.param, 0) if request.param == "cuda" else torch.device("cpu")
    with group_of_one(device) as process_group:
        yield process_group, device


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_equals_the_plain_path(group, layout: str, name: str) -> None:
    """``backward(process_group=, layout=)`` on one rank: the same weights and ``.grad`` (shared and heads)."""
    process_group, device = group
    x, y = (t.to(device) for t in batch())
    results = []
    for pg in (None, process_group):
        net = Net().to(device)  # seeded: the same parameters both times
        shared = flatmtl_fast.FlatParameters(net.trunk)
        w = flatmtl_fast.backward(
            net(x, y), shared, AGGREGATORS[name](), task_params=net.heads.parameters(), process_group=pg, layout=layout
        )
        results.append((w, [p.grad.clone() for p in net.parameters()]))
    (plain_w, plain_grads), (group_w, group_grads) = results
    assert torch.equal(group_w, plain_w)
    for got, want in zip(group_grads, plain_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_aggregate_equals_the_plain_aggregation_without_host_sync(group, layout: str, name: str) -> None:
    """``aggregate`` on one rank equals ``agg(G, out=)`` and ``agg.weights(gram(G))`` bit for bit, and — once warm
    and without the consistency check, whose all-gathered integers are read on the host by design — never
    synchronises with the device."""
    process_group, device = group
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(K, 10_001, generator=gen).to(device)
    losses = (torch.rand(K, generator=gen, dtype=torch.float64) + 0.5).to(device)
    plain = AGGREGATORS[name]()
    expected_d = plain(G, losses, out=torch.empty(G.shape[1], device=device))
    expected_w = plain.weights(flatmtl_fast.gram(G, dtype=torch.float64), losses)

    agg, out = AGGREGATORS[name](), torch.empty(G.shape[1], device=device)
    # Warm-up: NCCL's communicator, kernel caches; with the check, which also proves the group agrees.
    aggregate(G, agg, losses=losses, group=process_group, layout=layout, out=out)
    # NCCL collectives stay inside the check: they only enqueue on NCCL's stream and make the current stream
    # wait on an event (which is why they can be captured in CUDA graphs); gloo's run on the host, on host memory.
    with forbid_host_sync(device):
        result = aggregate(G, agg, losses=losses, group=process_group, layout=layout, out=out, check=False)
    assert result.direction.data_ptr() == out.data_ptr()  # written into the caller's buffer
    assert torch.equal(result.weights, expected_w)
    assert torch.equal(out, expected_d)
    assert result.traffic.reduce_scatter == result.traffic.all_gather == 0  # one rank: nothing of size N moves


@pytest.mark.parametrize("step", ["backward", "F-MTL"])
def test_fsdp2_shards_equal_the_plain_path(group, step: str) -> None:
    """FSDP2's ``fully_shard`` over the group of one rank (sharded layout), ``backward`` or F-MTL: the plain step's
    ``.grad`` (shared and heads) bit for bit — on a GPU, FSDP2 over NCCL."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    process_group, device = group
    x, y = (t.to(device) for t in batch())
    grads = []
    for sharded in (False, True):
        net = Net().to(device)  # seeded: the same parameters both times
        options = {}
        if sharded:
            mesh = DeviceMesh.from_group(process_group, device.type)
            fully_shard(net.trunk, mesh=mesh)
            fully_shard(net, mesh=mesh)
            options = {"process_group": process_group, "layout": "sharded"}
        shared = flatmtl_fast.FlatParameters(net.trunk)
        if step == "backward":
            flatmtl_fast.backward(
                net(x, y), shared, flatmtl_fast.UPGrad(), task_params=net.heads.parameters(), **options
            )
        else:
            fmtl = flatmtl_fast.FMTL(shared, flatmtl_fast.UPGrad(), rho=0.5, task_params=list(net.heads), **options)
            fmtl.step(lambda net=net: net(x, y))
        grads.append([(p.grad.full_tensor() if sharded else p.grad).clone() for p in net.parameters()])
    plain, fsdp = grads
    for got, want in zip(fsdp, plain, strict=True):
        assert torch.equal(got, want)
