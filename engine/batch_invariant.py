"""Batch-invariant mode (``--batch-invariant``): every reducing op computes each row in one fixed order.

A row's output bits then depend only on the row itself (its token, its position and, for attention, the
keys at positions it may see), never on how many other rows share the step, how the prompt was chunked,
or whether its context came from the prefix cache. The idea and the term are vLLM's batch-invariant mode
(Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025: fixed-split matmul, attention and
reductions); this is the CPU torch version.

* **int4 linears** (engine/quant.py ``Int4Weight.invariant_path``): one family of kernels for every row
  count, prefill included: the weight-stationary kernel (``int4_ws``, kernels/int4_cpu.py: one fp32 fma
  chain per output in increasing k, invariant by construction) and torch's int4 kernel (``int4_gemv``)
  where ``engine.quant.int4_kernels_agree`` finds it computes the same bits (it does on AVX-512 and AVX2 here; not
  on ATen's unvectorised path). So decode keeps the int4 speed and a row's bits never depend on the
  batch; the dense copy is not used for these weights in the mode (its bf16 rounding differs).
* **Other linears** (:func:`invariant_linear`: dense models, int8, an int4 weight without a kernel
  format): the dense GEMM on the canonical weights for every row count,
  with the rows padded (zeros) to a multiple of ``ROW_TILE``. Measured on this project's CPUs (oneDNN
  bf16, MKL fp32; AVX-512 and AVX2): in fp32 MKL takes another K order for 1-3, 5, 7 and 9 rows, never
  for a multiple of 4; bf16 gives every row count the same bits.
* **Attention** (:func:`invariant_attention`): each query row attends to its visible keys in fixed chunks
  of ``KV_CHUNK`` keys at absolute positions ``[c * KV_CHUNK, (c + 1) * KV_CHUNK)``; the scores of a
  chunk are one matmul of fixed inner size (head_dim) and width (``KV_CHUNK``), the softmax max is
  exact, and the chunks' sums and ``P @ V`` partials are added in increasing chunk order (chunks past the
  row's context add exact zeros). Cached and fresh keys are read the same way (from the cache, after this
  step's keys are stored), so one-chunk prefill, chunked prefill and a prefix-cache hit agree.
* Norms (RMSNorm per row), RoPE, the LM head (a linear), the sampler and the verifier are per-row ops
  already; the engine-level checks in tests/engine/test_batch_invariant.py cover them.

The mode is a context (:func:`batch_invariant_mode`) the model runner enters around a step, so one loaded
model can serve engines with the mode on and off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sparkserve.engine.attention import AttentionMetadata, PrefillSeq

ROW_TILE = 4  # linears: rows padded to a multiple of this (MKL fp32 orders K alike for every multiple of 4)
KV_CHUNK = 256  # attention: keys per fixed chunk (absolute positions)
Q_TILE = 256  # attention: query rows per matmul for long sequences (rows are independent: any tiling)

_ENABLED: ContextVar[bool] = ContextVar("sparkserve_batch_invariant", default=False)


@contextmanager
def batch_invariant_mode(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed ops (of this thread / task) in batch-invariant mode when ``enabled``."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_enabled() -> bool:
    """Whether the current context runs in batch-invariant mode."""
    return _ENABLED.get()


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of ``ROW_TILE`` (at least one tile)."""
    return max(ROW_TILE, -(-rows // ROW_TILE) * ROW_TILE)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose row ``i`` has the same bits whatever the number of rows.

    Args:
        x: [M, K] activations.
        weight: [N, K] dense weight (the canonical values).
        bias: [N] or None.
    Returns:
        [M, N] in x's dtype.
    """
    rows = x.shape[0]
    padded = padded_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    return F.linear(x, weight, bias)[:rows]


def chunked_attention(
    q: torch.Tensor,  # [Hkv, S, M, hd], M a multiple of ROW_TILE
    keys: torch.Tensor,  # [Hkv, S, L, hd], L a multiple of KV_CHUNK
    values: torch.Tensor,  # [Hkv, S, L, hd]
    visible: torch.Tensor,  # [S, M, L] bool, True = may attend; every row sees at least one key
    scale: float,
) -> torch.Tensor:  # [Hkv, S, M, hd] in q's dtype
    """Softmax attention of each row over its visible keys in fixed ``KV_CHUNK``-key chunks.

    Per chunk c: scores ``s_c = q @ k_c^T`` (a matmul of inner size hd and width KV_CHUNK), the row
    maximum over every chunk (exact), ``e = exp(s - max)``, the chunk sums ``l_c`` (a sum over KV_CHUNK
    keys) and partial outputs ``o_c = e_c @ v_c``; then ``l`` and ``o`` are added in increasing chunk
    order (a sequential cumulative sum) and ``o / l`` is returned. A chunk past a row's context holds
    only masked keys: its ``e`` is exactly 0, so it adds exact zeros after the row's own chunks, and
    the row's bits do not depend on the padded length L, on S or on M.
    """
    num_kv_heads, seqs, rows, head_dim = q.shape
    length = keys.shape[2]
    chunks = length // KV_CHUNK
    k_chunks = keys.reshape(num_kv_heads, seqs, chunks, KV_CHUNK, head_dim)
    v_chunks = values.reshape(num_kv_heads, seqs, chunks, KV_CHUNK, head_dim)
    scores = torch.matmul(q.unsqueeze(2), k_chunks.transpose(-1, -2)).float() * scale  # [Hkv, S, n, M, C]
    mask = visible.view(seqs, rows, chunks, KV_CHUNK).transpose(1, 2)  # [S, n, M, C]
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=(2, 4), keepdim=True)  # [Hkv, S, 1, M, 1] (a max: exact in any order)
    e = torch.exp(scores - row_max)  # [Hkv, S, n, M, C]
    sums = e.sum(-1).cumsum(2)[:, :, -1]  # [Hkv, S, M]
    partial = torch.matmul(e.to(q.dtype), v_chunks).float()  # [Hkv, S, n, M, hd]
    out = partial.cumsum(2)[:, :, -1] / sums.unsqueeze(-1)  # [Hkv, S, M, hd]
    return out.to(q.dtype)


def fused_rows_metadata(meta: AttentionMetadata) -> AttentionMetadata:
    """``meta`` with every sequence's query rows in the short group's format (``short_q_index`` [S, q_max],
    ``short_q_valid``, ``short_block_tables`` [S, max_blocks]) and no long sequence left: the fused CPU step
    (kernels/fused_cpu.py ``rope_store_attend``) then serves prefill chunks too.

    The mode runs every CPU step through the fused ops when they serve the model (``LlamaForCausalLM._fused``),
    so a position's bits never depend on whether it was prefilled or decoded: the fused attention computes each
    query row over its keys 0 .. position in one sequential order (one fp32 dot per key, one softmax sum, one
    ``P @ V`` accumulation in key order), whatever the other rows of the call. A long sequence's rows are listed
    in zig-zag order (first, last, second, second to last ...): the causal row costs grow with the position, and
    each pair costs the same, so the op's static split of rows over threads is balanced; the order changes no
    row's bits. The dense mask and the scatter indices of the eager short group are dropped (unused).
    Raises ValueError for a bidirectional sequence (a drafter block: the fused attention is causal).
    """
    index = [] if meta.short_q_index is None else [meta.short_q_index]  # each [S_i, q_max_i]
    valid = [] if meta.short_q_valid is None else [meta.short_q_valid]
    tables = [] if meta.short_block_tables is None else [meta.short_block_tables]
    for seq in meta.prefills:
        if not seq.causal:
            raise ValueError("the fused step attends causally: a bidirectional block cannot run through it")
        i = torch.arange(seq.q_len)
        zigzag = torch.where(i % 2 == 0, i // 2, seq.q_len - 1 - i // 2)  # [q_len] each row once
        index.append((seq.q_start + zigzag)[None].to(seq.slots.device))
        valid.append(torch.ones(1, seq.q_len, dtype=torch.bool, device=seq.slots.device))
        tables.append((seq.slots[::meta.block_size] // meta.block_size)[None])  # [1, ceil(kv_len / block)]
    q_max = max(t.shape[1] for t in index)
    blocks = max(t.shape[1] for t in tables)
    return replace(meta, short_q_index=torch.cat([_pad_to(t, 1, q_max) for t in index]),
                   short_q_valid=torch.cat([_pad_to(t, 1, q_max, False) for t in valid]),
                   short_block_tables=torch.cat([_pad_to(t, 1, blocks) for t in tables]).contiguous(),
                   short_mask=None, short_dst=None, short_src=None, prefills=[], _bias={})


def _pad_to(x: torch.Tensor, dim: int, size: int, value: float | bool = 0) -> torch.Tensor:
    """``x`` padded with ``value`` at the end of ``dim`` to ``size``."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad, value=value)


def _group_rows(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[S, q_len, H, hd] -> [Hkv, S, G * q_len padded to ROW_TILE, hd] (row ``g * q_len + i``: query i
    of the g-th head sharing the KV head)."""
    seqs, q_len, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    grouped = q.view(seqs, q_len, num_kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    grouped = grouped.reshape(num_kv_heads, seqs, group * q_len, head_dim)
    return _pad_to(grouped, 2, padded_rows(group * q_len))


def _group_visible(visible: torch.Tensor, group: int, rows: int, length: int) -> torch.Tensor:
    """[S, q_len, L0] -> [S, rows, length]: repeated for the G heads, padded rows see key 0 only."""
    seqs, q_len, _ = visible.shape
    grouped = visible[:, None].expand(seqs, group, q_len, visible.shape[2]).reshape(seqs, group * q_len, -1)
    grouped = _pad_to(_pad_to(grouped, 2, length, False), 1, rows, False)
    grouped[:, group * q_len:, 0] = True
    return grouped


def _ungroup(o: torch.Tensor, group: int, q_len: int) -> torch.Tensor:
    """[Hkv, S, M, hd] -> [S, q_len, H, hd] (the real rows of :func:`_group_rows`)."""
    num_kv_heads, seqs, _, head_dim = o.shape
    o = o[:, :, :group * q_len].reshape(num_kv_heads, seqs, group, q_len, head_dim)
    return o.permute(1, 3, 0, 2, 4).reshape(seqs, q_len, num_kv_heads * group, head_dim)


def _chunked_length(keys: int) -> int:
    """``keys`` rounded up to whole KV chunks."""
    return max(KV_CHUNK, -(-keys // KV_CHUNK) * KV_CHUNK)


def invariant_attention(
    q: torch.Tensor,  # [T, H, hd]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd], this step's keys already stored
    v_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, hd]
    """engine/attention.py's paged attention in batch-invariant mode: the same visibility rule (the short
    group's mask; causal or bidirectional for each long sequence), every row through
    :func:`chunked_attention` over keys read from the cache."""
    out = q.new_empty(q.shape)
    if meta.short_q_index is not None:
        _short_group(q, k_cache, v_cache, meta, scale, out)
    for seq in meta.prefills:
        out[seq.q_start:seq.q_end] = _long_sequence(q, k_cache, v_cache, seq, scale)
    return out


def _short_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor) -> None:
    """The padded short group (decode, verify and drafter blocks) in one chunked attention; writes ``out``."""
    tables = meta.short_block_tables  # [S, nb]
    seqs, blocks = tables.shape
    num_kv_heads, _, _, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    length = _chunked_length(blocks * meta.block_size)
    padded = -(-length // meta.block_size)  # blocks covering the chunks (padding reads block 0, masked)
    flat = _pad_to(tables, 1, padded).flatten()
    keys = k_cache.index_select(1, flat).view(num_kv_heads, seqs, -1, head_dim)[:, :, :length].to(q.dtype)
    values = v_cache.index_select(1, flat).view(num_kv_heads, seqs, -1, head_dim)[:, :, :length].to(q.dtype)
    q_max = meta.short_q_index.shape[1]
    q_pad = q.index_select(0, meta.short_q_index.flatten()).view(seqs, q_max, num_heads, head_dim)
    q_rows = _group_rows(q_pad, num_kv_heads)  # [Hkv, S, M, hd]
    visible = _group_visible(meta.short_mask[:, 0], group, q_rows.shape[2], length)
    o = _ungroup(chunked_attention(q_rows, keys, values, visible, scale), group, q_max)
    o = o.reshape(seqs * q_max, num_heads, head_dim)
    if meta.short_src is None:
        out.index_copy_(0, meta.short_dst, o)
    else:
        out.index_copy_(0, meta.short_dst, o.index_select(0, meta.short_src))


def _long_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq: PrefillSeq,
                   scale: float) -> torch.Tensor:
    """One long sequence's queries in tiles of ``Q_TILE`` rows; returns [q_len, H, hd]."""
    num_kv_heads, _, _, head_dim = k_cache.shape
    group = q.shape[1] // num_kv_heads
    length = _chunked_length(seq.kv_len)
    slots = _pad_to(seq.slots, 0, length)  # padding reads slot 0, masked
    keys = k_cache.view(num_kv_heads, -1, head_dim).index_select(1, slots).to(q.dtype).unsqueeze(1)
    values = v_cache.view(num_kv_heads, -1, head_dim).index_select(1, slots).to(q.dtype).unsqueeze(1)
    key_pos = torch.arange(length, device=q.device)
    outs = []
    for first in range(0, seq.q_len, Q_TILE):
        last = min(seq.q_len, first + Q_TILE)
        q_pos = torch.arange(seq.start_pos + first, seq.start_pos + last, device=q.device)
        visible = (key_pos[None, :] < seq.kv_len).expand(last - first, length)
        if seq.causal:
            visible = visible & (key_pos[None, :] <= q_pos[:, None])
        q_rows = _group_rows(q[seq.q_start + first:seq.q_start + last][None], num_kv_heads)
        grouped = _group_visible(visible[None], group, q_rows.shape[2], length)
        outs.append(_ungroup(chunked_attention(q_rows, keys, values, grouped, scale), group, last - first)[0])
    return torch.cat(outs)
