"""Paged attention over one flattened ragged batch (Triton), beside its pure-torch reference.

One kernel serves every kind of sequence of a step: prefill chunks (causal, with cached context before
them), single-token decode, multi-token verify blocks (causal inside the block) and non-causal drafter
blocks (bidirectional over context + block, ``engine/spec_decode/dspark.py``). The mask rule and the
tile groups are in ``kernels/attention_metadata.py``.

Algorithm: FlashAttention-2's online softmax (Dao 2023) over the paged KV cache, GQA by packing the G
query heads of one KV head into the rows of a tile (each K/V block is read once per tile, never
repeated), and split-KV (flash-decoding, Dao et al. 2023): ``num_splits`` programs per (tile, KV head)
each cover a chunk of the keys and write a normalised partial output with its log-sum-exp; a second
kernel combines them. In batch-invariant mode (``TileGroup.split_keys``, kernels/attention_metadata.py)
each split covers a fixed ``split_keys`` keys at absolute positions and the combine adds the splits in
increasing order (a sequential sum, so the trailing empty splits of a longer batch add exact zeros);
otherwise the splits are equal chunks of each tile's keys, combined by a tree sum. Scores are computed in base 2 (``exp2``, scale pre-multiplied by log2 e) and
accumulated in fp32 whatever the input dtype (fp32 dots use IEEE precision: no TF32).

Cache layout (``sparkserve.engine.attention.new_kv_cache``): head-major ``[Hkv, num_blocks, block_size, hd]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparkserve.kernels.attention_metadata import RaggedAttentionMetadata, TileGroup
from sparkserve.kernels.common import (
    FLOAT_DTYPES,
    check_kernel_device,
    check_tensor,
    interpreting,
    next_power_of_2,
)
from sparkserve.kernels.kv_store import store_kv

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of the attention kernel (tuned by ``benchmarks/bench_kernels.py`` on the GPU).

    Attributes:
        block_n: keys per inner iteration (power of two >= 16).
        num_warps / num_stages: Triton launch options (None = Triton's defaults).
    """

    block_n: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def launch_options(self) -> dict[str, int]:
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages)) if v is not None}


