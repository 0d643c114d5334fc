"""Shared pieces of the reference tests: test matrices, scales, generators and the common assertions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

#: Gradient scales every method must handle (0 included; :data:`POSITIVE_SCALES` without it).
SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]
POSITIVE_SCALES = SCALES[1:]


def generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def random_matrix(K: int, N: int, rank: int, seed: int) -> Tensor:
    """A float64 K × N matrix of rank ``rank``: a (K × rank) times a (rank × N) Gaussian factor."""
    gen = generator(seed)
    return torch.randn(K, rank, dtype=torch.float64, generator=gen) @ torch.randn(
        rank, N, dtype=torch.float64, generator=gen
    )


def degenerate_inputs(G: Tensor) -> list[Tensor]:
    """G and three degenerate matrices from its rows g, h: duplicated (g, g, g), collinear (g, 3g, h), zero."""
    return [G, G[:1].repeat(3, 1), torch.cat([G[:1], 3.0 * G[:1], G[1:2]]), torch.zeros(3, G.shape[1], dtype=G.dtype)]


# The dual-cone methods' test matrices (UPGrad, DualProj), drawn in this order from one generator.
_gen = generator(0)
#: Random matrices of prescribed rank r: a (K × r) times an (r × N) Gaussian factor.
RANKED = [
    torch.randn(K, r, generator=_gen, dtype=torch.float64) @ torch.randn(r, N, generator=_gen, dtype=torch.float64)
    for K, N, r in [(4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9), (5, 3, 3)]
]
_g = torch.randn(1, 6, generator=_gen, dtype=torch.float64)
SPECIAL = [
    torch.zeros(4, 3, dtype=torch.float64),
    torch.cat([_g, _g, 2 * _g]),  # duplicated and collinear rows
    torch.cat([_g, -_g, torch.randn(1, 6, generator=_gen, dtype=torch.float64)]),  # opposite rows
]
MATRICES = RANKED + SPECIAL
SCALED = [scale * G for scale in [0.0, 1e-10, 1.0, 1e3, 1e5, 1e10, 1e15] for G in MATRICES]


def assert_same_direction(ours: Tensor, theirs: Tensor) -> None:
    """Cosine similarity at least 0.999 (the comparison with torchjd's aggregators)."""
    assert float(torch.cosine_similarity(ours, theirs, dim=0)) >= 0.999


def assert_same_direction_and_norm(ours: Tensor, theirs: Tensor, *, rtol: float) -> None:
    """Same direction (:func:`assert_same_direction`) and norms equal to ``rtol``."""
    assert_same_direction(ours, theirs)
    torch.testing.assert_close(ours.norm(), theirs.norm(), rtol=rtol, atol=0)


def assert_default_generator_is_torchs_global_one(
    make: Callable[..., Callable[[Tensor], Tensor]], G: Tensor, seed: int
) -> None:
    """``make()`` (no generator) draws from torch's global generator: seeded with ``seed``, it gives exactly
    what ``make(generator=generator(seed))`` gives."""
    torch.manual_seed(seed)
    d = make()(G)
    assert torch.equal(d, make(generator=generator(seed))(G))


def assert_finite_and_homogeneous(
    make: Callable[[], Callable[[Tensor], Tensor]], G: Tensor, scale: float, *, rtol: float
) -> None:
    """On G and its :func:`degenerate_inputs` X: ``make()(scale X)`` is finite and equals ``scale · make()(X)``."""
    for X in degenerate_inputs(G):
        d = make()(scale * X)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, scale * make()(X), rtol=rtol, atol=1e-300)


class DualConeProperties:
    """torchjd's properties of a dual-cone method (UPGrad, DualProj), collected through a ``Test…`` subclass in
    the method's test module that sets ``method`` to the class."""

    method: type
    #: Constructor arguments whose result must agree with torchjd's default (on inputs with tr(M) > 1e-4).
    torchjd_variants: tuple[dict, ...] = ({},)

    @pytest.mark.parametrize("G", SCALED)
    def test_structure_and_non_conflicting(self, G: Tensor) -> None:
        # G d ≥ −tol, tol from the ridge: the KKT conditions give M w ≥ −reg_eps · tr(M) · w.
        agg = self.method()
        d = agg(G)
        assert d.shape == (G.shape[1],) and bool(torch.isfinite(d).all())
        w, trace = agg.weights(G @ G.T), float(torch.trace(G @ G.T))
        tolerance = agg.reg_eps * trace * w.abs() + 1e-9 * trace * float(w.abs().sum())
        assert bool((G @ d >= -tolerance).all())

    @pytest.mark.parametrize("G", MATRICES)
    def test_permutation_invariant(self, G: Tensor) -> None:
        agg = self.method()
        d = agg(G)
        for seed in range(3):
            perm = torch.randperm(G.shape[0], generator=generator(seed))
            torch.testing.assert_close(agg(G[perm]), d, atol=1e-8 * float(d.norm()) + 1e-12, rtol=1e-7)

    @pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e5, 1e15])
    def test_positively_homogeneous(self, scale: float) -> None:
        # Scale-free because M is normalised by its trace (torchjd's norm_eps = 1e-4 would switch to the mean).
        G = RANKED[4]
        d = self.method()(G)
        torch.testing.assert_close(self.method()(scale * G) / scale, d, atol=1e-9 * float(d.norm()), rtol=1e-7)

    @pytest.mark.parametrize("G", MATRICES)
    def test_weights_agree_with_call(self, G: Tensor) -> None:
        agg = self.method()
        torch.testing.assert_close(agg.weights(G @ G.T) @ G, agg(G), atol=1e-10 * float(G.norm() ** 2) + 1e-12, rtol=0)

    @pytest.mark.parametrize("seed", range(5))
    def test_agrees_with_torchjd(self, seed: int) -> None:
        torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
        G = torch.randn(6, 20, generator=generator(seed), dtype=torch.float64)
        expected = getattr(torchjd_aggregation, self.method.__name__)()(G)
        for kwargs in self.torchjd_variants:
            assert_same_direction_and_norm(self.method(**kwargs)(G), expected, rtol=1e-6)
