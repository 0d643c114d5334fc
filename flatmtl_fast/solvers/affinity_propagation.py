"""Affinity propagation clustering (Frey & Dueck, Science 2007) on a precomputed similarity matrix, on S's device.

The algorithm of ``sklearn.cluster.AffinityPropagation(affinity="precomputed")`` (scikit-learn 1.x), twice:
the native solver (csrc/include/flatmtl/solvers/affinity_propagation.h: one C++ call on the CPU, one
single-block kernel on CUDA), which stops at the first stopping iteration inside the call, and the torch
version here, which runs a fixed iteration budget with masks instead of scikit-learn's early ``break``
(the fallback: installs without the native module, ``use_backend("reference")``, torch.compile, and CUDA
tensors under ``auto`` while the CUDA solvers await validation; see solvers/native.py). Neither
calls ``.item()``, ``.cpu()``, ``.tolist()`` or tensor-to-bool, so clustering never synchronises with the
device. Float64 throughout. Used by the selective task-group scheduler (:class:`flatmtl_fast.SelectiveGroupUpdate`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._device import as_device_tensor
from ..aggregators.checks import check_count, check_real
from .native import run_native_solver

#: Each retry runs this many iterations more than the previous attempt.
RETRY_ITER = 100
#: The modulus of the Lehmer steps of the tie-breaking noise (2³¹ − 1).
_MODULUS = 2**31 - 1


def _median(S: Tensor) -> Tensor:
    """``np.median(S)``: the mean of the two middle values when S has an even number of entries
    (``torch.median`` would return the lower one)."""
    values = S.flatten().sort().values
    n = values.numel()
    return (values[(n - 1) // 2] + values[n // 2]) / 2


def _noise(n: int, seed: int, device: torch.device) -> Tensor:
    """Pseudo-random values in [−1, 1], shape (n, n), by integer hashing: the same on every device, and made
    on the device (a host-made tensor would need a copy that synchronises)."""
    m = _MODULUS
    x = (torch.arange(n * n, device=device, dtype=torch.int64).reshape(n, n) + seed * n * n % m) % m + 1
    for multiplier in (48271, 69621, 16807):  # Lehmer generator steps (x < 2³¹: no int64 overflow) …
        x = (x * multiplier) % m
        x = x ^ (x >> 13)  # … and an xorshift to break their lattice structure
    return x.to(torch.float64) / (m / 2) - 1


def check_affinity_propagation_parameters(damping: float, convergence_iter: int, max_iter: int, retries: int) -> None:
    """Raise ``ValueError`` naming the first parameter of :func:`affinity_propagation` out of its range."""
    check_real(damping, "affinity_propagation", "damping (as scikit-learn)", minimum=0.5, below=1.0)
    for name, value, least in (
        ("convergence_iter", convergence_iter, 1),
        ("max_iter", max_iter, 1),
        ("retries", retries, 0),
    ):
        check_count(value, "affinity_propagation", name, minimum=least)


def affinity_propagation(
    S: Tensor,
    *,
    preference: float | Tensor | None = None,
    damping: float = 0.5,
    convergence_iter: int = 15,
    max_iter: int = 200,
    retries: int = 0,
    seed: int | None = 0,
) -> Tensor:
    """Cluster labels (int64, shape (n,), on S's device) of the n points with similarities ``S`` (n × n).

    Step for step scikit-learn's ``AffinityPropagation`` with the same parameters (its defaults are
    these): responsibilities and availabilities with damping, exemplars E = {i : A_ii + R_ii > 0},
    converged once E is unchanged for ``convergence_iter`` iterations (checked from iteration
    ``convergence_iter`` on) with at least one exemplar, then each point joins its most similar exemplar,
    each cluster's exemplar is refined to the member with the largest similarity sum, points are
    reassigned, and clusters are numbered by their exemplars' indices. Differences from scikit-learn:

    - The tie-breaking noise: scikit-learn adds (eps · S + 100 · tiny) · N to S (preference included),
      N standard normal from ``random_state``; without it a symmetric S (such as the scheduler's) often
      keeps symmetric pairs of points tied, oscillates and ends with a meaningless partition. Here N is a
      fixed pseudo-random pattern in [−1, 1] made from ``seed`` by integer hashing, identical on every
      device (``seed=None``: no noise). Where no near-tie decides the run (e.g. generic non-symmetric S)
      the partition equals scikit-learn's for any ``random_state``; where one does, scikit-learn's result
      depends on ``random_state`` and ours on ``seed``. Given scikit-learn's noisy matrix and
      ``seed=None``, the labels equal scikit-learn's (tested). Exact ties go to the lowest index.
    - ``retries`` (scikit-learn has none): if no exemplar is found, the run is repeated with
      ``RETRY_ITER`` = 100 more iterations, up to ``retries`` times. Attempt k is scikit-learn with
      ``max_iter + 100 k``; all attempts share one trajectory, so the first iteration with an exemplar
      that is converged or an attempt's last ends them all.
    - Cost, without a host sync either way. The native solver (the CPU module; CUDA tensors under
      ``use_backend("cuda")``) is one call that ``break``s at that iteration, O(n²) per iteration: ~0.1 ms
      for n = 10 with the paper's settings on a CPU core. The torch version (the fallback) cannot leave
      early without a sync: it runs all ``max_iter + 100 · retries`` iterations (each about 20 small tensor
      operations; ~50 ms for the paper's 1100 on a CPU) and takes the exemplars of the first stopping
      iteration. Both give the same labels, except where rounding-level differences decide a near-tie
      (the native solver sums R's columns in index order, torch in an order of its own; tested equal on
      thousands of random matrices).
    - No exemplar found (scikit-learn warns and labels every point −1): every label is −1 as well, so
      the caller decides (:class:`~flatmtl_fast.SelectiveGroupUpdate` keeps its current groups).
      Non-finite S or preference (scikit-learn raises): also all −1 — raising would need a host sync.

    Degenerate input as scikit-learn: n = 1 gives label 0; if all off-diagonal similarities are equal
    and all preferences are equal, every point is its own cluster when the preference exceeds the
    similarity, else all share cluster 0.

    Args:
        S: similarities, floating point (computed in float64); S[i, k] is how well k suits i as exemplar.
        preference: the diagonal put into S, a number or a tensor of shape () or (n,); default the
            median of S (the mean of the two middle entries, as ``np.median``).
        damping: in [0.5, 1): messages move by (1 − damping) of the way to their new values.
        convergence_iter: iterations of unchanged exemplars that stop the iteration.
        max_iter: iterations of the first attempt.
        retries: extra attempts, each ``RETRY_ITER`` iterations longer, while no exemplar is found.
        seed: the tie-breaking noise pattern (an int ≥ 0), or ``None`` for none.
    """
    if S.dim() != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 1:
        raise ValueError(f"affinity_propagation: S must be a non-empty square matrix (n × n), got {tuple(S.shape)}")
    if not S.is_floating_point():
        raise TypeError(f"affinity_propagation: S must be a real floating-point matrix, got {S.dtype}")
    check_affinity_propagation_parameters(damping, convergence_iter, max_iter, retries)
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"affinity_propagation: seed must be an int ≥ 0 or None, got {seed!r}")
    device = S.device
    S = S.to(torch.float64)
    n = S.shape[0]
    given = None if preference is None else as_device_tensor(preference, device, torch.float64, what="preference")
    if given is not None and given.shape not in ((), (n,)):
        raise ValueError(
            f"affinity_propagation: preference must be a number or have shape ({n},), got {tuple(given.shape)}"
        )
    # The native solver takes n preferences (none: it computes the median) and an int64 seed (< 0: no noise);
    # the noise depends on the seed modulo 2³¹ − 1 only.
    parameters = (
        None if given is None else given.expand(n).contiguous(),
        damping,
        convergence_iter,
        max_iter,
        retries,
        -1 if seed is None else seed % _MODULUS,
    )
    labels = run_native_solver("affinity_propagation", S, parameters)
    if labels is not None:
        return labels.to(torch.int64)
    pref = _median(S) if given is None else given
    if n == 1:
        return torch.where(S.isfinite().all(), 0, -1).reshape(1).to(torch.int64)
    pref = pref.expand(n)
    index = torch.arange(n, device=device)
    eye = index[:, None] == index[None, :]
    S_p = torch.where(eye, pref[:, None], S)  # the preference on the diagonal
    finite = S_p.isfinite().all()
    if seed is not None:
        tiny = torch.finfo(torch.float64)
        S_p = S_p + (tiny.eps * S_p + tiny.tiny * 100) * _noise(n, seed, device)

    iterations = max_iter + RETRY_ITER * retries
    floor = torch.where(eye, -torch.inf, 0.0).to(torch.float64)  # max(·, floor): clamp at 0 off the diagonal
    R = torch.zeros_like(S_p)
    A = torch.zeros_like(S_p)
    history = torch.empty(iterations, n, dtype=torch.bool, device=device)  # the exemplar set E of each iteration
    for it in range(iterations):
        best = (A + S_p).topk(2, dim=1)
        first, second = best.values.split(1, dim=1)
        # R_ik ← S_ik − max_{k' ≠ k} (A + S)_ik'; on an exact tie first == second, so either index works.
        R_new = S_p - torch.where(index == best.indices[:, :1], second, first)
        R = torch.add(R * damping, R_new, alpha=1 - damping)
        # A_ik ← min(0, R_kk + Σ_{i' ∉ {i,k}} max(0, R_i'k)) off the diagonal, Σ_{i' ≠ k} max(0, R_i'k) on it.
        R_pos = torch.maximum(R, floor)
        minus_A_new = torch.maximum(R_pos - R_pos.sum(dim=0), floor)
        A = torch.add(A * damping, minus_A_new, alpha=damping - 1)
        history[it] = (A + R).diagonal() > 0

    # The first stopping iteration: E unchanged for convergence_iter iterations (tested from iteration
    # convergence_iter on, as scikit-learn) or the last iteration of an attempt, with at least one exemplar.
    step = torch.arange(iterations, device=device)
    changed = torch.ones(iterations, dtype=torch.bool, device=device)
    changed[1:] = (history[1:] != history[:-1]).any(dim=1)
    unchanged_for = step - torch.where(changed, step, 0).cummax(dim=0).values + 1
    converged = (step >= convergence_iter) & (unchanged_for >= convergence_iter)
    attempt_end = (step >= max_iter - 1) & ((step - (max_iter - 1)) % RETRY_ITER == 0)
    stops = history.any(dim=1) & (converged | attempt_end)
    done = stops.any()
    first_stop = stops.to(torch.int8).argmax().reshape(1)  # argmax gives the first maximal index
    exemplar = history.index_select(0, first_stop)[0] & done

    def assign(exemplars: Tensor) -> Tensor:
        """Each point's most similar exemplar (lowest index on ties); an exemplar is its own."""
        nearest = torch.where(exemplars[None, :], S_p, -torch.inf).argmax(dim=1)
        return torch.where(exemplars, index, nearest)

    # Refinement: in each cluster, the member k maximising Σ_{i in the cluster} S_ik becomes the exemplar.
    member = assign(exemplar)[None, :] == index[:, None]  # member[e, i]: point i is in the cluster of e
    totals = torch.where(member, member.to(torch.float64) @ S_p, -torch.inf)
    refined = (exemplar[:, None] & (totals.argmax(dim=1)[:, None] == index[None, :])).any(dim=0)
    labels = refined.cumsum(0)[assign(refined)] - 1  # numbered by exemplar index, as np.unique + searchsorted

    off_diagonal_equal = torch.where(eye, True, S == S[0, 1]).all()
    degenerate = off_diagonal_equal & (pref == pref[0]).all()
    labels = torch.where(degenerate, torch.where(pref[0] > S[0, n - 1], index, 0), labels)
    return torch.where(finite & (degenerate | done), labels, -1)
