"""Store new keys / values into the head-major paged KV cache through the slot mapping (Triton).

Every new token of a step (prefill chunk, decode token, verify block, drafter context row) has one flat
cache slot ``block_id * block_size + offset`` (``slot_mapping``); its K and V rows ``[Hkv, hd]`` go to
``cache[h, block_id, offset, :]`` for every KV head h. Reference: ``sparkserve.engine.attention.store_kv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparkserve.kernels.common import (
    FLOAT_DTYPES,
    check_kernel_device,
    check_same_device,
    check_tensor,
    next_power_of_2,
)

__all__ = ["store_kv"]


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ch, stride_cb, stride_cs,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr,
):
    """One token: its ``[Hkv, hd]`` K and V rows into their slot of every head's cache."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)  # int64
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = (heads < num_kv_heads)[:, None]
    row = token.to(tl.int64)
    dst = heads[:, None].to(tl.int64) * stride_ch + block * stride_cb + offset * stride_cs + dims[None, :]
    k = tl.load(k_ptr + row * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=ok)
    v = tl.load(v_ptr + row * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(
    k: Tensor,  # [T, Hkv, hd]
    v: Tensor,  # [T, Hkv, hd]
    k_cache: Tensor,  # [Hkv, num_blocks, block_size, hd]
    v_cache: Tensor,  # [Hkv, num_blocks, block_size, hd]
    slot_mapping: Tensor,  # [T] int64
) -> None:
    """Write ``k`` / ``v`` into their cache slots in place (cast to the cache dtype).

    ``k`` and ``v`` may be strided views (the model's split of its fused QKV output: rows ``(H + 2 Hkv) hd``
    apart) as long as each head's ``hd`` values are contiguous (last stride 1); each has its own strides.

    Slots must be distinct within one call (as the scheduler guarantees); a padded row (CUDA-graph
    buckets) should point at a scratch slot no sequence reads.

    Raises:
        ValueError: bad dtype / shape / contiguity / device.
    """
    check_tensor("k", k, 3, FLOAT_DTYPES, contiguous=False)
    check_tensor("v", v, 3, (k.dtype,), contiguous=False)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, (k_cache.dtype,))
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,))
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_kernel_device(k)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} or the two caches differ in shape")
    if k_cache.shape[0] != num_kv_heads or k_cache.shape[3] != head_dim or slot_mapping.numel() != num_tokens:
        raise ValueError(f"k {tuple(k.shape)}, cache {tuple(k_cache.shape)}, slot_mapping {slot_mapping.numel()} disagree")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"k / v need a unit stride over the head dim, got {k.stride()} / {v.stride()}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} must be a power of two")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, num_kv_heads, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, HEADS_PAD=next_power_of_2(num_kv_heads),
    )
