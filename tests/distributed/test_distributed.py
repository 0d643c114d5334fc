"""flatmtl_fast.distributed over gloo: the distributed step equals the single-process step, moves the designed
bytes, and fails with clear errors (never a hang).

One launch of three ranks (``_worker.main``) runs every scenario — world sizes 3, 2 and 1 on subgroups of one
gloo group — and saves its results; each test recomputes the single-process answer here and compares.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import _worker
from distributed._cases import (
    AVERAGED,
    EXACT,
    HIDDEN,
    N_VALUES,
    STEPS,
    K,
    Net,
    WideNet,
    batch,
    column_slices,
    make,
    mean_inputs,
    relative_error,
    task_losses,
)
from distributed._launch import launch, scenario

import flatmtl_fast
from flatmtl_fast.aggregators import Aggregator, GramianAggregator
from flatmtl_fast.distributed import LAYOUTS, Traffic, aggregate

WORLD = 3
#: Bound on the whole launch: the scenarios take ~40 s on two busy cores; a hang is killed here.
LAUNCH_TIMEOUT = 240
CHECK_FIELDS = 9  # integers per rank in the consistency all-gather


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Launch the three ranks once; return each rank's saved results."""
    return launch(WORLD, tmp_path_factory.mktemp("ranks"), LAUNCH_TIMEOUT)


def _single_process(name: str, G: torch.Tensor, losses: torch.Tensor, aggregator: Aggregator):
    """(weights or None, direction) of one single-process step on the averaged gradients."""
    if isinstance(aggregator, GramianAggregator):
        w = aggregator.weights(flatmtl_fast.gram(G, dtype=torch.float64), losses)
        return w, flatmtl_fast.combine(w, G)
    return None, aggregator(G, losses)


