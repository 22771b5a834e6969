"""Decode steps over static buffers at padded batch-size buckets (the CUDA-graph structure).

A CUDA graph replays fixed kernel launches on fixed addresses, so everything a decode step reads must live in
buffers allocated once: per bucket B (nano-vllm's 1, 2, 4, 8, then every 16 up to the max), input ids,
positions and the Triton attention metadata (``kernels/attention_metadata.RaggedAttentionMetadata``: one short
tile group of B single-query tiles with a fixed split count). A step of n <= B sequences is copied into the
bucket's buffers; the B - n pad rows decode token 0 at position 0 over one key in a scratch KV block that no
sequence owns (their slot mapping writes there), so real rows are unaffected.

On CUDA the bucket's forward is captured once (``torch.cuda.graph``, one memory pool for all buckets) and
replayed; elsewhere :meth:`StepGraph.run` runs the same forward eagerly on the same static buffers, so the
buffer handling, padding and metadata are exercised on the CPU (under ``TRITON_INTERPRET=1``). Prefill and
mixed steps stay eager (the runner's ordinary path). Not yet wired into ``ModelRunner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparkserve.kernels.attention_metadata import RaggedAttentionMetadata, TileGroup
from sparkserve.kernels.common import next_power_of_2


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return tuple(sorted(set(buckets)))


@dataclass
class StaticStep:
    """One bucket's buffers (allocated once) and the metadata object viewing them."""

    input_ids: Tensor  # [B] int64
    positions: Tensor  # [B] int64
    meta: RaggedAttentionMetadata
    graph: object | None = None  # torch.cuda.CUDAGraph once captured
    hidden: Tensor | None = None  # [B, d] the captured forward's output


class StepGraph:
    """Decode steps of ``model`` at padded buckets over static buffers (module docstring).

    Args:
        model: the target (``LlamaForCausalLM``), its ``kv_caches`` (head-major, ``engine.attention.new_kv_cache``).
        kernel_heads: ``(Hkv, G)``; block_size / max_blocks: the block tables' shape per row.
        scratch_block: a KV block no sequence owns (pad rows write and read there).
        buckets: padded batch sizes; num_splits: split-KV count of every bucket (fixed at capture).
    """

    def __init__(self, model, kv_caches: list[tuple[Tensor, Tensor]], kernel_heads: tuple[int, int],  # noqa: ANN001
                 block_size: int, max_blocks: int, scratch_block: int, buckets: tuple[int, ...],
                 num_splits: int = 1) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.device = model.embed_tokens.weight.device
        self.block_size, self.max_blocks, self.scratch_block = block_size, max_blocks, scratch_block
        self.buckets = tuple(sorted(buckets))
        self.steps = {b: self._allocate(b, kernel_heads, num_splits) for b in self.buckets}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def _allocate(self, bucket: int, kernel_heads: tuple[int, int], num_splits: int) -> StaticStep:
        dev, i32 = self.device, torch.int32
        group = kernel_heads[1]
        block_m = max(16, next_power_of_2(group))
        tiles = TileGroup(torch.arange(bucket, dtype=i32, device=dev), torch.zeros(bucket, dtype=i32, device=dev),
                          block_m, block_m // group, num_splits, 1)
        meta = RaggedAttentionMetadata(
            cu_seqlens_q=torch.arange(bucket + 1, dtype=i32, device=dev), kv_lens=torch.ones(bucket, dtype=i32, device=dev),
            start_pos=torch.zeros(bucket, dtype=i32, device=dev),
            block_tables=torch.full((bucket, self.max_blocks), self.scratch_block, dtype=i32, device=dev),
            causal=torch.ones(bucket, dtype=i32, device=dev),
            slot_mapping=torch.zeros(bucket, dtype=torch.int64, device=dev), groups=(tiles,), num_tokens=bucket,
            block_size=self.block_size, num_queries_per_kv=group, max_kv_len=self.max_blocks * self.block_size)
        return StaticStep(torch.zeros(bucket, dtype=torch.int64, device=dev),
                          torch.zeros(bucket, dtype=torch.int64, device=dev), meta)

    def bucket_for(self, num_seqs: int) -> int:
        """The smallest bucket holding ``num_seqs``. Raises ValueError past the largest."""
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        raise ValueError(f"{num_seqs} sequences exceed the largest bucket {self.buckets[-1]}")

    def fill(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> StaticStep:
        """Copy a decode step of n sequences (one token each at ``positions``) into its bucket's buffers."""
        num_seqs = len(input_ids)
        step = self.steps[self.bucket_for(num_seqs)]
        bucket = step.input_ids.numel()
        pad = bucket - num_seqs
        tables = torch.full((bucket, self.max_blocks), self.scratch_block, dtype=torch.int32)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        pos = torch.tensor(list(positions) + [0] * pad, dtype=torch.int64)
        slots = tables.long()[torch.arange(bucket), pos // self.block_size] * self.block_size + pos % self.block_size
        meta = step.meta
        step.input_ids.copy_(torch.tensor(list(input_ids) + [0] * pad, dtype=torch.int64))
        step.positions.copy_(pos)
        meta.kv_lens.copy_((pos + 1).to(torch.int32))
        meta.start_pos.copy_(pos.to(torch.int32))
        meta.block_tables.copy_(tables)
        meta.slot_mapping.copy_(slots)
        return step

    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> Tensor:
        """Final-normed hidden states ``[n, d]`` of a decode step (graph replay on CUDA, eager elsewhere)."""
        step = self.fill(input_ids, positions, block_tables)
        if self.device.type != "cuda":
            return self._forward(step)[: len(input_ids)]
        if step.graph is None:
            self._forward(step)  # warm-up: compile the kernels outside the capture
            torch.cuda.synchronize(self.device)
            step.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(step.graph, pool=self.pool):
                step.hidden = self._forward(step)
        step.graph.replay()
        return step.hidden[: len(input_ids)]

    def _forward(self, step: StaticStep) -> Tensor:
        from sparkserve.engine.attention import AttentionMetadata

        meta = AttentionMetadata(slot_mapping=step.meta.slot_mapping, short_q_index=None, short_q_valid=None,
                                 short_block_tables=None, short_mask=None, prefills=[],
                                 num_tokens=step.meta.num_tokens, block_size=self.block_size, kernel=step.meta)
        hidden, _ = self.model(step.input_ids, step.positions, self.kv_caches, meta)
        return hidden