DEFAULT_CONFIG = AttentionConfig()


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RaggedAttentionMetadata,
                              scale: float) -> Tensor:
    """Pure-torch reference: one sequence at a time, K/V gathered through the block table, fp32 math.

    q: ``[T, H, hd]``; caches ``[Hkv, num_blocks, block_size, hd]``. Returns ``[T, H, hd]`` in q's dtype.
    """
    num_heads = q.shape[1]
    num_kv_heads, block_size = k_cache.shape[0], k_cache.shape[2]
    cu, kv_lens = meta.cu_seqlens_q.tolist(), meta.kv_lens.tolist()
    starts, causal = meta.start_pos.tolist(), meta.causal.tolist()
    out = torch.empty_like(q)
    for s in range(meta.num_seqs):
        pos = torch.arange(kv_lens[s], device=q.device)
        blocks = meta.block_tables[s].long()[pos // block_size]
        keys = k_cache[:, blocks, pos % block_size].float()  # [Hkv, L, hd]
        values = v_cache[:, blocks, pos % block_size].float()
        group = num_heads // num_kv_heads
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [H, L, hd]
        qs = q[cu[s]: cu[s + 1]].float().transpose(0, 1)  # [H, q_len, hd]
        scores = qs @ keys.transpose(1, 2) * scale  # [H, q_len, L]
        if causal[s]:
            q_pos = starts[s] + torch.arange(cu[s + 1] - cu[s], device=q.device)
            scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[cu[s]: cu[s + 1]] = (torch.softmax(scores, -1) @ values).transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, o_partial_ptr, lse_ptr,
    cu_seqlens_q_ptr, kv_lens_ptr, start_pos_ptr, causal_ptr, block_tables_ptr, tile_seq_ptr, tile_q_start_ptr,
    scale_log2, num_splits, scratch_rows, stride_qt, stride_qh, stride_ch, stride_cb, stride_cs, stride_bt, stride_ot, stride_oh,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    QUERIES_PER_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_KEYS: tl.constexpr,
):
    """One (tile, KV head, split): online softmax over the split's chunk of the tile's keys (``SPLIT_KEYS``
    > 0: keys ``[split * SPLIT_KEYS, (split + 1) * SPLIT_KEYS)``, the batch-invariant mode's fixed split)."""
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q_tile = tl.load(tile_q_start_ptr + tile)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    kv_len = tl.load(kv_lens_ptr + seq)
    start = tl.load(start_pos_ptr + seq)
    causal = tl.load(causal_ptr + seq)  # 1 = causal
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile + rows // QUERIES_PER_KV  # query token of each row, within the sequence
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_ok = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_idx < q_len)
    q_pos = start + q_idx
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_begin + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    last_pos = start + tl.minimum(q_tile + BLOCK_Q, q_len) - 1
    kv_end = tl.where(causal != 0, tl.minimum(kv_len, last_pos + 1), kv_len)  # keys any row of the tile sees
    if SPLIT_KEYS > 0:
        chunk = SPLIT_KEYS
    else:
        chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_lo + chunk, kv_end)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    head_base = kv_head.to(tl.int64) * stride_ch
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = kv_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_hi
        block = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        c_off = head_base + block.to(tl.int64) * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N]
        k = tl.load(k_cache_ptr + c_off[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + c_off[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        visible = k_ok[None, :] & ((k_pos[None, :] <= q_pos[:, None]) | (causal == 0))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if UPCAST:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tok = q_begin + q_idx
    if SPLIT:  # scratch rows are the tile's (tile * BLOCK_Q + query within the tile), not the step's tokens
        p_row = tile.to(tl.int64) * scratch_rows + rows // QUERIES_PER_KV
        p_off = split.to(tl.int64) * stride_ps + p_row[:, None] * stride_pt + head[:, None] * stride_ph + dims[None, :]
        tl.store(o_partial_ptr + p_off, o, mask=row_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + p_row * stride_lt + head, lse, mask=row_ok)
    else:
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    out_ptr, o_partial_ptr, lse_ptr, cu_seqlens_q_ptr, tile_seq_ptr, tile_q_start_ptr, num_splits, scratch_rows,
    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    BLOCK_Q: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, FIXED_ORDER: tl.constexpr,
):
    """One (tile, query head): out = sum_s exp2(lse_s - max) o_s / sum_s exp2(lse_s - max); the sums in
    increasing s with ``FIXED_ORDER`` (batch-invariant mode), else a tree sum over ``SPLITS_PAD``."""
    tile, head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    q_tile = tl.load(tile_q_start_ptr + tile)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    for i in range(0, BLOCK_Q):
        if q_tile + i < q_len:
            tok = q_begin + q_tile + i
            p_row = tile.to(tl.int64) * scratch_rows + i  # the tile's scratch row
            lse = tl.load(lse_ptr + splits.to(tl.int64) * stride_ls + p_row * stride_lt + head,
                          mask=splits < num_splits, other=float("-inf"))
            lse_max = tl.max(lse, 0)  # a max: exact in any order
            if FIXED_ORDER:
                o = tl.zeros([HEAD_DIM], tl.float32)
                total = tl.zeros([1], tl.float32)
                for s in range(0, num_splits):
                    w = tl.exp2(tl.load(lse_ptr + s * stride_ls + p_row * stride_lt + head + tl.zeros([1], tl.int64))
                                - lse_max)  # [1]
                    o += tl.load(o_partial_ptr + s * stride_ps + p_row * stride_pt + head * stride_ph + dims) * w
                    total += w
                o = o / total
            else:
                weight = tl.exp2(lse - lse_max)  # [SPLITS_PAD]
                o_off = splits[:, None].to(tl.int64) * stride_ps + p_row * stride_pt + head * stride_ph + dims[None, :]
                o = tl.load(o_partial_ptr + o_off, mask=(splits < num_splits)[:, None], other=0.0)
                o = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
            tl.store(out_ptr + tok * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RaggedAttentionMetadata, scale: float,
                    out: Tensor | None = None, config: AttentionConfig = DEFAULT_CONFIG) -> Tensor:
    """Attention of every query row over its sequence's paged context (module docstring).

    Args:
        q: ``[T, H, hd]`` fp32 / fp16 / bf16, contiguous; hd a power of two >= 16 (64, 128 served).
        k_cache, v_cache: ``[Hkv, num_blocks, block_size, hd]``, q's dtype, contiguous.
        meta: from ``build_ragged_metadata`` with ``num_queries_per_kv == H / Hkv``.
        scale: softmax scale (usually hd ** -0.5).
        out: optional ``[T, H, hd]`` output buffer (q's dtype).
        config: launch parameters.
    Returns:
        ``[T, H, hd]`` in q's dtype.
    Raises:
        ValueError: bad dtype / shape / contiguity, or tensors the kernel cannot run on.
    """
    _check(q, k_cache, v_cache, meta)
    out = torch.empty_like(q) if out is None else out
    upcast = interpreting() and q.dtype == torch.bfloat16  # the interpreter's dot mishandles bf16
    for group in meta.groups:
        _launch(q, k_cache, v_cache, meta, group, scale, out, config, upcast)
    return out


def _launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RaggedAttentionMetadata, group: TileGroup,
            scale: float, out: Tensor, config: AttentionConfig, upcast: bool) -> None:
    """One tile group: the attention kernel, then (split-KV) the combine kernel."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    splits = group.num_splits
    # split scratch: scratch_rows per tile (the group's longest query), not all T tokens of the step
    scratch_rows = min(group.block_q, group.max_q_len)
    rows = group.num_tiles * scratch_rows
    partial = torch.empty((splits, rows, num_heads, head_dim), dtype=torch.float32, device=q.device) \
        if splits > 1 else out
    lse = torch.empty((splits, rows, num_heads), dtype=torch.float32, device=q.device) if splits > 1 else out
    grid = (group.num_tiles, k_cache.shape[0], splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, partial, lse, meta.cu_seqlens_q, meta.kv_lens, meta.start_pos, meta.causal,
        meta.block_tables, group.tile_seq, group.tile_q_start, scale * LOG2E, splits, scratch_rows,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1), partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
        lse.stride(1),
        QUERIES_PER_KV=meta.num_queries_per_kv, BLOCK_Q=group.block_q, BLOCK_M=group.block_m,
        BLOCK_N=config.block_n, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2], SPLIT=splits > 1, UPCAST=upcast,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SPLIT_KEYS=group.split_keys,
        **config.launch_options(),
    )
    if splits > 1:
        _combine_splits_kernel[(group.num_tiles, num_heads)](
            out, partial, lse, meta.cu_seqlens_q, group.tile_seq, group.tile_q_start, splits, scratch_rows,
            out.stride(0), out.stride(1), partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
            lse.stride(1), BLOCK_Q=group.block_q, SPLITS_PAD=next_power_of_2(splits), HEAD_DIM=head_dim,
            FIXED_ORDER=group.split_keys > 0,
        )


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: RaggedAttentionMetadata) -> None:
    """Wrapper-entry checks (ValueError on failure)."""
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, (q.dtype,))
    check_tensor("v_cache", v_cache, 4, (q.dtype,))
    check_kernel_device(q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    if k_cache.shape[3] != head_dim or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} must match the cache ({k_cache.shape[3]}) and be a power of two >= 16")
    if num_heads % num_kv_heads or num_heads // num_kv_heads != meta.num_queries_per_kv:
        raise ValueError(f"{num_heads} query heads / {num_kv_heads} KV heads != metadata's G={meta.num_queries_per_kv}")
    if num_tokens != meta.num_tokens or k_cache.shape[2] != meta.block_size:
        raise ValueError(f"q has {num_tokens} rows / cache block size {k_cache.shape[2]}; metadata says "
                         f"{meta.num_tokens} / {meta.block_size}")


def store_and_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     meta: RaggedAttentionMetadata, scale: float) -> Tensor:
    """Drop-in for ``sparkserve.engine.attention.paged_attention``: store this step's K/V ``[T, Hkv, hd]`` through
    ``meta.slot_mapping``, then attend. Returns ``[T, H, hd]``."""
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, scale)


def default_scale(head_dim: int) -> float:
    """The usual softmax scale ``hd ** -0.5``."""
    return 1.0 / math.sqrt(head_dim)
