"""GPU microbenchmarks of the kernels (``scripts/gpu_check.py`` phase 2; off CUDA only as a smoke test).

Every number is a median from ``triton.testing.do_bench`` (L2 flushed before each call), so the decode
cells read their K/V from HBM. Bandwidth counts bytes read + written (K/V of every context token once,
q, block tables, the output), the same convention as the device-to-device copy it is compared with.
Shapes follow SmolLM2-135M (9 query heads, 3 KV heads, head dim 64, bf16, block size 16).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparkserve.kernels.attention_metadata import build_ragged_metadata
from sparkserve.kernels.paged_attention import AttentionConfig, paged_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
DECODE_BATCHES, CONTEXTS, VERIFY_Q_LEN = (32, 64, 128, 256), (2048, 4096, 8192), 8
TUNE_CELLS = ((32, 8192), (256, 2048))
CONFIGS = (AttentionConfig(64, 4, 2), AttentionConfig(64, 4, 3), AttentionConfig(128, 4, 3), AttentionConfig(128, 8, 3),
           AttentionConfig(32, 2, 3), AttentionConfig(64, 8, 4))


def time_ms(fn: Callable[[], object], rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn``: triton ``do_bench`` on CUDA; off CUDA (the interpreter smoke test)
    the median of three plain calls."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes / s, counting bytes read + written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=default_device())
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3)


@dataclass(frozen=True)
class Pool:
    """One layer's bf16 KV cache sized for the largest cell, shared by all cells."""

    k_cache: Tensor
    v_cache: Tensor
    perm: Tensor  # random physical block order

    @classmethod
    def for_cells(cls, batch: int, context: int, dtype: torch.dtype = torch.bfloat16) -> Pool:
        """Blocks for ``batch`` sequences of ``context`` tokens."""
        blocks = batch * -(-context // BLOCK_SIZE)
        shape = (NUM_KV_HEADS, blocks, BLOCK_SIZE, HEAD_DIM)
        k = torch.randn(shape, dtype=dtype, device=default_device())
        return cls(k, torch.randn_like(k), torch.randperm(blocks, device=k.device).int())

    def tables(self, batch: int, context: int) -> Tensor:
        per_seq = -(-context // BLOCK_SIZE)
        return self.perm[: batch * per_seq].view(batch, per_seq)


@dataclass(frozen=True)
class AttentionCell:
    """One (batch, context, q_len) measurement."""

    batch: int
    context: int
    q_len: int
    kernel_ms: float
    bytes_moved: int
    bandwidth_tb_s: float
    fraction_of_copy: float
    num_splits: int
    sdpa_ms: float | None = None
    gather_ms: float | None = None


def attention_cell(pool: Pool, batch: int, context: int, q_len: int, copy_bw: float, config: AttentionConfig,
                   with_sdpa: bool) -> AttentionCell:
    """Decode (q_len 1) or verify-block (q_len 1 + drafts) attention of ``batch`` sequences whose context
    ends with their query tokens, one layer."""
    tables = pool.tables(batch, context)
    meta = build_ragged_metadata([q_len] * batch, [context - q_len] * batch, [context] * batch, tables, BLOCK_SIZE,
                                 NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, device=pool.k_cache.device,
                                 max_kv_len=context)
    q = torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, dtype=pool.k_cache.dtype, device=pool.k_cache.device)
    out = torch.empty_like(q)
    ms = time_ms(lambda: paged_attention(q, pool.k_cache, pool.v_cache, meta, HEAD_DIM**-0.5, out=out, config=config))
    item = q.element_size()
    moved = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * item + 2 * q.numel() * item + tables.numel() * 4
    bw = moved / (ms * 1e-3)
    sdpa_ms = gather_ms = None
    if with_sdpa:
        sdpa_ms, gather_ms = _sdpa_baseline(pool, tables, q, batch, context, q_len)
    return AttentionCell(batch, context, q_len, ms, moved, bw / 1e12, bw / copy_bw, meta.groups[0].num_splits,
                         sdpa_ms, gather_ms)


def _sdpa_baseline(pool: Pool, tables: Tensor, q: Tensor, batch: int, context: int, q_len: int) -> tuple[float, float]:
    """(SDPA on pre-gathered K/V, the gather itself) in ms: the torch path's two costs. K/V are gathered
    and repeated to the query heads ([B, H, L, hd], contiguous), so SDPA may take its fused masked kernel
    (memory-efficient attention) rather than the math fallback a GQA + mask call can get."""
    flat = tables.flatten().long()
    group = NUM_HEADS // NUM_KV_HEADS

    def gather(cache: Tensor) -> Tensor:  # [Hkv, B*nb, bs, hd] -> [B, H, L, hd]
        kv = cache.index_select(1, flat).view(NUM_KV_HEADS, batch, -1, HEAD_DIM)[:, :, :context].transpose(0, 1)
        return kv.repeat_interleave(group, dim=1).contiguous()

    keys, values = gather(pool.k_cache), gather(pool.v_cache)
    qs = q.view(batch, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)  # [B, H, q_len, hd]
    pos = torch.arange(context, device=q.device)
    mask = pos[None, :] <= (context - q_len + torch.arange(q_len, device=q.device))[:, None]  # [q_len, L]
    sdpa = time_ms(lambda: F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask))
    gathered = time_ms(lambda: (gather(pool.k_cache), gather(pool.v_cache)))
    return sdpa, gathered


