"""The torch Philox port is bit-exact with Triton's ``tl.rand`` (run by the Triton interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flatmtl_fast.reference._philox import philox_uniform

pytest.importorskip("triton")

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 + 7, 987654321987654321, 2**62 - 1]
BLOCK = 64
# (offset dtype, first offset): int32 and int64 blocks, including windows that cross 2³² and beyond.
WINDOWS = [("int32", 0), ("int64", 0), ("int64", 2**32 - 5), ("int64", 2**40 + 123), ("int64", 2**62)]

# Run in a subprocess: TRITON_INTERPRET must be set before the kernel is defined, and setting it in this
# process would also switch other test modules' kernels to the interpreter.
_SCRIPT = textwrap.dedent(
    """
    import ast
    import sys

    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, offsets_ptr, seed, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.rand(seed, tl.load(offsets_ptr + i)))

    seeds, windows, block, path = ast.literal_eval(sys.argv[1])
    results = {}
    for seed in seeds:
        for dtype, start in windows:
            offsets = torch.arange(start, start + block, dtype=getattr(torch, dtype))
            out = torch.empty(block, dtype=torch.float32)
            rand_kernel[(1,)](out, offsets, seed, BLOCK=block)
            results[(seed, dtype, start)] = out
    torch.save(results, path)
    """
)


@pytest.fixture(scope="module")
def triton_uniforms(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("philox") / "uniforms.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = repr((SEEDS, WINDOWS, BLOCK, str(path)))
    subprocess.run([sys.executable, "-c", _SCRIPT, args], env=env, check=True, timeout=120)
    return torch.load(path)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("dtype", "start"), WINDOWS)
def test_bit_exact_with_triton_rand(triton_uniforms: dict, seed: int, dtype: str, start: int) -> None:
    expected = triton_uniforms[(seed, dtype, start)]
    actual = philox_uniform(seed, BLOCK, "cpu", start=start)
    assert actual.dtype == torch.float32
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def test_window_is_a_slice_of_the_stream() -> None:
    stream = philox_uniform(42, 100)
    assert torch.equal(philox_uniform(42, 30, start=50), stream[50:80])


def test_range_and_rough_uniformity() -> None:
    u = philox_uniform(2024, 100_000)
    assert u.shape == (100_000,)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u, philox_uniform(2025, 100_000))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed must be"):
        philox_uniform(-1, 4)
    with pytest.raises(ValueError, match="n ≥ 0"):
        philox_uniform(0, -4)


def test_a_seed_tensor_gives_the_seed_integer_stream() -> None:
    """A one-element int64 seed tensor (a device's draw, never read on the host) gives the integer seed's stream."""
    for seed in (0, 7, 2**62 - 1):
        expected = philox_uniform(seed, 1000, start=2**32 - 500)
        actual = philox_uniform(torch.tensor([seed]), 1000, start=2**32 - 500)
        assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))
    with pytest.raises(ValueError, match="a seed tensor must hold one int64"):
        philox_uniform(torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="a seed tensor must hold one int64"):
        philox_uniform(torch.tensor([1.0]), 4)
