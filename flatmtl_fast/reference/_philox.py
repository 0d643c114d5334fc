"""Triton's ``tl.rand(seed, offset)`` (Philox-4x32-10) re-implemented in plain torch.

GradDrop's reference draws its uniforms U_n with this function so that a fused Triton (or C++/CUDA)
kernel calling ``tl.rand(seed, n)`` on an int64 offset block reproduces them bit for bit. It follows
``triton/language/random.py`` (``rand`` -> ``randint`` -> ``randint4x`` -> ``philox`` -> ``philox_impl``,
then ``uint_to_uniform_float``) exactly:

- key: the 64-bit seed split into k0 = seed & 0xffffffff, k1 = seed >> 32;
- counter: c0 = n & 0xffffffff, c1 = n >> 32, c2 = c3 = 0 (an int64 offset block; for n < 2³¹ an int32
  block gives the same counter);
- 10 Philox rounds with Triton's 32-bit constants; the first output word is kept;
- conversion: bitcast to int32, x -> ~x where negative, then float32(x) * float32(4.6566127342e-10),
  giving values in [0, 1) (0 included).

The uint32 arithmetic runs on int64 tensors masked to 32 bits: products of two 32-bit words are split
in 16-bit halves so no intermediate exceeds 2⁴⁹ (int64 overflow is never relied on).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
_UINT32_TO_UNIT = 4.6566127342e-10  # Triton's scale: the largest with (2³¹ − 1) · scale < 1 in float32


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product of the uint32 constant ``a`` and uint32 words ``b``."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    high_part = a * b_hi  # < 2⁴⁸
    low_part = a * b_lo  # < 2⁴⁸
    # a·b = high_part·2¹⁶ + low_part; the carry of low_part's top bits into the high word is exact here.
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    return hi, lo


def philox_uniform(seed: int | Tensor, n: int, device: torch.device | str | None = None, *, start: int = 0) -> Tensor:
    """Return ``tl.rand(seed, offsets)`` for offsets start, …, start + n − 1 as a float32 tensor of shape (n,).

    ``seed`` is a non-negative integer below 2⁶⁴ (GradDrop draws it below 2⁶²), or a one-element int64 tensor
    on ``device`` holding one in [0, 2⁶³): that seed stays where it is, so a device's stream needs no host read
    of it (nor a range check). ``start`` lets a chunked consumer (or a test of offsets ≥ 2³²) address any window
    of the stream.
    """
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        seed = seed.reshape(())
    elif not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if n < 0 or start < 0 or start + n > 2**63:
        raise ValueError(f"need n ≥ 0 and 0 ≤ start ≤ start + n ≤ 2**63, got n={n}, start={start}")
    offsets = torch.arange(start, start + n, dtype=torch.int64, device=device)
    c0, c1 = offsets & _MASK32, offsets >> 32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    # Bitcast to int32: words ≥ 2³¹ are negative, and ~x maps them to 2³² − 1 − x ≥ 0.
    x = torch.where(c0 >= 2**31, _MASK32 - c0, c0)
    return x.to(torch.float32) * torch.tensor(_UINT32_TO_UNIT, dtype=torch.float32, device=device)
