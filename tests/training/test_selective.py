"""SelectiveGroupUpdate: the affinity sequence against hand-computed values for both credit modes, the
regrouping, training on a synthetic 3-task problem, the state round trip, no host sync, bad inputs.

Hand-computed sequences use decay β = 0.1, K = 3 and float64 losses whose ratios are exact decimals; each
expected entry is written from the update rule (A_st ← 0.9 A_st + 0.1 a) in the comment beside it. The float64
arithmetic differs from those decimals by a few ulps of quantities ≤ 0.1 (under 1e-16 each, a handful of
operations per entry), so atol = 1e-15 is safe while any wrong rule moves an entry by ≥ 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.cluster import AffinityPropagation
from support.host_sync import forbid_host_sync
from support.problems import regression_problem

import flatmtl_fast
from flatmtl_fast.solvers.affinity_propagation import affinity_propagation
from flatmtl_fast.training.selective import cluster_tasks


def L(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_affinity(sgu: flatmtl_fast.SelectiveGroupUpdate, expected: list[list[float]]) -> None:
    torch.testing.assert_close(sgu.affinity, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_paper_credit_hand_computed():
    sgu = flatmtl_fast.SelectiveGroupUpdate(3, decay=0.1, warmup=100)
    sgu.groups()
    sgu.loss(L(1.0, 2.0, 4.0), [0])  # nothing stepped yet
    assert_affinity(sgu, [[0, 0, 0]] * 3)
    # Group {0}'s step: r = 1 − new/prev = (0.2, −0.1, 0.25), |G| = 1; row 0 moves.
    sgu.loss(L(0.8, 2.2, 3.0), [1, 2])
    assert_affinity(sgu, [[0.02, -0.01, 0.025], [0, 0, 0], [0, 0, 0]])
    sgu.groups()  # the next batch's first forward measures the last step of the previous batch
    # Group {1, 2}'s step: r = (1 − (0.75, 0.5, 1.1)) / 2 = (0.125, 0.25, −0.05); rows 1 and 2 move:
    # A_10 = A_20 = 0.1 · 0.125; A_11 = 0.1 · 0.25 (r_1 ≥ 0); A_22 stays (r_2 < 0);
    # A_12, A_21: r_1 r_2 < 0 → a = −max(0.25, −0.05) = −0.25.
    sgu.loss(L(0.6, 1.1, 3.3), [0, 1])
    assert_affinity(sgu, [[0.02, -0.01, 0.025], [0.0125, 0.025, -0.025], [0.0125, -0.025, 0]])
    # Group {0, 1}'s step measured by an extra forward: r = (1 − (0.5, 0.5, 1.2)) / 2 = (0.25, 0.25, −0.1).
    # A_00 = 0.9 · 0.02 + 0.025; A_01 = 0.9 · (−0.01) + 0.025 (same sign: a = r_1); A_02 = 0.9 · 0.025 − 0.01;
    # A_10 = 0.9 · 0.0125 + 0.025; A_11 = 0.9 · 0.025 + 0.025; A_12 = 0.9 · (−0.025) − 0.01.
    sgu.measure(L(0.3, 0.55, 3.96))
    after_measure = [[0.043, 0.016, 0.0125], [0.03625, 0.0475, -0.0325], [0.0125, -0.025, 0]]
    assert_affinity(sgu, after_measure)
    sgu.groups()
    sgu.loss(L(0.0, 0.5, 2.0), [2])  # measure() consumed the pending step: nothing to credit
    assert_affinity(sgu, after_measure)
    sgu.groups()
    # Group {2}'s step, across batches: L_0^prev = 0 → column 0 is skipped (as the official L^prev ≤ 0);
    # r = (·, 1 − 1.2, 1 − 0.5) = (·, −0.2, 0.5): A_21 = 0.9 · (−0.025) − 0.02, A_22 = 0.05.
    sgu.loss(L(0.1, 0.6, 1.0), [0])
    assert_affinity(sgu, [[0.043, 0.016, 0.0125], [0.03625, 0.0475, -0.0325], [0.0125, -0.0425, 0.05]])


def test_official_credit_hand_computed():
    sgu = flatmtl_fast.SelectiveGroupUpdate(3, decay=0.1, warmup=100, credit="official")
    sgu.groups()
    sgu.loss(L(1.0, 2.0, 4.0), [0])  # the first group of a batch credits nothing
    assert_affinity(sgu, [[0, 0, 0]] * 3)
    # The change across group {0}'s step is credited to group {1, 2} (the group whose forward measured it),
    # divided by its size: r = (0.2, −0.1, 0.25) / 2 = (0.1, −0.05, 0.125). A_10 = A_20 = 0.01; A_11 stays
    # (r_1 < 0); A_22 = 0.0125; A_12, A_21: conflict → a = −max(−0.05, 0.125) = −0.125.
    sgu.loss(L(0.8, 2.2, 3.0), [1, 2])
    expected = [[0, 0, 0], [0.01, 0, -0.0125], [0.01, -0.0125, 0.0125]]
    assert_affinity(sgu, expected)
    sgu.groups()  # forgets the previous losses: group {1, 2}'s step is never measured
    sgu.loss(L(0.4, 1.1, 3.0), [0, 1])
    assert_affinity(sgu, expected)
    # Group {0, 1}'s step, credited to {2}: r = 1 − (0.5, 0.5, 1.2) = (0.5, 0.5, −0.2).
    # A_20 = 0.9 · 0.01 + 0.05; A_21 = 0.9 · (−0.0125) + 0.05; A_22 stays (r_2 < 0).
    sgu.loss(L(0.2, 0.55, 3.6), [2])
    assert_affinity(sgu, [[0, 0, 0], [0.01, 0, -0.0125], [0.059, 0.03875, 0.0125]])
    with pytest.raises(RuntimeError, match="only for credit='paper'"):
        sgu.measure(L(1.0, 1.0, 1.0))


def test_losses_as_a_list_and_the_returned_sum():
    sgu = flatmtl_fast.SelectiveGroupUpdate(3, decay=0.1, warmup=100)
    losses = [torch.tensor(v, requires_grad=True) for v in (1.0, 2.0, 4.0)]
    total = sgu.loss(losses, [2, 0])
    assert total.item() == 5.0
    total.backward()
    assert losses[0].grad == 1 and losses[1].grad is None and losses[2].grad == 1
    sgu.loss([torch.tensor([0.8]), torch.tensor(2.2), torch.tensor(3.0)], [1])  # shape (1,) is a scalar too
    # Group {0, 2}'s step: r = (1 − (0.8, 1.1, 0.75)) / 2 = (0.1, −0.05, 0.125); rows 0 and 2 move by 0.1 · r
    # (r_0 r_2 > 0: a = r_t inside the group too). float32 losses: 0.8 and 2.2 carry a relative rounding of
    # ≤ 6e-8, so r is off by ≤ 1e-7 and the entries by ≤ 1e-8.
    expected = [[0.01, -0.005, 0.0125], [0, 0, 0], [0.01, -0.005, 0.0125]]
    torch.testing.assert_close(sgu.affinity, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-8)


def normalised(A: torch.Tensor) -> torch.Tensor:
    """X of the paper, written out entry by entry: X_ij = (A_ij / A_jj + A_ji / A_ii) / 2."""
    K = A.shape[0]
    return torch.tensor(
        [[float((A[i, j] / A[j, j] + A[j, i] / A[i, i]) / 2) for j in range(K)] for i in range(K)], dtype=torch.float64
    )


#: The affinity of 4 tasks where {0, 1} and {2, 3} help each other and hurt the other pair.
A4 = torch.tensor(
    [
        [0.04, 0.036, -0.02, -0.01],
        [0.03, 0.05, -0.015, -0.02],
        [-0.02, -0.01, 0.02, 0.017],
        [-0.005, -0.02, 0.021, 0.03],
    ],
    dtype=torch.float64,
)


def test_regroups_after_warmup_from_the_normalised_affinity():
    sgu = flatmtl_fast.SelectiveGroupUpdate(4, warmup=1, generator=torch.Generator().manual_seed(0))
    assert sorted(sgu.groups()) == [[0], [1], [2], [3]]  # warm-up: singletons
    sgu.affinity = A4.clone()
    groups = sgu.groups()
    assert sorted(groups) == sgu.grouping == [[0, 1], [2, 3]]
    # The premise: scikit-learn, called as the official code calls it on X, gives this grouping for most
    # random states (its noise decides between tied symmetric pairs; see the solver's tests).
    X = normalised(A4).numpy()
    outcomes = [
        tuple(AffinityPropagation(affinity="precomputed", random_state=seed, convergence_iter=50).fit(X).labels_)
        for seed in range(10)
    ]
    assert max(set(outcomes), key=outcomes.count) == (0, 0, 1, 1)


def test_clusters_the_column_normalised_symmetrised_affinity():
    gen = torch.Generator().manual_seed(0)
    fallback = torch.full((6,), 7)  # no clustering labels a task 7: marks the fallback
    for _ in range(8):
        A = 0.01 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
        A.diagonal().copy_(0.01 + 0.05 * torch.rand(6, generator=gen, dtype=torch.float64))
        # Same float operations in the same order as the entry-by-entry formula: the labels are identical.
        expected = affinity_propagation(normalised(A), convergence_iter=50, retries=9)
        assert (expected >= 0).all()
        assert torch.equal(cluster_tasks(A, fallback, convergence_iter=50, retries=9), expected)


def test_keeps_the_groups_when_a_diagonal_is_zero_or_nothing_clusters():
    current = torch.tensor([0, 1, 2, 2])
    assert cluster_tasks(A4, current, convergence_iter=50, retries=9).tolist() == [0, 0, 1, 1]
    assert torch.equal(cluster_tasks(A4, current, max_iter=1), current)  # no exemplar after one iteration
    assert affinity_propagation(normalised(A4), max_iter=1).tolist() == [-1] * 4  # (the premise)
    zero_diagonal = A4.clone()
    zero_diagonal[3, 3] = 0.0  # task 3 never decreased its own loss: X has ±inf / NaN in column 3
    assert torch.equal(cluster_tasks(zero_diagonal, current, convergence_iter=50, retries=9), current)


def test_group_order_is_random_reproducible_and_official_repeats_a_single_group():
    orders = []
    for _ in range(2):
        sgu = flatmtl_fast.SelectiveGroupUpdate(5, warmup=100, generator=torch.Generator().manual_seed(3))
        orders.append([sgu.groups() for _ in range(20)])
    assert orders[0] == orders[1]
    assert all(sorted(groups) == [[t] for t in range(5)] for groups in orders[0])
    assert len({tuple(map(tuple, groups)) for groups in orders[0]}) > 10  # 120 orders: repeats are rare
    assert flatmtl_fast.SelectiveGroupUpdate(1, credit="official").groups() == [[0], [0]]
    assert flatmtl_fast.SelectiveGroupUpdate(1).groups() == [[0]]


K = 3


_problem = regression_problem


def _losses(net, x, y) -> torch.Tensor:
    z = net["trunk"](x)
    return torch.stack([((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(net["heads"])])


def _run(sgu, net, x, y, optimizer, batches: int) -> list[list[list[int]]]:
    """The documented loop; returns each batch's groups."""
    seen = []
    for _ in range(batches):
        groups = sgu.groups()
        seen.append(groups)
        for group in groups:
            optimizer.zero_grad()
            sgu.loss(_losses(net, x, y), group).backward()
            optimizer.step()
    return seen


