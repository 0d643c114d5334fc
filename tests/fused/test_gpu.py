"""GPU-only checks of the fused path (run with ``-m gpu`` on a CUDA machine; see bench/gpu_session.sh):
no host synchronisation under torch.cuda.set_sync_debug_mode("error"), capture of a whole aggregation in
a CUDA graph, parity of the CUDA backends with the CPU reference, and the native CUDA solvers (explicit
``cuda`` backend) against the CPU ones — the same header code."""

from __future__ import annotations

import pytest
import torch
from fused._util import ALL, GRAMIAN, RANDOMISED, SYNC_ON_CUDA, assert_paths_agree, losses_for, make, random_G
from support.host_sync import forbid_host_sync, on_side_stream

import flatmtl_fast

pytestmark = pytest.mark.gpu
NATIVE = ("MGDA", "PCGrad", "GradVac", "IMTLG", "AlignedMTL", "NashMTL", "UPGrad", "DualProj", "CAGrad", "IMGrad")
#: Every fused method but the documented exceptions (SYNC_ON_CUDA, torch solvers) neither syncs nor breaks a graph.
SYNC_FREE = tuple(name for name in ALL if name not in SYNC_ON_CUDA)


def _on_cuda(name: str, K: int, seed: int):
    """(G, losses) on the GPU."""
    losses = losses_for(name, K)
    return random_G(K, 100_003, seed=seed).cuda(), None if losses is None else losses.cuda()


@pytest.mark.parametrize("name", SYNC_FREE)
def test_no_host_sync(name):
    """Randomised methods with a CPU generator too: their draws reach the GPU through pinned memory."""
    G, losses = _on_cuda(name, 7, seed=1)
    agg = make(name)
    out = torch.empty(G.shape[1], device="cuda")
    agg(G, losses, out=out)  # warm-up: compilation, caches
    with forbid_host_sync("cuda"):
        agg(G, losses, out=out)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", sorted(SYNC_ON_CUDA))
def test_documented_syncs(name):
    """The exceptions are real (if torch stops synchronising there, move them to SYNC_FREE) and go away with the
    native CUDA solver where there is one, which a CUDA graph then captures."""
    G, losses = _on_cuda(name, 7, seed=1)
    agg = make(name)
    agg(G, losses)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # CUDA's own verdict (forbid_host_sync would stop at the aten op)
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            agg(G, losses)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if name in NATIVE:
        with flatmtl_fast.use_backend("cuda"):
            expected = agg(G, losses)
            with forbid_host_sync("cuda"):
                agg(G, losses)
            # ... and a step with the native solver is captured and replayed
            out = torch.empty_like(expected)
            on_side_stream(lambda: agg(G, losses, out=out), G.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                agg(G, losses, out=out)
            out.zero_()
            graph.replay()
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("name", SYNC_FREE)
def test_replays_of_a_captured_step_continue_as_eager_steps(name):
    """One real step, then a step captured in a CUDA graph: its replays on new inputs equal eager steps from the
    same start — stateful methods carry their state (in place) from replay to replay, randomised ones draw
    afresh from the default CUDA generator at each replay, DB-MTL's decay follows its step count."""
    K, steps = 5, 4
    inputs = [_on_cuda(name, K, seed=s) for s in range(steps)]
    kwargs = {"generator": None} if name in RANDOMISED else {}

    torch.cuda.manual_seed(3)
    eager = make(name, **kwargs)
    expected = [eager(G, losses).clone() for G, losses in inputs]

    torch.cuda.manual_seed(3)
    agg = make(name, **kwargs)
    static_G, static_losses = (x if x is None else x.clone() for x in inputs[0])
    static_out = torch.empty(static_G.shape[1], device="cuda")
    # the real first step (state, caches), off the capturing stream
    on_side_stream(lambda: agg(static_G, static_losses, out=static_out), static_G.device)
    torch.testing.assert_close(static_out, expected[0], rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        agg(static_G, static_losses, out=static_out)
    for (G, losses), want in zip(inputs[1:], expected[1:], strict=True):
        static_G.copy_(G)
        if losses is not None:
            static_losses.copy_(losses)
        graph.replay()
        torch.testing.assert_close(static_out, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("name", RANDOMISED)
def test_a_cpu_generator_refuses_capture(name):
    """Its draws are made on the host at capture time: a replay would repeat them, so capture raises."""
    G, losses = _on_cuda(name, 3, seed=2)
    agg = make(name)
    out = torch.empty(G.shape[1], device="cuda")
    on_side_stream(lambda: agg(G, losses, out=out), G.device)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="the draws of a CPU generator"), torch.cuda.graph(graph):
        agg(G, losses, out=out)


@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("name", GRAMIAN)
@pytest.mark.parametrize("K", [2, 7, 40])
def test_cuda_direction_matches_the_cpu_path(backend, name, K):
    """Against the fused CPU path, which CI proves equal to the reference (the GPU image lacks the
    reference's cvxpy/quadprog); the solver allowance is measured on the two paths' Grams."""
    G = random_G(K, 20_011, seed=K)
    assert_paths_agree(name, G, ("cpp", G), (backend, G.cuda()))


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


@pytest.mark.parametrize("K", [1, 3, 7])
def test_float64_graddrop_runs_on_cuda_as_on_the_cpu(K):
    """float64, which the kernels do not take, goes through the torch block path on the GPU too: the seed stays a
    device tensor (no host read), the stream is the CPU's bit for bit, and only summation order differs."""
    G = random_G(K, 100_003, seed=K).double()
    expected = make("GradDrop", seed=2)(G)
    make("GradDrop", seed=9)(G.cuda())  # warm-up: pinned staging of the CPU generator's draw
    agg = make("GradDrop", seed=2)
    with forbid_host_sync("cuda"):
        got = agg(G.cuda())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-14 * float(G.abs().max()))
