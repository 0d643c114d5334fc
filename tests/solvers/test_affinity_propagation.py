"""The on-device affinity propagation (``flatmtl_fast.solvers.affinity_propagation``) against scikit-learn's
``AffinityPropagation(affinity="precomputed")``, on both paths: every test runs on the torch version
(backend ``reference``) and on the native solver (``cpp``: csrc/include/flatmtl/solvers/affinity_propagation.h),
and the two are compared label for label on many random matrices, settings and degenerate inputs.

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

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.cluster import AffinityPropagation
from support.host_sync import forbid_host_sync

from flatmtl_fast import _native, use_backend
from flatmtl_fast.solvers.affinity_propagation import RETRY_ITER, affinity_propagation

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning", "ignore:All samples have mutually equal similarities"
)

C = _native.module()
NATIVE = pytest.mark.skipif(
    not hasattr(C, "solve_affinity_propagation"),
    reason="the native module is missing or was built before solve_affinity_propagation (rebuild it)",
)
#: The CUDA backend matching each path: torch on CUDA tensors, and the native solver's kernel.
CUDA_BACKEND = {"reference": "reference", "cpp": "cuda"}


@pytest.fixture(autouse=True, params=["reference", pytest.param("cpp", marks=NATIVE)])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """The implementation under test: the torch version ("reference") or the native solver ("cpp")."""
    with use_backend(request.param):
        yield request.param


#: For the tests that compare the native solver with the torch version themselves.
NATIVE_ONLY = pytest.mark.parametrize("path", [pytest.param("cpp", marks=NATIVE)], indirect=True)


KINDS = ("general", "symmetric", "distances", "scheduler")


def similarities(kind: str, n: int, seed: int) -> torch.Tensor:
    """Random float64 similarities: "general" (Gaussian), "symmetric", "distances" (−‖x_i − x_k‖², 2-D points)
    or "scheduler" (the selective scheduler's X: an affinity divided by its diagonal by columns, symmetrised)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "distances":
        x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        return -(torch.cdist(x, x) ** 2)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    if kind == "scheduler":
        S = 0.01 * S + 0.05 * torch.eye(n, dtype=torch.float64)
        S = S / S.diagonal()
    return (S + S.T) / 2 if kind in ("symmetric", "scheduler") else S


def torch_labels(S: torch.Tensor, **options) -> torch.Tensor:
    """The torch version's labels, whatever the path under test."""
    with use_backend("reference"):
        return affinity_propagation(S, **options)


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


def test_no_host_synchronisation():
    S = similarities("symmetric", 7, seed=4)
    expected = affinity_propagation(S, retries=1)
    with forbid_host_sync():
        labels = affinity_propagation(S, retries=1)
        affinity_propagation(S, preference=S.diagonal())
    assert torch.equal(labels, expected)


@pytest.mark.gpu
def test_cuda_matches_cpu(path):
    for n in (3, 17, 40):
        S = similarities("general", n, seed=n)
        with use_backend(CUDA_BACKEND[path]):
            labels = affinity_propagation(S.cuda(), convergence_iter=50, retries=1)
        assert labels.device.type == "cuda"
        assert torch.equal(labels.cpu(), affinity_propagation(S, convergence_iter=50, retries=1))


@pytest.mark.gpu
@NATIVE_ONLY
@pytest.mark.parametrize("kind", KINDS)
def test_native_cuda_solver_matches_the_cpu_one(kind):
    # The same header code with the same roundings (explicit fma, no contraction): the same labels everywhere.
    for n in (1, 2, 5, 17, 40):
        for seed in (0, None):
            S = similarities(kind, n, seed=n)
            options = {"convergence_iter": 50, "retries": 9, "seed": seed}
            with use_backend("cuda"):
                labels = affinity_propagation(S.cuda(), **options)
            assert torch.equal(labels.cpu(), affinity_propagation(S, **options)), (n, seed)


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


# ------------------------------------------------------------------------- the native solver = the torch version


def random_options(n: int, seed: int) -> dict:
    """Settings drawn from a seeded generator: preference (median, number, per point), damping, convergence_iter,
    max_iter (from a few iterations, often without exemplar, to scikit-learn's 200), retries and noise seed."""
    gen = torch.Generator().manual_seed(seed)

    def pick(*choices):
        return choices[int(torch.randint(len(choices), (), generator=gen))]

    preference = pick(None, None, "number", "vector")
    if preference == "number":
        preference = float(torch.randn((), generator=gen, dtype=torch.float64))
    elif preference == "vector":
        preference = torch.randn(n, generator=gen, dtype=torch.float64) - 1
    return {
        "preference": preference,
        "damping": pick(0.5, 0.7, 0.9),
        "convergence_iter": pick(1, 2, 15, 50),
        "max_iter": pick(1, 3, 50, 200),
        "retries": pick(0, 1, 9),
        "seed": pick(None, 0, 7, 2**40 + 1),
    }


@NATIVE_ONLY
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", range(1, 41))
def test_native_solver_equals_the_torch_version_on_random_matrices(n, kind):
    for case in range(3):
        seed = 1000 * n + 10 * KINDS.index(kind) + case
        S = similarities(kind, n, seed=seed)
        options = random_options(n, seed) if case else {"convergence_iter": 50, "retries": 9}  # case 0: the scheduler's
        ours = affinity_propagation(S, **options)
        assert ours.dtype == torch.int64 and ours.shape == (n,)
        assert torch.equal(ours, torch_labels(S, **options)), (case, options)


@NATIVE_ONLY
def test_beyond_the_native_size_limit_the_torch_version_runs(monkeypatch: pytest.MonkeyPatch):
    S = similarities("symmetric", 6, seed=11)
    expected = torch_labels(S, retries=1)
    calls = []
    monkeypatch.setattr(C, "solve_affinity_propagation", lambda *args: calls.append(args), raising=True)
    monkeypatch.setattr(C, "solver_max_k", 5)  # as if 6 tasks were above kMaxK
    assert torch.equal(affinity_propagation(S, retries=1), expected)
    assert not calls, "the native solver ran above its size limit"


@NATIVE_ONLY
def test_native_solver_equals_the_torch_version_on_degenerate_and_non_finite_inputs():
    nan, inf = float("nan"), float("inf")
    inputs = [
        (torch.tensor([[3.0]]), {}),
        (torch.tensor([[3.0]]), {"preference": nan}),  # n = 1: one cluster whatever the preference
        (torch.tensor([[inf]]), {}),
    ]
    for n in (2, 3, 5):
        constant = torch.full((n, n), -1.0, dtype=torch.float64)
        constant.diagonal().copy_(torch.linspace(0, 1, n, dtype=torch.float64))
        inputs += [(constant, {"preference": p}) for p in (None, -2.0, -1.0, -0.5)]
        inputs.append((constant, {"preference": torch.linspace(-2.0, -0.5, n, dtype=torch.float64)}))  # not degenerate
        inputs.append((torch.zeros(n, n, dtype=torch.float64), {}))
        S = similarities("symmetric", n, seed=n)
        for i, k, bad in ((0, n - 1, nan), (n - 1, 0, inf), (1, 1, nan), (0, 0, -inf)):
            T = S.clone()
            T[i, k] = bad
            inputs += [(T, {}), (T, {"preference": -1.0})]  # a bad diagonal counts only through the median
        inputs += [(S, {"preference": nan}), (S, {"preference": torch.tensor([0.0] * (n - 1) + [inf])})]
    for S, options in inputs:
        assert torch.equal(affinity_propagation(S, **options), torch_labels(S, **options)), (S, options)


def native_solve(S: torch.Tensor, *parameters) -> tuple[list[int], int, bool]:
    """The bound CPU solver called directly (no preference: the median): labels, iterations, converged."""
    n, S = S.shape[0], S.contiguous()
    w = torch.empty(n, dtype=torch.float64)
    work = torch.empty(C.solve_affinity_propagation_work_size(n), dtype=torch.float64)
    iterations, converged = C.solve_affinity_propagation(S.data_ptr(), n, 0, *parameters, w.data_ptr(), work.data_ptr())
    return [int(label) for label in w.tolist()], iterations, converged


@NATIVE_ONLY
def test_native_solver_breaks_at_the_first_stopping_iteration():
    """The binding reports the iterations run: far below the budget once converged; the whole budget when
    no attempt finds an exemplar."""
    S = similarities("scheduler", 10, seed=1)
    labels, iterations, converged = native_solve(S, 0.5, 50, 200, 9, 0)  # damping, convergence_iter, max_iter, …
    assert converged and 50 <= iterations < 200
    assert labels == torch_labels(S, convergence_iter=50, retries=9).tolist()
    X = sklearn_matrix(similarities("general", 6, seed=2), random_state=0)  # no exemplar after 1 or 2 iterations
    assert native_solve(X, 0.5, 15, 1, 0, -1) == ([-1] * 6, 1, False)
    labels, iterations, _ = native_solve(X, 0.5, 15, 2, 1, -1)
    assert 2 < iterations <= 2 + RETRY_ITER and min(labels) >= 0  # the retry found one, within its budget
    with pytest.raises(ValueError, match="damping"):
        native_solve(X, 1.0, 15, 2, 1, -1)
