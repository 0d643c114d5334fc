"""HSDP (FSDP2 on a 2 × 2 mesh: two replicas of two shards) over four gloo ranks: ``backward`` and ``FMTL`` with
the shard dimension's group equal one process on the whole batch; any other group raises before communicating."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed import _worker
from distributed._cases import Net, batch, make, relative_error
from distributed._launch import launch, scenario

import flatmtl_fast

#: Bound on the launch: four ranks on two cores take ~30 s; a hang is killed here.
LAUNCH_TIMEOUT = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(_worker.HSDP_WORLD, tmp_path_factory.mktemp("hsdp"), LAUNCH_TIMEOUT, suite="hsdp")


@pytest.mark.parametrize("case", list(_worker.HSDP_CASES))
def test_hsdp_step_equals_one_process(ranks, case):
    """Two steps of SGD with momentum; Nash-MTL's weights depend on the Gram's scale (a Gram summed over the
    replicas too would be twice too large), F-MTL's perturbation on its norms."""
    results = scenario(ranks, "hsdp")
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    aggregator = make(case.split("+")[0])
    fmtl = flatmtl_fast.FMTL(
        shared, aggregator, rho=0.5, adaptive=True, normalize="joint", task_params=list(net.heads)
    ) if _worker.HSDP_CASES[case] else None  # fmt: skip
    x, y = batch()
    for step in range(len(results[0][case]["steps"])):
        if fmtl is not None:
            fmtl.step(lambda: net(x, y))
        else:
            flatmtl_fast.backward(net(x, y), shared, aggregator, task_params=net.heads.parameters())
        want = [p.grad for p in net.parameters()]
        for rank, result in enumerate(results):
            # As for FSDP2 in test_distributed: float32 sums grouped otherwise, solver tolerances.
            assert relative_error(result[case]["steps"][step], want) <= 1e-4, f"rank {rank}, step {step}"
        optimizer.step()
        optimizer.zero_grad()
    for result in results:
        assert relative_error(result[case]["params"], list(net.parameters())) <= 1e-4


def test_hsdp_with_another_group_raises(ranks):
    for rank, outcomes in enumerate(scenario(ranks, "hsdp_misuse")):
        shard_ranks = [2 * (rank // 2), 2 * (rank // 2) + 1]  # the mesh [[0, 1], [2, 3]]: rows are shard groups
        for what, outcome in outcomes.items():
            assert outcome is not None, f"rank {rank}: {what} did not raise"
            kind, message = outcome
            assert kind == "ValueError" and f"is sharded over ranks {shard_ranks}" in message, (rank, what, message)
