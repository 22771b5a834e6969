"""Keyed counter-based randomness inside Triton kernels, bit-identical to ``sparkserve.kernels.keyed_random``.

The torch code works on non-negative int64 tensors masked to 32 bits; here the same arithmetic runs on
``uint32`` (wrapping multiplication is the masked product, shifts are logical), so every hash and every
uniform equals the torch one bit for bit (``tests/kernels/test_kernels.py`` checks random keys / positions /
draws). Gumbel noise ``-log(-log(u))`` then differs from torch's only by the device's ``log`` rounding
(an ulp or so).

``keyed_uniform_kernel`` exposes the uniforms for that test; the sampling kernels call the
``@triton.jit`` helpers directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparkserve.kernels import keyed_random as _kr
from sparkserve.kernels.common import check_kernel_device, check_tensor

# the constants of kernels/keyed_random.py, as constexprs a kernel can read
C1: tl.constexpr = tl.constexpr(_kr._C1)
C2: tl.constexpr = tl.constexpr(_kr._C2)
GOLDEN: tl.constexpr = tl.constexpr(_kr._GOLDEN)
POS_MIX: tl.constexpr = tl.constexpr(_kr._POS_MIX)
DRAW_MIX: tl.constexpr = tl.constexpr(_kr._DRAW_MIX)
NUM_DRAW_KINDS: tl.constexpr = tl.constexpr(_kr._NUM_DRAW_KINDS)
DRAW_TOKEN: tl.constexpr = tl.constexpr(int(_kr.Draw.TOKEN))
DRAW_ACCEPT: tl.constexpr = tl.constexpr(int(_kr.Draw.ACCEPT))
DRAW_RECOVER: tl.constexpr = tl.constexpr(int(_kr.Draw.RECOVER))

@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32."""
    h = h ^ (h >> 16)
    h = h * C1
    h = h ^ (h >> 13)
    h = h * C2
    return h ^ (h >> 16)


@triton.jit
def row_state(key, position, draw):
    """32-bit state of (key int64 >= 0, position int64 / int32 >= 0, draw int64 / int32 >= 0)."""
    lo = key.to(tl.uint32)
    hi = (key >> 32).to(tl.uint32)
    h = fmix32(lo ^ fmix32(hi + GOLDEN))
    h = fmix32(h ^ (position.to(tl.uint32) * POS_MIX))
    return fmix32(h ^ (draw.to(tl.uint32) * DRAW_MIX))


@triton.jit
def to_unit(h):
    """uint32 hashes -> float32 uniforms in (0, 1): odd multiples of 2^-24."""
    return ((h >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def keyed_uniform(key, position, draw):
    """One uniform in (0, 1) (``keyed_random.keyed_uniform``)."""
    return to_unit(fmix32(row_state(key, position, draw) ^ GOLDEN))


@triton.jit
def keyed_gumbel(state, tokens):
    """Gumbel(0, 1) noise of token ids ``tokens`` for a row's ``row_state`` (``keyed_random.keyed_gumbel``)."""
    u = to_unit(fmix32(state + tokens.to(tl.uint32) * GOLDEN))
    return -tl.log(-tl.log(u))


@triton.jit
def _keyed_uniform_kernel(keys_ptr, positions_ptr, draws_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key = tl.load(keys_ptr + offs, mask=ok, other=0)
    pos = tl.load(positions_ptr + offs, mask=ok, other=0)
    draw = tl.load(draws_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, keyed_uniform(key, pos, draw), mask=ok)


def keyed_uniform_kernel(keys: Tensor, positions: Tensor, draws: Tensor, block: int = 128) -> Tensor:
    """The Triton uniforms of ``[N]`` int64 keys / positions / draws. Returns ``[N]`` float32."""
    for name, t in (("keys", keys), ("positions", positions), ("draws", draws)):
        check_tensor(name, t, 1, (torch.int64,))
    check_kernel_device(keys)
    out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    _keyed_uniform_kernel[(triton.cdiv(keys.numel(), block),)](keys, positions, draws, out, keys.numel(), BLOCK=block)
    return out
