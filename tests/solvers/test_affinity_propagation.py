"""The on-device affinity propagation (``flatmtl_fast.solvers.affinity_propagation``) against scikit-learn's
``AffinityPropagation(affinity="precomputed")``.

Two comparisons. (1) Generic random similarities (not symmetric, default median preference), sizes 1 … 40:
the partition equals scikit-learn's, each with its own tie-breaking noise. (2) Exactness: scikit-learn adds
~1e-16 relative noise to S to break ties (on symmetric matrices, like the scheduler's, that noise can decide
the partition: its result then changes with ``random_state``); given the very matrix scikit-learn iterates
on — S with the preference on the diagonal plus that noise, re-drawn here from the same ``RandomState`` (the
formula of scikit-learn 1.x) — and no noise of ours, our labels equal scikit-learn's label for label, on
symmetric and non-symmetric matrices, converged or not, with no exemplar (−1), and with retries
(scikit-learn re-run with 100 more iterations while it finds no exemplar).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import AffinityPropagation

from flatmtl_fast.solvers.affinity_propagation import RETRY_ITER, affinity_propagation

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning", "ignore:All samples have mutually equal similarities"
)
SYNCS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


def similarities(kind: str, n: int, seed: int) -> torch.Tensor:
    """Random float64 similarities: "general" (Gaussian), "symmetric", or "distances" (−‖x_i − x_k‖², 2-D points)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "distances":
        x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        return -(torch.cdist(x, x) ** 2)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (S + S.T) / 2 if kind == "symmetric" else S


def sklearn_labels(S: torch.Tensor, *, random_state: int = 0, retries: int = 0, max_iter: int = 200, **kwargs):
    """scikit-learn's labels; while it finds no exemplar, re-run with RETRY_ITER more iterations (``retries`` times)."""
    for attempt in range(retries + 1):
        labels = (
            AffinityPropagation(
                affinity="precomputed", random_state=random_state, max_iter=max_iter + RETRY_ITER * attempt, **kwargs
            )
            .fit(S.numpy())
            .labels_
        )
        if labels[0] >= 0:
            break
    return labels.tolist()


def sklearn_matrix(S: torch.Tensor, random_state: int) -> torch.Tensor:
    """The matrix scikit-learn iterates on: the median preference on the diagonal plus its tie-breaking noise."""
    X = S.numpy().copy()
    np.fill_diagonal(X, np.median(X))
    noise = np.random.RandomState(random_state).standard_normal(size=X.shape)
    X += (np.finfo(X.dtype).eps * X + np.finfo(X.dtype).tiny * 100) * noise
    return torch.from_numpy(X)


def partition(labels: list[int]) -> set[frozenset[int]]:
    """The clusters as sets of indices (labels up to renaming); −1 labels stay a visible marker."""
    return {frozenset(i for i, label in enumerate(labels) if label == value) for value in set(labels)} | (
        {frozenset({-1})} if -1 in labels else set()
    )


@pytest.mark.parametrize("n", range(1, 41))
def test_partition_matches_sklearn_on_generic_random_matrices(n):
    S = similarities("general", n, seed=n)
    convergence_iter = 15 if n % 2 else 50  # scikit-learn's default and the paper's
    ours = affinity_propagation(S, convergence_iter=convergence_iter)
    assert ours.dtype == torch.int64 and ours.shape == (n,)
    expected = sklearn_labels(S, convergence_iter=convergence_iter)
    assert partition(ours.tolist()) == partition(expected), (ours.tolist(), expected)