def _scheduler(credit: str) -> flatmtl_fast.SelectiveGroupUpdate:
    # A short warm-up and one AP attempt (200 iterations) keep this test to seconds on a CPU.
    return flatmtl_fast.SelectiveGroupUpdate(
        K, decay=0.02, warmup=30, credit=credit, retries=0, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("credit", ["paper", "official"])
def test_training_decreases_every_loss(credit):
    net, x, y = _problem()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    sgu = _scheduler(credit)
    first = _losses(net, x, y).detach()
    seen = _run(sgu, net, x, y, optimizer, batches=70)  # 90 warm-up steps, then ≥ 40 regrouped batches
    last = _losses(net, x, y).detach()
    assert (last < 0.5 * first).all(), (first, last)
    assert (sgu.affinity.diagonal() > 0).all()  # every task's own steps decreased its loss on average
    for groups in seen:  # each batch steps every task once (the official code repeats a single group)
        repeated = credit == "official" and len(groups) == 2 and groups[0] == groups[1]
        assert sorted(t for group in groups[: 1 if repeated else None] for t in group) == [0, 1, 2]


def test_state_dict_round_trip_continues_identically():
    net, x, y = _problem()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    sgu = flatmtl_fast.SelectiveGroupUpdate(K, decay=0.02, warmup=5, max_iter=50, retries=0)
    _run(sgu, net, x, y, optimizer, batches=8)
    saved = (sgu.state_dict(), {k: v.clone() for k, v in net.state_dict().items()})
    continued = _run(sgu, net, x, y, optimizer, batches=6)

    net2, _, _ = _problem()
    net2.load_state_dict(saved[1])
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    sgu2 = flatmtl_fast.SelectiveGroupUpdate(K, decay=0.02, warmup=5, max_iter=50, retries=0)
    sgu2.load_state_dict(saved[0])
    assert _run(sgu2, net2, x, y, optimizer2, batches=6) == continued
    assert torch.equal(sgu2.affinity, sgu.affinity)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_no_host_synchronisation_in_the_affinity_update_and_the_clustering():
    schedulers = [flatmtl_fast.SelectiveGroupUpdate(3, warmup=0, credit=c) for c in ("paper", "official")]
    for sgu in schedulers:
        sgu.groups()  # outside the patch: it reads the labels to the host (documented)
    with forbid_host_sync():
        for sgu in schedulers:
            sgu.loss(L(1.0, 2.0, 4.0), [0])
            sgu.loss(L(0.8, 2.2, 3.0), [1, 2])
            sgu.loss([torch.tensor(0.7), torch.tensor(2.0), torch.tensor(2.9)], [0, 1])
            if sgu.credit == "paper":
                sgu.measure(L(0.6, 1.9, 2.8))
            cluster_tasks(sgu.affinity, torch.arange(3), max_iter=20, retries=1)


def test_bad_inputs_raise_clearly():
    for num_tasks in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_tasks must be"):
            flatmtl_fast.SelectiveGroupUpdate(num_tasks)
    for decay in (0.0, 1.0, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match="SelectiveGroupUpdate: decay must be"):
            flatmtl_fast.SelectiveGroupUpdate(3, decay=decay)
    for generator in (3, "cpu"):
        with pytest.raises(ValueError, match=r"generator must be a CPU torch\.Generator or None, got"):
            flatmtl_fast.SelectiveGroupUpdate(3, generator=generator)
    for preference in ("x", float("inf")):
        with pytest.raises(ValueError, match="SelectiveGroupUpdate: preference must be a finite real"):
            flatmtl_fast.SelectiveGroupUpdate(3, preference=preference)
    with pytest.raises(ValueError, match=r"a preference tensor must be floating, of shape \(\) or \(3,\)"):
        flatmtl_fast.SelectiveGroupUpdate(3, preference=torch.ones(2))
    for damping in ("x", True, 1.0):
        with pytest.raises(ValueError, match="damping"):
            flatmtl_fast.SelectiveGroupUpdate(3, damping=damping)
    with pytest.raises(ValueError, match="max_iter must be an integer"):
        flatmtl_fast.SelectiveGroupUpdate(3, max_iter=True)
    with pytest.raises(ValueError, match="warmup must be"):
        flatmtl_fast.SelectiveGroupUpdate(3, warmup=-1)
    with pytest.raises(ValueError, match="credit must be one of"):
        flatmtl_fast.SelectiveGroupUpdate(3, credit="literal")
    with pytest.raises(ValueError, match="damping"):
        flatmtl_fast.SelectiveGroupUpdate(3, damping=0.3)
    sgu = flatmtl_fast.SelectiveGroupUpdate(3)
    with pytest.raises(ValueError, match=r"expected 3 losses \(a tensor of shape \(3,\)\)"):
        sgu.loss(torch.ones(2), [0])
    with pytest.raises(ValueError, match=r"expected 3 losses \(a tensor"):
        sgu.loss(torch.ones(3, 1), [0])
    with pytest.raises(ValueError, match="expected 3 losses, got 2"):
        sgu.loss([torch.tensor(1.0)] * 2, [0])
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar tensor, got \(2,\)"):
        sgu.loss([torch.tensor(1.0), torch.ones(2), torch.tensor(1.0)], [0])
    with pytest.raises(TypeError, match="floating point"):
        sgu.loss(torch.ones(3, dtype=torch.int64), [0])
    for group in ([3], [-1], [], [0, 0], ["a"], [0.5], [True], [0, True]):
        with pytest.raises(ValueError, match=r"group must be a non-empty list of distinct task indices in \[0, 3\)"):
            sgu.loss(torch.ones(3), group)
    state = sgu.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['generator'\], unexpected keys \[\]"):
        sgu.load_state_dict({k: v for k, v in state.items() if k != "generator"})
    with pytest.raises(TypeError, match="state must be a dict"):
        sgu.load_state_dict(None)
    with pytest.raises(TypeError, match=r"losses must be a \(3,\) tensor or a sequence of 3 scalar tensors"):
        sgu.loss(None, [0])
    with pytest.raises(ValueError, match="credit="):
        flatmtl_fast.SelectiveGroupUpdate(3, credit="official").load_state_dict(state)
    with pytest.raises(ValueError, match="expected an affinity of shape"):
        flatmtl_fast.SelectiveGroupUpdate(4).load_state_dict(state)
    # Bad labels or a bad generator state are refused before anything is replaced.
    before = {
        key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in sgu.state_dict().items()
    }
    bad = {
        "labels must number the groups": {**state, "labels": torch.tensor([-1, -1, -1])},
        "no group empty": {**state, "labels": torch.tensor([0, 5, 5])},
        "generator is not a state of a cpu generator": {
            **state,
            "affinity": torch.ones(3, 3),
            "generator": torch.zeros(3, dtype=torch.uint8),
        },
        "prev_losses must be None or 3 floating losses": {**state, "prev_losses": torch.ones(2)},
        r"pending must be a non-empty list of distinct task indices in \[0, 3\), got \[4\]": {**state, "pending": [4]},
        "batches must be an int ≥ 0": {**state, "batches": -1},
        r"expected an affinity of shape \(3, 3\) \(floating\)": {**state, "affinity": [[0.0] * 3] * 3},
        r"\(integers\), got .* and torch.bool of shape": {**state, "labels": torch.zeros(3, dtype=torch.bool)},
        "the affinity has non-finite entries": {**state, "affinity": torch.full((3, 3), float("nan"))},
    }
    for message, broken in bad.items():
        with pytest.raises(ValueError, match=message):
            sgu.load_state_dict(broken)
        after = sgu.state_dict()
        for key, value in before.items():
            same = torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value
            assert same, (message, key)


def test_a_group_that_is_not_a_sequence_is_named_in_the_error():
    sgu = flatmtl_fast.SelectiveGroupUpdate(num_tasks=3)
    for group in (0, None):
        with pytest.raises(ValueError, match=rf"group must be a non-empty list .*, got {group}$"):
            sgu.loss(torch.ones(3, requires_grad=True), group)