@pytest.mark.parametrize(("N", "layout"), _worker.AGGREGATE_CASES)  # N = 2 sharded over 3: rank 2 has no columns
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("name", EXACT)
def test_aggregate_equals_single_process(ranks, name, P, N, layout):
    results = scenario(ranks, "aggregate", P)
    reference = make(name)
    for step in range(STEPS):
        G, losses = mean_inputs(P, N, step)
        expected_w, expected_d = _single_process(name, G, losses, reference)
        got = [result[P, N, name, layout, step] for result in results]
        for rank, entry in enumerate(got):
            expected = expected_d if layout == "replicated" else expected_d[column_slices(N, P)[rank]]
            # G, the losses and every Gram entry are bit-identical to the single process's (rank_inputs makes
            # every sum exact), and the same float64 solver runs on them: weights to float64 noise. Each entry
            # of d is a K-term float32 sum of identical products; only the kernels' operation order may
            # differ (DB-MTL: α from norms summed in another order): a few float32 ulp, ≪ 1e-6 · max |d|.
            if expected_w is not None:
                torch.testing.assert_close(entry["weights"], expected_w, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(entry["direction"], expected, rtol=0, atol=1e-6 * float(expected_d.abs().max()))
        # Identical on every rank, bit for bit: the weights are rank 0's, the direction is all-gathered.
        for entry in got[1:]:
            if expected_w is not None:
                assert torch.equal(entry["weights"], got[0]["weights"])
            if layout == "replicated":
                assert torch.equal(entry["direction"], got[0]["direction"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", N_VALUES)
@pytest.mark.parametrize("P", [1, 2, 3])
def test_graddrop_is_applied_shard_by_shard(ranks, P, N, layout):
    """GradDrop on each rank's columns with the common generator state: per shard, GradDrop of the averaged
    gradients (the uniforms restart at each shard's first column); with one rank, the single-process result."""
    results = scenario(ranks, "aggregate", P)
    S = -(-N // P)
    shards = [slice(r * S, min((r + 1) * S, N)) for r in range(P)] if layout == "replicated" else column_slices(N, P)
    references = [make("GradDrop") for _ in shards]  # one per shard: every rank's generator advances once a step
    for step in range(STEPS):
        G, _ = mean_inputs(P, N, step)
        expected = torch.cat([reference(G[:, columns]) for reference, columns in zip(references, shards, strict=True)])
        for rank, result in enumerate(results):
            got = result[P, N, "GradDrop", layout, step]["direction"]
            # Exact inputs, per-column float32 sums of the kept entries: a few ulp at most.
            want = expected if layout == "replicated" else expected[shards[rank]]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(expected.abs().max()))


def _design_bytes(P: int, N: int, name: str, layout: str, weight_itemsize: int) -> dict[str, int]:
    """The bytes the design moves per step (G float32, so 4 bytes an entry; Gram, losses and norms float64)."""
    gramian = name != "DBMTL" and name != "GradDrop"
    gathers_G = layout == "replicated" and P > 1
    padded_N = -(-N // P) * P
    return {
        "reduce_scatter": K * padded_N * 4 if gathers_G else 0,  # K × N (padded to a multiple of P)
        "all_gather": padded_N * 4 if gathers_G else 0,  # N
        # the K losses; the K × K Gram (Gramian); DB-MTL's K squared norms (when its buffer is split)
        "all_reduce": 8 * K + (8 * K * K if gramian else 0) + (8 * K if name == "DBMTL" and P > 1 else 0),
        "broadcast": K * weight_itemsize if gramian else 0,  # rank 0's weights
        "check": P * CHECK_FIELDS * 8,
    }


def _counted_bytes(calls: list[tuple[str, list[int]]]) -> dict[str, int]:
    """Bytes per kind from the harness's log of torch.distributed calls (its own count, not our Traffic):
    a reduce-scatter counts its input (the 2nd tensor), an all-gather its output (the 1st), others their tensor."""
    counted = dict.fromkeys(["reduce_scatter", "all_gather", "all_reduce", "broadcast"], 0)
    for function, sizes in calls:
        kind = next(kind for kind in counted if function.startswith(kind))
        counted[kind] += sizes[1] if kind == "reduce_scatter" else sizes[0]
    return counted


def _as_counted(design: dict[str, int]) -> dict[str, int]:
    """The designed bytes as :func:`_counted_bytes` sees them: the consistency check is an all-gather too."""
    kinds = ("reduce_scatter", "all_gather", "all_reduce", "broadcast")
    return {kind: design[kind] + (design["check"] if kind == "all_gather" else 0) for kind in kinds}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", N_VALUES)
@pytest.mark.parametrize("P", [1, 2, 3])
def test_bytes_communicated_are_the_designed_ones(ranks, P, N, layout):
    results = scenario(ranks, "aggregate", P)
    for name in (*EXACT, "GradDrop"):
        for result in results:
            entry = result[P, N, name, layout, 0]
            weights = entry["weights"]
            design = _design_bytes(P, N, name, layout, 0 if weights is None else weights.element_size())
            assert entry["traffic"] == design, name
            assert _counted_bytes(entry["calls"]) == _as_counted(design), name
            reduce_scatters = sum(function.startswith("reduce_scatter") for function, _ in entry["calls"])
            assert reduce_scatters == (K if design["reduce_scatter"] else 0)  # one per row of G, no copy of G
            if layout == "replicated" and P > 1:
                # vs the naive all-reduce of the K × N gradients: 2 (P−1)/P · K N · 4 bytes sent per rank
                naive = 2 * (P - 1) / P * K * N * 4
                assert Traffic(**entry["traffic"]).wire_bytes(P) < 0.75 * naive  # (K + 1)/(2K) = 2/3, + O(K²)


@pytest.mark.parametrize("N", N_VALUES)
@pytest.mark.parametrize("P", [1, 2, 3])
def test_averaged_rows_are_sliced_not_reduce_scattered(ranks, P, N):
    """Rows that every rank already holds averaged give the same step with fewer bytes: only the others are
    reduce-scattered (N = 1001: the sliced shard of the last rank is zero-padded like the scattered rows)."""
    results = scenario(ranks, "averaged_rows", P)
    G, losses = mean_inputs(P, N, 0)
    _, expected = _single_process("UPGrad", G, losses, make("UPGrad"))
    scattered = K - AVERAGED if P > 1 else 0
    design = _design_bytes(P, N, "UPGrad", "replicated", 8)
    for result in results:
        entry = result[P, N]
        # Bit-identical G and Gram as in test_aggregate_equals_single_process: a few float32 ulp in d.
        torch.testing.assert_close(entry["direction"], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
        assert entry["traffic"] == {**design, "reduce_scatter": scattered * -(-N // P) * P * 4}
        assert sum(function.startswith("reduce_scatter") for function, _ in entry["calls"]) == scattered


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "DBMTL", "UPGrad+micro-batches"])
@pytest.mark.parametrize("P", [1, 2, 3])
def test_backward_under_ddp_equals_single_process_on_the_concatenated_batch(ranks, P, name):
    """Also with each rank's slice accumulated in two micro-batches (aggregate=False) before the one step."""
    results = scenario(ranks, "backward_ddp", P)
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    x, y = batch()
    aggregator = make(name.removesuffix("+micro-batches"))
    w = flatmtl_fast.backward(net(x, y), shared, aggregator, task_params=net.heads.parameters())
    expected_heads = [p.grad for p in net.heads.parameters()]
    for result in results:
        entry = result[P, name]
        # Per-rank float32 gradients summed over other batch groupings than the single process's: G agrees
        # to float32 rounding (~1e-7 relative); the Gram and the solve inherit it, and the solvers stop at
        # tolerances around 1e-5 in w, so d agrees to ~1e-5 of its norm: 1e-4 leaves a margin of 10.
        tolerance = 1e-4 * float(shared.grad.norm())
        assert float((entry["shared"] - shared.grad).norm()) <= tolerance
        for got, want in zip(entry["heads"], expected_heads, strict=True):  # plain averaged gradients
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if w is not None:
            torch.testing.assert_close(entry["weights"].double(), w.double(), rtol=1e-4, atol=1e-6)
        assert entry["ddp_allreduces"] == 0  # no_sync: DDP's own all-reduce did not run ...
        assert entry["ddp_allreduces_outside_no_sync"] > 0  # ... which the hook would have seen
        assert torch.equal(entry["shared"], results[0][P, name]["shared"])  # the same .grad on every rank


@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize(("name", "variant"), [("UPGrad", "flat"), ("MGDA", "flat"), ("UPGrad", "a")])
def test_fmtl_step_equals_single_process(ranks, P, name, variant):
    """F-MTL over P ranks (each its slice of the batch) equals one process's F-MTL step on the whole batch."""
    results = scenario(ranks, "fmtl", P)
    net = Net()
    initial = [p.detach().clone() for p in net.parameters()]
    shared = flatmtl_fast.FlatParameters(net.trunk)
    x, y = batch()
    fmtl = flatmtl_fast.FMTL(shared, make(name), rho=0.5, variant=variant, task_params=list(net.heads))
    fmtl.step(lambda: net(x, y))
    for result in results:
        entry = result[P, name, variant]
        # As under DDP above: float32 gradients summed in another grouping (~1e-7 relative) perturb the
        # weights by ~1 ulp, and the solvers' tolerances (~1e-5 in w) dominate: 1e-4 of ‖d‖.
        assert float((entry["shared"] - shared.grad).norm()) <= 1e-4 * float(shared.grad.norm())
        for got, p in zip(entry["heads"], net.heads.parameters(), strict=True):  # SAM head gradients, averaged
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
        for got, want in zip(entry["weights"], initial, strict=True):  # restored exactly on every rank
            assert torch.equal(got, want)
        assert torch.equal(entry["shared"], results[0][P, name, variant]["shared"])


def _fmtl_design_bytes(P: int, N: int, head_numel: int, layout: str) -> dict[str, int]:
    """The bytes of one F-MTL step (float32 gradients; losses, norms, Gram and weights float64). Replicated: the
    clean g rows and the heads' clean gradients are all-reduced once, then only the K rows h are reduce-scattered
    (the g rows' shard is a slice) and d is all-gathered. Sharded: nothing of size N."""
    spread = layout == "replicated" and P > 1
    padded_N = -(-N // P) * P
    # The losses, the step's row losses, the squared norms (sharded: the shared slices' and the heads' shards').
    per_task = 8 * K + 8 * 2 * K + (16 * K if layout == "sharded" else 0)
    return {
        "reduce_scatter": K * padded_N * 4 if spread else 0,
        "all_gather": padded_N * 4 if spread else 0,
        "all_reduce": per_task + 8 * (2 * K) ** 2 + ((K * N + 2 * head_numel) * 4 if spread else 0),
        "broadcast": 2 * K * 8,  # the weights [a; b]
        "check": P * CHECK_FIELDS * 8,
    }


def _assert_fmtl_bytes(entry: dict[str, Any], design: dict[str, int]) -> None:
    """FMTL.traffic and the harness's own count of the torch.distributed calls both equal the design."""
    assert entry["traffic"] == design
    assert _counted_bytes(entry["calls"]) == _as_counted(design)
    reduce_scatters = sum(function.startswith("reduce_scatter") for function, _ in entry["calls"])
    assert reduce_scatters == (K if design["reduce_scatter"] else 0)  # the h rows, never the g rows


@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize(("name", "variant"), [("UPGrad", "flat"), ("MGDA", "flat"), ("UPGrad", "a")])
def test_fmtl_bytes_are_the_designed_ones(ranks, P, name, variant):
    results = scenario(ranks, "fmtl", P)
    net = Net()
    N = sum(p.numel() for p in net.trunk.parameters())
    design = _fmtl_design_bytes(P, N, sum(p.numel() for p in net.heads.parameters()), "replicated")
    for result in results:
        _assert_fmtl_bytes(result[P, name, variant], design)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_fmtl_sharded_layout_tensor_parallel(ranks, P):
    """F-MTL with each rank owning rows of the wide layer equals one process's F-MTL step; nothing of size N moves."""
    results = scenario(ranks, "fmtl_tensor_parallel", P)
    net = WideNet()
    shared = flatmtl_fast.FlatParameters(net.layer)
    x, y = batch()
    fmtl = flatmtl_fast.FMTL(shared, make("UPGrad"), rho=0.5, task_params=list(net.heads))
    fmtl.step(lambda: task_losses(net.heads, torch.tanh(net.layer(x)), y))
    for rank, result in enumerate(results):
        entry = result[P]
        rows = torch.arange(HIDDEN).chunk(P)[rank]
        # As for the replicated F-MTL step: float32 sums in other groupings, solver tolerances: 1e-4 of ‖d‖.
        got = torch.cat([entry["weight"].flatten(), entry["bias"]])
        want = torch.cat([net.layer.weight.grad[rows].flatten(), net.layer.bias.grad[rows]])
        assert float((got - want).norm()) <= 1e-4 * float(shared.grad.norm())
        for got_head, p in zip(entry["heads"], net.heads.parameters(), strict=True):
            torch.testing.assert_close(got_head, p.grad, rtol=1e-4, atol=1e-6)
        _assert_fmtl_bytes(entry, _fmtl_design_bytes(P, 0, 0, "sharded"))


@pytest.mark.parametrize("P", [1, 2, 3])
def test_backward_sharded_layout_tensor_parallel(ranks, P):
    """Each rank owns rows of the wide layer (its slice of the shared parameters), autograd gives it the full
    gradient of that slice; only the K × K Gram and the losses are all-reduced."""
    results = scenario(ranks, "backward_tensor_parallel", P)
    net = WideNet()
    shared = flatmtl_fast.FlatParameters(net.layer)
    x, y = batch()
    losses = task_losses(net.heads, torch.tanh(net.layer(x)), y)
    w = flatmtl_fast.backward(losses, shared, make("UPGrad"), task_params=net.heads.parameters())
    for rank, result in enumerate(results):
        entry = result[P]
        rows = torch.arange(HIDDEN).chunk(P)[rank]
        # Same tolerance argument as under DDP (float32 gradients of other groupings, solver tolerance).
        tolerance = 1e-4 * float(shared.grad.norm())
        got = torch.cat([entry["weight"].flatten(), entry["bias"]])
        want = torch.cat([net.layer.weight.grad[rows].flatten(), net.layer.bias.grad[rows]])
        assert float((got - want).norm()) <= tolerance
        for got_head, p in zip(entry["heads"], net.heads.parameters(), strict=True):
            torch.testing.assert_close(got_head, p.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entry["weights"].double(), w.double(), rtol=1e-4, atol=1e-6)
        # G is never gathered, the heads' gradients are left alone: the check, the losses, the Gram, the weights.
        assert _counted_bytes(entry["calls"]) == {
            "reduce_scatter": 0,
            "all_gather": P * CHECK_FIELDS * 8,
            "all_reduce": 8 * K + 8 * K * K,
            "broadcast": K * entry["weights"].element_size(),
        }


@pytest.mark.parametrize("case", list(_worker.FSDP2_CASES))
@pytest.mark.parametrize("P", [1, 2, 3])
def test_backward_on_fsdp2_shards_equals_one_process(ranks, P, case):
    """A model sharded by ``fully_shard`` (trunk and root; heads split over the ranks, and heads leaving empty
    shards), each rank on its slice of the batch, two steps of SGD with momentum on the DTensor parameters:
    the single-process steps on the whole batch."""
    results = scenario(ranks, "backward_fsdp2", P)
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    aggregator = make(case.split("+")[0])
    x, y = batch()
    # float32: FSDP's mean of per-rank mean gradients and the whole batch's gradient group their sums differently
    # (a few ulps) — the same argument as under DDP. bfloat16 storage rounds those two to 16 bits, which can
    # differ by one bfloat16 ulp (2⁻⁸ relative) where the float32 values straddle a rounding boundary.
    relative = 1e-2 if "bfloat16" in case else 1e-4
    for step in range(len(results[0][P, case]["steps"])):
        w = flatmtl_fast.backward(
            net(x, y), shared, aggregator, task_params=net.heads.parameters(), **_worker.FSDP2_CASES[case]
        )
        want = [p.grad for p in net.parameters()]
        for rank, result in enumerate(results):
            got = result[P, case]["steps"][step]
            assert relative_error(got["grads"], want) <= relative, f"rank {rank}, step {step}"
            if w is not None:
                torch.testing.assert_close(got["weights"].double(), w.double(), rtol=10 * relative, atol=1e-6)
                # Only the K × K Gram and the losses are all-reduced, and rank 0's weights broadcast; G is never
                # gathered (the all-gathers and reduce-scatters are FSDP's own, of parameters and gradients).
                ours = [(name, sizes) for name, sizes in got["calls"] if name in ("all_reduce", "broadcast")]
                assert _counted_bytes(ours) == {
                    "reduce_scatter": 0,
                    "all_gather": 0,
                    "all_reduce": 8 * K + 8 * K * K,
                    "broadcast": K * got["weights"].element_size(),
                }
        optimizer.step()
        optimizer.zero_grad()
    for result in results:
        assert relative_error(result[P, case]["params"], list(net.parameters())) <= relative


@pytest.mark.parametrize("case", list(_worker.FMTL_FSDP2_CASES))
@pytest.mark.parametrize("P", [1, 2, 3])
def test_fmtl_on_fsdp2_shards_equals_one_process(ranks, P, case):
    """F-MTL on a model sharded by ``fully_shard`` (each rank perturbing its own shards of the trunk and of the
    heads, some split over the ranks, some leaving empty shards), each rank on its slice of the batch, two steps
    of SGD with momentum: the single-process F-MTL steps on the whole batch; the weights are restored bit for bit
    and only the losses, the squared norms, the Gram and the weights are communicated besides FSDP's own
    gathers."""
    results = scenario(ranks, "fmtl_fsdp2", P)
    net = Net()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    options = _worker.FMTL_FSDP2_CASES[case]
    fmtl = flatmtl_fast.FMTL(shared, make(case.split("+")[0]), rho=0.5, task_params=list(net.heads), **options)
    x, y = batch()
    design = _fmtl_design_bytes(P, 0, 0, "sharded")
    for step in range(len(results[0][P, case]["steps"])):
        fmtl.step(lambda: net(x, y))
        want = [p.grad for p in net.parameters()]
        for rank, result in enumerate(results):
            got = result[P, case]["steps"][step]
            # As for backward on FSDP2 shards: float32 sums grouped otherwise, solver tolerances.
            assert relative_error(got["grads"], want) <= 1e-4, f"rank {rank}, step {step}"
            assert got["restored"], f"rank {rank}, step {step}: the weights were not restored exactly"
            assert got["traffic"] == design
            ours = [(name, sizes) for name, sizes in got["calls"] if name in ("all_reduce", "broadcast")]
            assert _counted_bytes(ours) == {**_as_counted(design), "reduce_scatter": 0, "all_gather": 0}
        optimizer.step()
        optimizer.zero_grad()
    for result in results:
        assert relative_error(result[P, case]["params"], list(net.parameters())) <= 1e-4


@pytest.mark.parametrize("P", [1, 2, 3])
def test_fsdp2_mixed_precision_equals_one_process(ranks, P):
    """FSDP2's mixed precision (bfloat16 parameters and inputs in the passes, float32 averaging), each rank on its
    slice of the batch, one UPGrad step; float32 gradients come out.

    ``backward``: one process replays each rank's bfloat16 passes (the same bfloat16 operations on the same slice,
    hence the same bfloat16 task gradients), averages them in float32 and aggregates with the reference UPGrad:
    float32 sums grouped otherwise (a few ulps) and the solvers' agreement (1e-9), 1e-6 (measured 1.5e-8).
    F-MTL: one process on the whole batch in bfloat16, which perturbs bfloat16 weights (FSDP: the float32 shards)
    and whose passes round otherwise (a mean over 12 samples, not over 6 or 4): a few bfloat16 ulps (2⁻⁸ relative
    each) through the perturbation and the second passes, 2e-2 (measured 3–5e-3)."""
    results = scenario(ranks, "fsdp2_bfloat16", P)
    x, y = batch()
    model = Net().to(torch.bfloat16)
    trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    rows, head_grads = [], []
    for xs, ys in zip(x.chunk(P), y.chunk(P), strict=True):
        losses = model(xs.bfloat16(), ys.bfloat16())
        rows.append(
            torch.stack(
                [
                    torch.cat([g.flatten() for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
                    for loss in losses
                ]
            )
        )
        head_grads.append(torch.autograd.grad(losses.sum(), heads))
    d = flatmtl_fast.reference.UPGrad()(torch.stack(rows).float().mean(0))
    averaged_heads = [torch.stack(grads).float().mean(0) for grads in zip(*head_grads, strict=True)]
    want = [
        *(part.view(p.shape) for part, p in zip(d.split([p.numel() for p in trunk]), trunk, strict=True)),
        *averaged_heads,
    ]

    fmtl = flatmtl_fast.FMTL(
        flatmtl_fast.FlatParameters(model.trunk), make("UPGrad"), rho=0.5, task_params=list(model.heads)
    )
    fmtl.step(lambda: model(x.bfloat16(), y.bfloat16()))
    want_fmtl = [p.grad.float() for p in model.parameters()]
    for rank, result in enumerate(results):
        for case in _worker.FSDP2_BFLOAT16_CASES:
            got = result[P, case]
            assert all(g.dtype == torch.float32 for g in got), f"rank {rank}, {case}: {[g.dtype for g in got]}"
            exact, relative = (want, 1e-6) if case == "backward" else (want_fmtl, 2e-2)
            assert relative_error(got, exact) <= relative, f"rank {rank}, {case}: {relative_error(got, exact)}"


def test_misused_fsdp2_shards_raise_clearly(ranks):
    expected = {
        "mixed": "some parameters are DTensors (FSDP2 shards) and some are not",
        "partial placement": "only Shard placements",
        "another group": "is sharded over ranks [0, 1], but process_group holds ranks [0, 1, 2]",
        "no process group": "pass process_group=",
        "replicated layout": "layout='sharded'",
        "batched": "use the K passes (batched=False)",
        "fmtl without a group": "FMTL: shared holds FSDP2's sharded parameters: pass process_group=",
        "fmtl replicated layout": "layout='sharded'",
        "fmtl without heads": "pass task_params",
        "fmtl sharded heads": "FMTL: task_params holds FSDP2's sharded parameters",
        # After a forward pass under no_grad, FSDP2 leaves gathered copies registered in place of the root's shards.
        "flat after evaluation": "FlatParameters: params[0] is FSDP2's gathered copy of a sharded parameter",
        "fmtl heads after evaluation": "FMTL: task_params[0][0] is FSDP2's gathered copy of a sharded parameter",
    }
    for rank, outcome in enumerate(scenario(ranks, "fsdp2_misuse", 2)):
        assert set(outcome) == set(expected)
        for what, phrase in expected.items():
            assert outcome[what] is not None, f"rank {rank}: {what} did not raise"
            kind, message = outcome[what]
            assert kind == "ValueError" and phrase in message, f"rank {rank}, {what}: {kind}: {message}"


def test_fmtl_built_after_an_evaluation_and_reshard_equals_one_built_before(ranks):
    assert all(scenario(ranks, "fmtl_after_reshard", 2))


@pytest.mark.parametrize("P", [1, 2, 3])
def test_float16_sums_that_overflow_still_average(ranks, P):
    """Each rank's float16 rows are about 40000: their sum over 2 or 3 ranks overflows float16, their mean does not.
    Dividing first (as DDP does) rounds each value once more: with the sums, ≤ (P + 2) float16 roundings of about
    2⁻¹¹ relative each, so 3e-3 of the mean."""
    results = scenario(ranks, "float16", P)
    for N in N_VALUES:
        mean = sum(_worker.float16_inputs(P, r, N).float() for r in range(P)) / P
        for name in ("Mean", "UPGrad"):
            expected = make(name)(mean.half()).float()
            for result in results:
                torch.testing.assert_close(result[P, N, name].float(), expected, rtol=3e-3, atol=0)
    expected_head = torch.full((3,), _worker.FLOAT16_OFFSET + (P - 1) / 2)
    for result in results:
        torch.testing.assert_close(result[P, "head"].float(), expected_head, rtol=1e-3, atol=0)


@pytest.mark.parametrize("case", ["backward", "F-MTL"])
def test_fsdp2_ranks_without_a_shard_of_the_trunk_take_part(ranks, case):
    """TinyNet's trunk (two rows per tensor) over 3 ranks leaves rank 2 nothing: it joins the collectives with an
    empty shard, and the gradients equal one process's (float32 sums in other orders, and the solve: ≤ 1e-5)."""
    alone = scenario(ranks, "fsdp2_empty_shard", 1)[0][1, case][0]
    for P in (2, 3):
        for rank, result in enumerate(scenario(ranks, "fsdp2_empty_shard", P)):
            grads, numel = result[P, case]
            assert relative_error(grads, alone) < 1e-5, (P, rank)
            if P == 3 and rank == 2:
                assert numel == 0  # the case this test is about


@pytest.mark.parametrize("P", [1, 2, 3])
def test_a_skipped_fmtl_step_counts_the_bytes_it_moved(ranks, P):
    for outcome in scenario(ranks, "fmtl_skipped_traffic", P):
        result, traffic, log = outcome[P]
        assert result is None  # skipped: a NaN perturbed loss
        counted = _counted_bytes(log)
        assert counted == {kind: traffic[kind] + (traffic["check"] if kind == "all_gather" else 0) for kind in counted}
        assert traffic["reduce_scatter"] == (K * -(-10 // P) * P * 4 if P > 1 else 0)  # the h rows went out


def test_nonfinite_gradient_on_one_rank_raises_on_every_rank(ranks):
    for kind, message, grads_cleared in scenario(ranks, "nonfinite"):
        assert kind == "FloatingPointError" and "non-finite" in message
        assert grads_cleared  # no rank wrote a .grad


@pytest.mark.parametrize("path", ["aggregate", "FMTL"])
@pytest.mark.parametrize("field", ["K", "N", "aggregator", "hyperparameters"])
def test_ranks_that_disagree_all_raise_without_waiting(ranks, field, path):
    """F-MTL all-reduces its clean gradients before it aggregates: it checks before that."""
    for outcome in scenario(ranks, "mismatch"):
        assert outcome[path, field] is not None, f"a rank with a mismatched {field} did not raise in {path}"
        kind, message, seconds = outcome[path, field]
        assert kind == "DistributedStepError"
        shown = "aggregator" if field == "hyperparameters" else field  # CAGrad(c=0.4) vs CAGrad(c=0.5)
        assert "disagree" in message and f"{shown}=" in message
        assert seconds < 0.5 * _worker.GROUP_TIMEOUT.total_seconds()  # the check caught it, not a timeout


def test_ranks_holding_another_ranks_dbmtl_state_all_raise_and_their_own_states_continue(ranks):
    """DB-MTL's buffer is sharded like G: rank 0's state loaded on every rank (its checkpoint alone) would mix other
    columns' EMAs into each rank's, silently; every rank raises in the consistency check instead."""
    outcomes = scenario(ranks, "dbmtl_state")
    single = make("DBMTL")
    for step in range(2):
        G, losses = mean_inputs(WORLD, N_VALUES[1], step)
        expected = single(G, losses)
    for rank, outcome in enumerate(outcomes):
        assert outcome["rank in state"] == rank
        assert outcome["rank 0's state"] is not None, f"rank {rank} took a step with rank 0's DB-MTL state"
        message, seconds = outcome["rank 0's state"]
        assert "DB-MTL state's rank − rank=" in message and "own state_dict" in message
        assert seconds < 0.5 * _worker.GROUP_TIMEOUT.total_seconds()  # the check caught it, not a timeout
        # Its own state loaded back: the second step of one process on the averaged gradients (tolerance as in
        # test_aggregate_equals_single_process).
        torch.testing.assert_close(outcome["own state"], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_a_rank_raising_mid_step_gives_the_others_an_error_not_a_hang(ranks):
    waiting, raising = scenario(ranks, "raises_mid_step", 2)
    assert raising[0] == "RuntimeError" and "rank 1 fails" in raising[1]
    kind, message, seconds = waiting
    assert kind == "DistributedStepError"
    assert "broadcast of rank 0's weights" in message and "timeout" in message
    timeout = _worker.SHORT_TIMEOUT.total_seconds()
    assert 0.5 * timeout <= seconds < 5 * timeout  # released by the group's timeout


# ---- argument checks: in this process -------------------------------------------------------------------


class _Elementwise(Aggregator):
    def __call__(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return G.sum(0)


def test_bad_arguments_raise_before_any_communication():
    G = torch.ones(K, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        aggregate(G, make("UPGrad"))
    with pytest.raises(ValueError, match="layout must be"):
        aggregate(G, make("UPGrad"), layout="diagonal")
    with pytest.raises(TypeError, match="neither Gramian nor"):
        aggregate(G, _Elementwise())
    with pytest.raises(TypeError, match="aggregator must be"):
        aggregate(G, "UPGrad")
    with pytest.raises(ValueError, match="needs the task losses"):
        aggregate(G, make("DBMTL"))
    with pytest.raises(TypeError, match="G must have dtype"):
        aggregate(G.int(), make("UPGrad"))
    with pytest.raises(ValueError, match="averaged_rows must be"):
        aggregate(G, make("UPGrad"), averaged_rows=K + 1)
    with pytest.raises(ValueError, match="world_size"):
        Traffic().wire_bytes(0)
    net = Net()
    x, y = batch()
    shared = flatmtl_fast.FlatParameters(net.trunk)
    with pytest.raises(ValueError, match="layout must be"):
        flatmtl_fast.backward(net(x, y), shared, make("UPGrad"), layout="columns")
    with pytest.raises(TypeError, match="backward: process_group must be a torch"):
        flatmtl_fast.backward(net(x, y), shared, make("UPGrad"), process_group=object())
    with pytest.raises(TypeError, match="FMTL: process_group must be a torch"):
        flatmtl_fast.FMTL(shared, make("UPGrad"), process_group="WORLD")
    unused_group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # never communicates: the check comes first
    with pytest.raises(ValueError, match="representation"):
        flatmtl_fast.backward(net(x, y), shared, make("UPGrad"), representation=x, process_group=unused_group)


def test_bad_out_buffer_on_a_group_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        G = torch.ones(K, 8)
        with pytest.raises(ValueError, match=r"out must have shape \(8,\)"):
            aggregate(G, make("UPGrad"), out=torch.empty(7))
        result = aggregate(G, make("UPGrad"), out=torch.empty(8))
        assert result.traffic.reduce_scatter == result.traffic.all_gather == 0  # one rank: no O(N) collectives
    finally:
        dist.destroy_process_group()