def tune(pool: Pool, copy_bw: float, cells: Sequence[tuple[int, int]], configs: Sequence[AttentionConfig] = CONFIGS,
         ) -> tuple[AttentionConfig, list[dict]]:
    """The config with the best mean decode bandwidth over ``cells`` (batch, context), and every result."""
    results = []
    for config in configs:
        bws = [attention_cell(pool, b, c, 1, copy_bw, config, False).fraction_of_copy for b, c in cells]
        results.append({"config": asdict(config), "mean_fraction_of_copy": sum(bws) / len(bws)})
    best = max(range(len(configs)), key=lambda i: results[i]["mean_fraction_of_copy"])
    return configs[best], results


def sampling_cells(num_requests: int = 256, num_drafts: int = 7, vocab: int = 49152) -> dict[str, float]:
    """Milliseconds of the rejection and coupled-choice kernels vs their torch references at serving size."""
    from sparkserve.engine.sampling.draw import coupled_choice as torch_coupled
    from sparkserve.engine.spec_decode.rejection import DraftProbs, RaggedDrafts, verify_by_rejection
    from sparkserve.kernels.coupling import coupled_choice
    from sparkserve.kernels.keyed_random import keyed_uniform
    from sparkserve.kernels.rejection import FlatVerifyInput, rejection_sample

    dev = default_device()
    rows, drafts_n = num_requests * (1 + num_drafts), num_requests * num_drafts
    p = torch.softmax(torch.randn(rows, vocab, device=dev), -1)
    q = torch.softmax(torch.randn(drafts_n, vocab, device=dev), -1)
    ids = torch.randint(0, vocab, (drafts_n,), device=dev)
    cu = torch.arange(0, drafts_n + 1, num_drafts, dtype=torch.int32, device=dev)
    keys = torch.randint(0, 2**62, (num_requests,), device=dev)
    pos = torch.arange(num_requests, device=dev)
    one_hot = torch.zeros(drafts_n, dtype=torch.bool, device=dev)
    inp = FlatVerifyInput(ids, cu, num_drafts, torch.zeros(num_requests, dtype=torch.bool, device=dev),
                          torch.zeros(rows, dtype=torch.int64, device=dev), p, q, one_hot, keys, pos,
                          torch.zeros_like(pos))
    ragged = RaggedDrafts(ids, (num_drafts,) * num_requests)
    u_d = keyed_uniform(keys.repeat_interleave(num_drafts), pos.repeat_interleave(num_drafts), 1)
    u_r = keyed_uniform(keys, pos, 2)
    logits = torch.randn(rows, vocab, device=dev)
    row_keys, row_pos = keys.repeat_interleave(1 + num_drafts), torch.arange(rows, device=dev)
    return {
        "rejection_kernel_ms": time_ms(lambda: rejection_sample(inp)),
        "rejection_torch_ms": time_ms(lambda: verify_by_rejection(ragged, p, DraftProbs(q, one_hot), u_d, u_r, u_r)),
        "coupled_kernel_ms": time_ms(lambda: coupled_choice(logits, row_keys, row_pos)),
        "coupled_torch_ms": time_ms(lambda: torch_coupled(logits, row_keys, row_pos)),
    }