SETTINGS = {
    "default": {},
    "paper": {"convergence_iter": 50},
    "early": {"convergence_iter": 2},  # stops early, on a still changing exemplar set: the test's exact count
    "unconverged": {"max_iter": 3},  # stops at the budget; may have no exemplar (−1)
    "retries": {"max_iter": 1, "retries": 3},  # the first attempt (1 iteration) mostly finds no exemplar
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", ["general", "symmetric", "distances"])
@pytest.mark.parametrize("n", [3, 11, 40])
def test_labels_equal_sklearn_on_its_own_noisy_matrix(n, kind, setting):
    S = similarities(kind, n, seed=100 * n + len(kind))
    options = SETTINGS[setting]
    X = sklearn_matrix(S, random_state=n)
    ours = affinity_propagation(X, preference=X.diagonal().clone(), seed=None, **options)
    assert ours.tolist() == sklearn_labels(S, random_state=n, **options)


def test_no_exemplar_gives_minus_one_as_sklearn_and_retries_find_one():
    S = similarities("general", 6, seed=2)
    X = sklearn_matrix(S, random_state=0)
    for max_iter in (1, 2):  # scikit-learn finds no exemplar after 1 or 2 iterations on this matrix
        expected = sklearn_labels(S, max_iter=max_iter)
        assert expected == [-1] * 6  # the premise
        assert (
            affinity_propagation(X, preference=X.diagonal().clone(), max_iter=max_iter, seed=None).tolist() == expected
        )
    retried = affinity_propagation(X, preference=X.diagonal().clone(), max_iter=2, retries=1, seed=None)
    assert retried.tolist() == sklearn_labels(S, max_iter=2 + RETRY_ITER)
    assert (retried >= 0).all()


def test_symmetric_ties_are_broken_by_the_noise():
    # A symmetric X of the scheduler's kind (column-normalised affinity of 4 tasks, symmetrised) on which the
    # noise-free iteration keeps the pairs tied and oscillates: it ends (not converged) on the meaningless
    # partition {0, 3}, {1, 2} — what scikit-learn also gives with its noise set to zero. With tie-breaking
    # noise scikit-learn gives {0, 1}, {2, 3} for most random states (all tasks together for a few).
    A = torch.tensor(
        [
            [0.04, 0.036, -0.02, -0.01],
            [0.03, 0.05, -0.015, -0.02],
            [-0.02, -0.01, 0.02, 0.017],
            [-0.005, -0.02, 0.021, 0.03],
        ],
        dtype=torch.float64,
    )
    X = A / A.diagonal()
    X = (X + X.T) / 2
    assert affinity_propagation(X, convergence_iter=50, seed=None).tolist() == [0, 1, 1, 0]
    sklearn_outcomes = {tuple(sklearn_labels(X, random_state=seed, convergence_iter=50)) for seed in range(10)}
    assert (0, 0, 1, 1) in sklearn_outcomes and (0, 1, 1, 0) not in sklearn_outcomes  # the premise
    assert affinity_propagation(X, convergence_iter=50).tolist() == [0, 0, 1, 1]


def test_degenerate_inputs_as_sklearn():
    assert affinity_propagation(torch.tensor([[3.0]], dtype=torch.float64)).tolist() == [0]
    for n in (2, 5):
        S = torch.full((n, n), -1.0, dtype=torch.float64)
        S.diagonal().copy_(torch.linspace(0, 1, n, dtype=torch.float64))  # the diagonal plays no part
        for preference in (None, -2.0, -1.0, -0.5):  # None: the median, −0.5 for n = 2 and −1 for n = 5
            expected = sklearn_labels(S, preference=preference)
            assert affinity_propagation(S, preference=preference).tolist() == expected
        # Above the common similarity every point is its own cluster; at or below it they share one.
        assert affinity_propagation(S, preference=-0.5).tolist() == list(range(n))
        assert affinity_propagation(S, preference=-1.0).tolist() == [0] * n


def test_non_finite_input_gives_minus_one():
    S = similarities("general", 5, seed=0)
    for bad in (float("nan"), float("inf")):
        T = S.clone()
        T[1, 3] = bad
        assert affinity_propagation(T).tolist() == [-1] * 5
        assert affinity_propagation(S, preference=bad).tolist() == [-1] * 5
    assert affinity_propagation(torch.tensor([[float("nan")]])).tolist() == [-1]


def test_float32_input_and_per_point_preference():
    S = similarities("distances", 12, seed=3)
    preference = torch.linspace(-3.0, -1.0, 12, dtype=torch.float64)
    expected = affinity_propagation(S, preference=preference)
    assert torch.equal(affinity_propagation(S, preference=preference.tolist()), expected)
    # float32 input is converted to float64 first: the same as the float64 matrix of the rounded values.
    assert torch.equal(
        affinity_propagation(S.float(), preference=preference),
        affinity_propagation(S.float().double(), preference=preference),
    )


def test_no_host_synchronisation(monkeypatch: pytest.MonkeyPatch):
    S = similarities("symmetric", 7, seed=4)
    expected = affinity_propagation(S, retries=1)
    for method in SYNCS:
        monkeypatch.setattr(torch.Tensor, method, lambda *a, _m=method, **k: pytest.fail(f"host sync: Tensor.{_m}"))
    labels = affinity_propagation(S, retries=1)
    affinity_propagation(S, preference=S.diagonal())
    monkeypatch.undo()
    assert torch.equal(labels, expected)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    for n in (3, 17, 40):
        S = similarities("general", n, seed=n)
        labels = affinity_propagation(S.cuda(), convergence_iter=50, retries=1)
        assert labels.device.type == "cuda"
        assert torch.equal(labels.cpu(), affinity_propagation(S, convergence_iter=50, retries=1))


def test_bad_inputs_raise_clearly():
    S = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        affinity_propagation(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        affinity_propagation(torch.zeros(0, 0))
    with pytest.raises(TypeError, match="floating"):
        affinity_propagation(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="damping"):
        affinity_propagation(S, damping=0.4)
    with pytest.raises(ValueError, match="damping"):
        affinity_propagation(S, damping=1.0)
    with pytest.raises(ValueError, match="convergence_iter"):
        affinity_propagation(S, convergence_iter=0)
    with pytest.raises(ValueError, match="max_iter"):
        affinity_propagation(S, max_iter=0)
    with pytest.raises(ValueError, match="retries"):
        affinity_propagation(S, retries=-1)
    with pytest.raises(ValueError, match="preference"):
        affinity_propagation(S, preference=torch.zeros(2))
    with pytest.raises(ValueError, match="seed"):
        affinity_propagation(S, seed=-1)
