"""No primitive and no aggregator writes into what it only reads: after each call on every CPU backend and every
dtype it takes, its inputs equal, bit for bit, copies taken before. (A float64 ``x.double()`` is ``x`` itself,
so an in-place update of a "converted" block silently rewrites the caller's tensor — row_norms did that to a
float64 G.)"""

from __future__ import annotations

import pytest
import torch
from fused._util import ALL, losses_for, make
from support.cases import CPU_CASES, Case

import flatmtl_fast

K, N = 3, 1_003  # N past a block boundary of no backend, small enough for the Triton interpreter
CASES = [(case, dtype) for case in CPU_CASES for dtype in (torch.float32, torch.bfloat16)] + [
    (Case("reference"), torch.float64)  # the only backend for float64 (auto picks it)
]
IDS = [f"{case.id}-{str(dtype).removeprefix('torch.')}" for case, dtype in CASES]


def _inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "G": torch.randn(K, N, generator=gen).to(dtype),
        "w": torch.rand(K, generator=gen, dtype=torch.float64),
        "weight": torch.randn(N, generator=gen).to(dtype),
        "base": torch.randn(N, generator=gen).to(dtype),
        "scale": torch.rand(1, generator=gen, dtype=torch.float64),
        "gain": torch.rand(K, generator=gen),
    }


def _assert_unchanged(inputs: dict[str, torch.Tensor], copies: dict[str, torch.Tensor]) -> None:
    for name, tensor in inputs.items():
        assert torch.equal(tensor.view(torch.uint8), copies[name].view(torch.uint8)), f"{name} was written"


@pytest.mark.parametrize(("case", "dtype"), CASES, ids=IDS)
def test_primitives_leave_their_inputs_alone(case: Case, dtype: torch.dtype) -> None:
    inputs = _inputs(dtype)
    copies = {name: tensor.clone() for name, tensor in inputs.items()}
    G, w, weight, base, scale, gain = inputs.values()
    with case.active():
        flatmtl_fast.gram(G)
        flatmtl_fast.combine(w, G, out=torch.empty(N, dtype=dtype))
        flatmtl_fast.row_norms(G)
        flatmtl_fast.row_norms(G, weight=weight)
        for adaptive in (False, True):
            flatmtl_fast.perturb(base, G[0], scale, out=torch.empty(N, dtype=dtype), adaptive=adaptive)
        if dtype != torch.float64:  # DB-MTL's float32 state reads 16- and 32-bit gradients only
            flatmtl_fast.ema_row_norms(torch.zeros(K, N), G, decay=0.9, gain=gain)
    _assert_unchanged(inputs, copies)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregators_leave_their_inputs_alone(name: str, fused: bool, dtype: torch.dtype) -> None:
    G = _inputs(dtype)["G"]
    losses = losses_for(name, K)
    losses = torch.linspace(0.5, 2.0, K, dtype=torch.float64) if losses is None else losses
    M = G.double() @ G.double().T
    inputs = {"G": G, "M": M, "losses": losses}
    copies = {key: tensor.clone() for key, tensor in inputs.items()}
    aggregator = make(name, fused=fused)
    aggregator(G, losses)
    if name not in ("GradDrop", "DBMTL"):  # their weights are not a function of M
        aggregator.weights(M, losses)
    _assert_unchanged(inputs, copies)
