"""Long-query (prefill chunk) attention: exact against a dense reference, and linear memory in the context.

A chunk after cached context runs as two flash-attention calls merged by log-sum-exp (engine/attention.py);
these tests pin that it equals dense masked attention (fp32 2e-5, bf16 2e-2), that chunked prefill equals
one-shot prefill through the real model runner path, and that no ``[q_len, kv_len]`` workspace is built.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache, paged_attention
from sparkserve.testing.tiny import tiny_target


def dense_reference(q, k_all, v_all, start: int, causal: bool, scale: float) -> torch.Tensor:
    """q [q_len, H, hd], k_all / v_all [kv_len, Hkv, hd] in position order -> [q_len, H, hd] (fp32 math)."""
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k_all.shape
    group = num_heads // num_kv_heads
    ks = k_all.float().repeat_interleave(group, 1).transpose(0, 1)  # [H, kv, hd]
    vs = v_all.float().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ ks.transpose(1, 2) * scale  # [H, q, kv]
    if causal:
        pos = torch.arange(kv_len)
        q_pos = torch.arange(start, start + q_len)
        scores = scores.masked_fill(~(pos[None, :] <= q_pos[:, None]), float("-inf"))
    return (F.softmax(scores, -1) @ vs).transpose(0, 1)


def run_chunk(start: int, q_len: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, causal: bool,
              block_size: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv_len = start + q_len
    num_blocks = kv_len // block_size + 3
    k_cache, v_cache = new_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    table = list(range(num_blocks))
    random.Random(seed).shuffle(table)
    k_all = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_all = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype)
    if start:  # the cached context, stored by an earlier step
        ctx = build_attention_metadata([start], [0], [start], [table], block_size)
        from sparkserve.engine.attention import store_kv
        store_kv(k_all[:start], v_all[:start], k_cache, v_cache, ctx.slot_mapping)
    meta = build_attention_metadata([q_len], [start], [kv_len], [table], block_size, causal=[causal])
    scale = head_dim ** -0.5
    out = paged_attention(q, k_all[start:], v_all[start:], k_cache, v_cache, meta, scale)
    return out, dense_reference(q, k_all, v_all, start, causal, scale)


@pytest.mark.parametrize("start,q_len", [(0, 40), (5, 17), (37, 64), (64, 100)])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)])
def test_long_chunk_matches_dense_fp32(start: int, q_len: int, heads: tuple[int, int]) -> None:
    out, ref = run_chunk(start, q_len, heads[0], heads[1], 16, torch.float32, causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_long_chunk_bf16_and_bidirectional() -> None:
    out, ref = run_chunk(48, 33, 6, 2, 32, torch.bfloat16, causal=True, seed=1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out, ref = run_chunk(48, 20, 6, 2, 32, torch.float32, causal=False, seed=2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_shot() -> None:
    """The tiny model's logits for a 90-token prompt: one chunk vs chunks of 17 / 30 / 43 (fp32)."""
    loaded = tiny_target(layers=2)
    model, config = loaded.model, loaded.config
    ids = torch.randint(0, config.vocab_size, (90,), generator=torch.Generator().manual_seed(3))
    block_size, num_blocks = 4, 40
    table = list(range(num_blocks))
    random.Random(4).shuffle(table)

    def prefill(chunks: list[int]) -> torch.Tensor:
        caches = [new_kv_cache(num_blocks, block_size, config.num_key_value_heads, config.head_dim, torch.float32)
                  for _ in range(config.num_hidden_layers)]
        rows, start = [], 0
        for n in chunks:
            meta = build_attention_metadata([n], [start], [start + n], [table], block_size)
            with torch.no_grad():
                hidden, _ = model(ids[start:start + n], torch.arange(start, start + n), caches, meta)
                rows.append(model.compute_logits(hidden))
            start += n
        return torch.cat(rows)

    torch.testing.assert_close(prefill([17, 30, 43]), prefill([90]), atol=1e-4, rtol=1e-4)


def test_attention_workspace_is_linear_in_context() -> None:
    """A 1,024-query chunk after 3,072 cached keys (2 heads, head dim 8): no allocation near q_len x kv_len.

    A dense bool mask alone would take 4 MiB, fp32 scores 32 MiB. What is allowed: the gathered context
    (H x kv_len x hd in the serving dtype, 128 KiB here) and the flash kernel's per-thread tile workspace,
    which does not grow with the context (~0.5 MiB per thread; the test runs one thread). Bound: 2 MiB.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        largest = _largest_allocation()
    finally:
        torch.set_num_threads(threads)
    assert 0 < largest <= 2 * 2**20, largest


def _largest_allocation() -> int:
    num_heads, num_kv_heads, head_dim, block_size = 2, 1, 8, 16
    start, q_len = 3072, 1024
    kv_len = start + q_len
    num_blocks = kv_len // block_size + 1
    k_cache, v_cache = new_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, torch.bfloat16)
    table = list(range(num_blocks))
    q = torch.randn(q_len, num_heads, head_dim, dtype=torch.bfloat16)
    k = torch.randn(q_len, num_kv_heads, head_dim, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        meta = build_attention_metadata([q_len], [start], [kv_len], [table], block_size)
        out = paged_attention(q, k, k.clone(), k_cache, v_cache, meta, head_dim ** -0.5)
    assert out.shape == (q_len, num_heads, head_dim) and torch.isfinite(out.float()).all()
    return max(e.cpu_memory_usage for e in prof.events())
