"""Fused Gumbel-max coupled choice (Triton): ``argmax_v(processed[n, v] + Gumbel(key_n, pos_n, TOKEN, v))``.

The torch version (``sparkserve.engine.sampling.draw.coupled_choice``, the reference) materialises ``[N, V]`` noise; here each
program streams its rows' logits once, hashing the noise for every token on the fly (the keyed hash of
``kernels/keyed_hash.py``: uniforms bit-identical to torch's; ``-log(-log(u))`` up to the device's log
rounding, so choices agree except at Gumbel-perturbed near-ties of ~1e-6).

Seeded rows verify by agreement with this choice (``engine/spec_decode/verifier.py``); a drafter that
draws with the same noise proposes the same token whenever its distribution agrees.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparkserve.kernels.common import check_kernel_device, check_tensor, interpreting, next_power_of_2
from sparkserve.kernels.keyed_hash import keyed_gumbel, row_state
from sparkserve.kernels.keyed_random import Draw

__all__ = ["coupled_choice"]

DEFAULT_BLOCK_V = 1024
INTERPRETER_BLOCK_R = 4096


@triton.jit
def _coupled_choice_kernel(logits_ptr, keys_ptr, positions_ptr, out_ptr, stride_l, num_rows, vocab,
                           DRAW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_R rows: running max / argmax of logits + keyed Gumbel noise over the vocabulary."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    key = tl.load(keys_ptr + rows, mask=ok, other=0)
    pos = tl.load(positions_ptr + rows, mask=ok, other=0)
    state = row_state(key, pos, tl.zeros_like(pos) + DRAW)[:, None]  # [BLOCK_R, 1]
    base = rows.to(tl.int64)[:, None] * stride_l
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        idx = (v0 + tl.arange(0, BLOCK_V))[None, :]
        in_vocab = idx < vocab
        z = tl.load(logits_ptr + base + idx, mask=ok[:, None] & in_vocab, other=float("-inf"))
        val = tl.where(in_vocab, z + keyed_gumbel(state, idx), float("-inf"))
        block_best = tl.max(val, 1)
        arg = tl.where(block_best > best, v0 + tl.argmax(val, 1), arg)
        best = tl.maximum(best, block_best)
    tl.store(out_ptr + rows, arg.to(tl.int64), mask=ok)


def coupled_choice(processed: Tensor, keys: Tensor, positions: Tensor, block_v: int = DEFAULT_BLOCK_V,
                   block_r: int | None = None) -> Tensor:
    """Gumbel-max choice of each row.

    Args:
        processed: ``[N, V']`` fp32 processed logits (temperature / top-k / top-p / min-p applied;
            ``-inf`` = excluded); rows must be contiguous.
        keys, positions: ``[N]`` int64 request keys and the sequence position of the token chosen.
        block_r: rows per program (None: 1 on CUDA, ``INTERPRETER_BLOCK_R`` in the interpreter).
    Returns:
        ``[N]`` int64 token ids.
    Raises:
        ValueError: bad dtypes / shapes / contiguity.
    """
    check_tensor("processed", processed, 2, (torch.float32,), contiguous=False)
    if processed.stride(1) != 1:
        raise ValueError("processed rows must be contiguous")
    check_tensor("keys", keys, 1, (torch.int64,))
    check_tensor("positions", positions, 1, (torch.int64,))
    check_kernel_device(processed)
    num_rows, vocab = processed.shape
    if keys.numel() != num_rows or positions.numel() != num_rows:
        raise ValueError(f"{num_rows} rows but {keys.numel()} keys / {positions.numel()} positions")
    out = torch.empty(num_rows, dtype=torch.int64, device=processed.device)
    if num_rows == 0:
        return out
    block_r = block_r or (INTERPRETER_BLOCK_R if interpreting() else 1)
    _coupled_choice_kernel[(triton.cdiv(num_rows, block_r),)](
        processed, keys, positions, out, processed.stride(0), num_rows, vocab,
        DRAW=int(Draw.TOKEN), BLOCK_R=block_r, BLOCK_V=min(block_v, next_power_of_2(vocab)),
    )
    return out