@dataclass(frozen=True)
class BenchPlan:
    """What phase 2 measures (the defaults are the issue's cells; tests use tiny ones)."""

    batches: tuple[int, ...] = DECODE_BATCHES
    contexts: tuple[int, ...] = CONTEXTS
    verify_q_len: int = VERIFY_Q_LEN
    tune_cells: tuple[tuple[int, int], ...] = TUNE_CELLS
    configs: tuple[AttentionConfig, ...] = CONFIGS
    copy_bytes: int = 1 << 30
    sampling: tuple[int, int, int] = (256, 7, 49152)  # requests, drafts each, vocabulary


def run_benchmarks(seconds_left: Callable[[], float], plan: BenchPlan = BenchPlan()) -> dict:
    """Phase 2 of the GPU check: copy bandwidth, tuning, every decode / verify cell, sampling kernels.
    Stops early (status "partial (budget)") when ``seconds_left()`` runs low."""
    copy_bw = copy_bandwidth(plan.copy_bytes)
    pool = Pool.for_cells(max(plan.batches), max(plan.contexts))
    best, tuning = tune(pool, copy_bw, plan.tune_cells, plan.configs)
    result = {"status": "ok", "device": str(pool.k_cache.device), "copy_bandwidth_tb_s": copy_bw / 1e12,
              "tuning": tuning, "config": asdict(best), "decode": [], "verify": []}
    for batch in plan.batches:
        for context in plan.contexts:
            if seconds_left() < 10:
                result["status"] = "partial (budget)"
                return result
            for key, q_len in (("decode", 1), ("verify", plan.verify_q_len)):
                cell = attention_cell(pool, batch, context, q_len, copy_bw, best, with_sdpa=q_len > 1)
                result[key].append(asdict(cell))
    result["sampling"] = sampling_cells(*plan.sampling)
    return result


def kernel_exactness(q_lens: Sequence[int] = (1, 1, 8, 8, 256, 8), starts: Sequence[int] = (2047, 4000, 1000, 3, 512, 600),
                     ) -> dict:
    """fp32 attention kernel on the GPU (TF32 irrelevant: IEEE dots) vs the torch reference on the CPU at
    SmolLM2 shapes, a mixed batch (decode at 2k / 4k, verify blocks, a prefill chunk after 512 cached
    tokens, a bidirectional drafter block)."""
    from sparkserve.kernels.paged_attention import paged_attention_reference

    gen = torch.Generator().manual_seed(0)
    causal = [True] * (len(q_lens) - 1) + [False]
    kv = [s + q for s, q in zip(starts, q_lens, strict=True)]
    per = [-(-n // BLOCK_SIZE) for n in kv]
    perm = torch.randperm(sum(per), generator=gen).tolist()
    tables = [perm[sum(per[:i]): sum(per[: i + 1])] for i in range(len(kv))]
    k = torch.randn(NUM_KV_HEADS, sum(per), BLOCK_SIZE, HEAD_DIM, generator=gen)
    v = torch.randn(NUM_KV_HEADS, sum(per), BLOCK_SIZE, HEAD_DIM, generator=gen)
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=gen)
    group = NUM_HEADS // NUM_KV_HEADS
    cpu_meta = build_ragged_metadata(q_lens, starts, kv, tables, BLOCK_SIZE, NUM_KV_HEADS, group, causal=causal)
    ref = paged_attention_reference(q, k, v, cpu_meta, HEAD_DIM**-0.5)
    dev = default_device()
    gpu_meta = build_ragged_metadata(q_lens, starts, kv, tables, BLOCK_SIZE, NUM_KV_HEADS, group, causal=causal,
                                     device=dev)
    out = paged_attention(q.to(dev), k.to(dev), v.to(dev), gpu_meta, HEAD_DIM**-0.5).cpu()
    err = float((out - ref).abs().max())
    return {"device": dev, "max_abs_err": err, "pass": err < 1e-4}
