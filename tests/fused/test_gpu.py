"""GPU-only checks of the fused path (run with ``-m gpu`` on a CUDA machine; see bench/gpu_session.sh):
no host synchronisation under torch.cuda.set_sync_debug_mode("error"), capture of a whole aggregation in
a CUDA graph, parity of the CUDA backends with the CPU reference, and the native CUDA solvers (explicit
``cuda`` backend) against the CPU ones — the same header code."""

from __future__ import annotations

import pytest
import torch
from fused._util import ALL, GRAMIAN, direction_tolerance, losses_for, make, random_G

import flatmtl_fast

pytestmark = pytest.mark.gpu
NATIVE = ("MGDA", "PCGrad", "GradVac", "IMTLG", "NashMTL", "UPGrad", "DualProj", "CAGrad", "IMGrad")
GRAPHABLE = ("Mean", "Sum", "MGDA", "CAGrad", "IMTLG", "NashMTL", "UPGrad", "DualProj", "IMGrad", "FairGrad")


@pytest.mark.parametrize("name", ALL)
def test_no_host_sync(name):
    G = random_G(7, 100_003, seed=1).cuda()
    losses = losses_for(name, 7)
    losses = None if losses is None else losses.cuda()
    agg = make(name)
    out = torch.empty(G.shape[1], device="cuda")
    agg(G, losses, out=out)  # warm-up: compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        agg(G, losses, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", GRAPHABLE)
def test_whole_aggregation_captures_in_a_cuda_graph(name):
    G = random_G(5, 65_537, seed=2).cuda()
    static_out = torch.empty(G.shape[1], device="cuda")
    eager = make(name)(G)
    agg = make(name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        agg(G, out=static_out)  # warm-up on a side stream, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    agg.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        agg(G, out=static_out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(static_out, eager, rtol=1e-5, atol=1e-6 * float(eager.abs().max()))


@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("name", GRAMIAN)
@pytest.mark.parametrize("K", [2, 7, 40])
def test_cuda_direction_matches_the_cpu_path(backend, name, K):
    """Against the fused CPU path, which CI proves equal to the reference (the GPU image lacks the
    reference's cvxpy/quadprog)."""
    G = random_G(K, 20_011, seed=K)
    losses = losses_for(name, K)
    with flatmtl_fast.use_backend("cpp"):
        expected = make(name)(G, losses)
        w_ref = make(name).weights(G.double() @ G.double().T, losses)
    with flatmtl_fast.use_backend(backend):
        got = make(name)(G.cuda(), None if losses is None else losses.cuda()).cpu()
    tolerance = direction_tolerance(name, w_ref, G, torch.float32)
    assert ((got.double() - expected.double()).abs() <= tolerance).all()


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("K", [1, 3, 10, 64])
def test_native_cuda_solvers_equal_the_cpu_ones(name, K):
    M = (lambda G: G @ G.T)(random_G(K, 4 * K + 3, seed=K).double())
    losses = losses_for(name, K)
    with flatmtl_fast.use_backend("cpp"):
        w_cpu = make(name).weights(M, losses)
    with flatmtl_fast.use_backend("cuda"):
        w_gpu = make(name).weights(M.cuda(), None if losses is None else losses.cuda()).cpu()
    # the same header code and float64 arithmetic; only FMA contraction and summation order differ
    assert torch.allclose(w_gpu, w_cpu, rtol=1e-9, atol=1e-12 * float(w_cpu.abs().max() + 1))
