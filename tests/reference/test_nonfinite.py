"""The reference classes whose result depends on the Gram refuse NaN/Inf gradients and Grams with one clear error,
before their state moves (the fused classes give NaN weights instead: tests/fused/test_behaviour.py). Each
method's own solver used to fail in its own way: an eigh, SVD or CVXPY error, or — Nash-MTL, FairGrad, PCGrad,
GradVac, Aligned-MTL with Inf — a finite result made of the NaN."""

import pytest
import torch

from flatmtl_fast import reference
from flatmtl_fast.aggregators import Aggregator

#: Mean, Sum and RLW do not read M (a NaN in G reaches d as it is), GradDrop works per coordinate and DB-MTL
#: restarts its buffer after a non-finite step (their own tests).
DEPENDS_ON_THE_GRAM = (
    "MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "FairGrad", "UPGrad", "DualProj", "GradVac", "IMGrad",
)  # fmt: skip


def make(name: str) -> Aggregator:
    kwargs = {"generator": torch.Generator().manual_seed(3)} if name in ("PCGrad", "GradVac") else {}
    return getattr(reference, name)(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", DEPENDS_ON_THE_GRAM)
def test_nonfinite_gradients_or_gram_are_refused_before_the_state_moves(name: str, bad: float) -> None:
    G = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    M = G @ G.T
    aggregator = make(name)
    aggregator(G)  # a first step: stateful methods now hold a warm start, targets, a drawn generator
    G_bad, M_bad = G.clone(), M.clone()
    G_bad[1, 5] = bad
    M_bad[0, 2] = M_bad[2, 0] = bad
    with pytest.raises(ValueError, match="G must be finite"):
        aggregator(G_bad)
    with pytest.raises(ValueError, match="M must be finite"):
        aggregator.weights(M_bad)
    # The refused calls changed nothing: the next step is the one an aggregator that never saw them takes.
    clean = make(name)
    clean(G)
    torch.testing.assert_close(aggregator(G), clean(G), rtol=0, atol=0)
