"""Uniform steps over static buffers at padded batch-size buckets (the CUDA-graph structure).

A CUDA graph replays fixed kernel launches on fixed addresses, so everything a step reads must live in
buffers allocated once. A *uniform* step gives every sequence the same number of query tokens ``q``:
decode (``q = 1``) and uniform verify blocks (``q = 1 + K``, K drafts per request). Per key
``(q, B)`` (B from nano-vllm's buckets 1, 2, 4, 8, then every 16 up to the max), one device byte buffer
holds the step's inputs (input ids, positions, slot mapping, context lengths, start positions, block
tables) as views, and constant tensors hold the rest of the Triton attention metadata
(``kernels/attention_metadata.RaggedAttentionMetadata``: one short tile group of B tiles, a split-KV count
fixed per bucket). A step of n <= B sequences is padded on the host and copied into its key's buffer in
ONE copy (``HostStaging.copy_into``: pinned, ``non_blocking`` on CUDA); the B - n pad rows decode token 0
at positions 0..q-1 in a scratch KV block that no sequence owns (their slot mapping writes there), so
real rows are unaffected.

On CUDA each key's forward is captured once (``torch.cuda.graph``, one memory pool for all keys, largest
first as nano-vllm does) and replayed; elsewhere :meth:`StepGraph.run` runs the same forward eagerly on the
same static buffers, so everything but the capture call (buffer handling, padding, metadata, bucket choice)
is exercised on the CPU (under ``TRITON_INTERPRET=1``). Prefill and mixed steps stay eager.

The DSpark drafter's block forward (``q = gamma`` bidirectional tokens per request, ``causal=False``) uses
the same machinery (``engine/spec_decode/draft_graph.py``): its inputs are computed on the device from the
verify step's accepted counts, so they are filled with :meth:`StepGraph.stage_device` (device copies only),
and it shares the target's memory pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sparkserve.engine.staging import HostStaging, packed_views
from sparkserve.kernels.attention_metadata import (
    CPU_NUM_SMS,
    SHORT_ROWS_MAX,
    RaggedAttentionMetadata,
    TileGroup,
    split_heuristic,
)
from sparkserve.kernels.common import next_power_of_2


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return tuple(sorted(set(buckets)))


def graph_q_lens(block_size: int, group: int, gamma: int) -> tuple[int, ...]:
    """Query tokens per sequence the target's graphs serve: decode (1) and verify blocks of K = 1, 2, 4, 8 and
    ``gamma`` drafts, those the scratch block (``block_size`` tokens) and one short kernel tile
    (``q * group <= SHORT_ROWS_MAX``) hold."""
    limit = min(block_size, SHORT_ROWS_MAX // group)
    return tuple(sorted({1} | {1 + k for k in (1, 2, 4, 8, gamma) if 1 <= k <= gamma and 1 + k <= limit}))


class GraphKey(NamedTuple):
    """One captured shape: ``q_len`` query tokens per sequence (1 = decode, 1 + K = verify) at ``rows``
    padded sequences (a bucket)."""

    q_len: int
    rows: int


@dataclass
class StaticStep:
    """One key's buffers (allocated once; the first six are views of ``packed``) and its metadata.

    Attributes:
        packed: ``[nbytes]`` uint8 device buffer the host copy lands in.
        input_ids / positions: ``[N]`` int64 (N = q_len * rows).
        meta: the Triton metadata over the static tensors (slot mapping ``[N]`` int64, kv_lens /
            start_pos ``[rows]`` int32, block tables ``[rows, max_blocks]`` int32).
        num_tokens: real tokens of the step last staged (n * q_len).
        replays: steps this key has served (graph replays on CUDA, eager runs elsewhere).
        graph / hidden / aux: the captured CUDA graph and its outputs ``[N, d]`` / ``[N, A * d]`` or None.
    """

    key: GraphKey
    packed: Tensor
    input_ids: Tensor
    positions: Tensor
    meta: RaggedAttentionMetadata
    num_tokens: int = 0
    replays: int = 0
    graph: object | None = None
    hidden: Tensor | None = None
    aux: Tensor | None = None


class StepGraph:
    """Uniform steps of ``model`` at padded buckets over static buffers (module docstring).

    Args:
        model: the forward, ``model(input_ids [N], positions [N], kv_caches, AttentionMetadata, aux_layer_ids)
            -> (hidden [N, d], aux [N, A * d] or None)``: the target (``LlamaForCausalLM``) or the DSpark
            drafter's backbone; ``kv_caches``: its paged pools (head-major, ``engine.attention.new_kv_cache``).
        kernel_heads: ``(Hkv, G)``; block_size / max_blocks: the block tables' shape per row.
        scratch_block: the first of ``scratch_blocks`` consecutive KV blocks no sequence owns (pad rows write
            and read there; pad row column j is block ``scratch_block + min(j, scratch_blocks - 1)``).
        buckets: padded batch sizes; q_lens: query tokens per sequence served by graphs (1 = decode).
        staging: the runner's host staging (one copy per step); a private one when None.
        aux_layer_ids: the model's auxiliary outputs (the drafter's context features), captured too.
        num_splits: split-KV count of every key (None: ``split_heuristic`` per bucket at the longest context).
        causal: False for bidirectional blocks (the DSpark drafter's).
        pool: the CUDA graph memory pool to share (another ``StepGraph``'s ``pool``); a new one when None.
    Raises:
        ValueError: a q_len over the scratch blocks or past one short tile of the kernels.
    """

    def __init__(self, model, kv_caches: list[tuple[Tensor, Tensor]], kernel_heads: tuple[int, int],  # noqa: ANN001
                 block_size: int, max_blocks: int, scratch_block: int, buckets: Sequence[int],
                 q_lens: Sequence[int] = (1,), staging: HostStaging | None = None,
                 aux_layer_ids: tuple[int, ...] = (), num_splits: int | None = None, causal: bool = True,
                 scratch_blocks: int = 1, pool: object | None = None) -> None:
        for q in q_lens:
            if not 1 <= q <= scratch_blocks * block_size or q * kernel_heads[1] > SHORT_ROWS_MAX:
                raise ValueError(f"q_len {q}: a graph step needs 1 <= q <= {scratch_blocks} scratch block(s) of "
                                 f"{block_size} tokens and q * G <= {SHORT_ROWS_MAX}")
        self.model, self.kv_caches = model, kv_caches
        self.device = kv_caches[0][0].device
        self.kernel_heads = kernel_heads
        self.block_size, self.max_blocks, self.scratch_block = block_size, max_blocks, scratch_block
        self.buckets = tuple(sorted(set(buckets)))
        self.q_lens = frozenset(q_lens)
        self.staging = staging if staging is not None else HostStaging(self.device)
        self.aux_layer_ids = aux_layer_ids
        self.num_splits = num_splits
        self.causal = causal
        self.steps: dict[GraphKey, StaticStep] = {}
        if pool is None and self.device.type == "cuda":
            pool = torch.cuda.graph_pool_handle()
        self.pool = pool
        # [max_blocks] int32 the pad rows' block table (on the host for ``stage``, on the device for ``stage_device``)
        self.pad_table = torch.arange(max_blocks).clamp_(max=scratch_blocks - 1).add_(scratch_block).to(torch.int32)
        self._pad_table_device = (torch.arange(max_blocks, device=self.device).clamp_(max=scratch_blocks - 1)
                                  .add_(scratch_block).to(torch.int32))

    @property
    def replays(self) -> int:
        """Steps served through this object, over all keys."""
        return sum(step.replays for step in self.steps.values())

    def key_for(self, q_lens: Sequence[int]) -> GraphKey | None:
        """The key serving a step of these per-sequence query lengths, or None (not uniform, a q_len not
        served by graphs, or more sequences than the largest bucket)."""
        if not q_lens or len(set(q_lens)) != 1 or q_lens[0] not in self.q_lens or len(q_lens) > self.buckets[-1]:
            return None
        return GraphKey(q_lens[0], next(b for b in self.buckets if b >= len(q_lens)))

    def step(self, key: GraphKey) -> StaticStep:
        """The key's static buffers (allocated on first use)."""
        if key not in self.steps:
            self.steps[key] = self._allocate(key)
        return self.steps[key]

    def _allocate(self, key: GraphKey) -> StaticStep:
        dev, i32 = self.device, torch.int32
        rows, q = key.rows, key.q_len
        num_kv_heads, group = self.kernel_heads
        specs = [((rows * q,), torch.int64)] * 3 + [((rows,), i32)] * 2 + [((rows, self.max_blocks), i32)]
        packed, (input_ids, positions, slots, kv_lens, start_pos, tables) = packed_views(specs, dev)
        max_kv_len = self.max_blocks * self.block_size
        num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else CPU_NUM_SMS
        splits = self.num_splits or split_heuristic(rows * num_kv_heads, max_kv_len, num_sms)
        block_m = max(16, next_power_of_2(q * group))
        tiles = TileGroup(torch.arange(rows, dtype=i32, device=dev), torch.zeros(rows, dtype=i32, device=dev),
                          block_m, block_m // group, splits, q)
        meta = RaggedAttentionMetadata(
            cu_seqlens_q=torch.arange(0, rows * q + 1, q, dtype=i32, device=dev), kv_lens=kv_lens,
            start_pos=start_pos, block_tables=tables, causal=torch.full((rows,), int(self.causal), dtype=i32, device=dev),
            slot_mapping=slots, groups=(tiles,), num_tokens=rows * q, block_size=self.block_size,
            num_queries_per_kv=group, max_kv_len=max_kv_len)
        step = StaticStep(key, packed, input_ids, positions, meta)
        self.stage(step, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, self.max_blocks, dtype=torch.int64), [])  # all pad rows: a valid step
        return step

    def stage(self, step: StaticStep, input_ids: Tensor, positions: Tensor, block_tables: Tensor,
              kv_lens: Sequence[int]) -> StaticStep:
        """Copy a uniform step of n sequences into ``step``'s buffers, padded to its bucket, in one copy.

        Args:
            input_ids / positions: ``[n * q]`` int64 host tensors, sequence after sequence.
            block_tables: ``[n, >= 1]`` host block ids (columns past ``max_blocks`` dropped).
            kv_lens: n host ints (context + this step's tokens).
        """
        q, rows = step.key
        num_seqs = len(kv_lens)
        pad = rows - num_seqs
        pos = torch.cat([positions.to(torch.int64), torch.arange(q).repeat(pad)])  # [N]
        tables = self.pad_table.repeat(rows, 1)  # [rows, max_blocks]
        width = min(block_tables.shape[1], self.max_blocks)
        tables[:num_seqs, :width] = block_tables[:, :width].to(torch.int32)
        owner = torch.arange(rows).repeat_interleave(q)  # [N] sequence of each token
        slots = tables.long()[owner, pos // self.block_size] * self.block_size + pos % self.block_size
        lens = torch.tensor(list(kv_lens) + [q] * pad, dtype=torch.int32)
        ids = torch.cat([input_ids.to(torch.int64), torch.zeros(pad * q, dtype=torch.int64)])
        self.staging.copy_into([ids, pos, slots, lens, lens - q, tables], step.packed)
        step.num_tokens = num_seqs * q
        return step

    def stage_device(self, step: StaticStep, input_ids: Tensor, positions: Tensor, block_tables: Tensor,
                     kv_lens: Tensor) -> StaticStep:
        """:meth:`stage` from tensors already on the device (the drafter's anchors and their positions come
        from the verify step there): device copies and arithmetic only, no host read, no host copy.

        Args:
            input_ids / positions: ``[n * q]`` int64 device tensors, sequence after sequence.
            block_tables: ``[n, >= 1]`` device block ids (columns past ``max_blocks`` dropped).
            kv_lens: ``[n]`` device ints (context + this step's tokens).
        """
        q, rows = step.key
        num_seqs, meta = int(kv_lens.shape[0]), step.meta
        num_tokens = num_seqs * q
        step.input_ids.zero_()[:num_tokens].copy_(input_ids)
        token = torch.arange(rows * q, device=self.device)  # [N]
        step.positions.copy_(token % q)[:num_tokens].copy_(positions)
        width = min(int(block_tables.shape[1]), self.max_blocks)
        meta.block_tables.copy_(self._pad_table_device.expand(rows, -1))[:num_seqs, :width].copy_(
            block_tables[:, :width])
        meta.kv_lens.fill_(q)[:num_seqs].copy_(kv_lens)
        meta.start_pos.copy_(meta.kv_lens - q)
        pos = step.positions
        meta.slot_mapping.copy_(meta.block_tables.long()[token // q, pos // self.block_size] * self.block_size
                                + pos % self.block_size)
        step.num_tokens = num_tokens
        return step

    def run(self, step: StaticStep) -> tuple[Tensor, Tensor | None]:
        """``(hidden [n * q, d], aux [n * q, A * d] or None)`` of the staged step: graph replay on CUDA
        (captured on first use), the same forward eagerly on the static buffers elsewhere."""
        step.replays += 1
        n = step.num_tokens
        if self.device.type != "cuda":
            hidden, aux = self._forward(step)
            return hidden[:n], None if aux is None else aux[:n]
        if step.graph is None:
            self._capture(step)
        step.graph.replay()
        return step.hidden[:n], None if step.aux is None else step.aux[:n]

    def capture_all(self) -> int:
        """Capture every key now (CUDA; the most tokens first so smaller ones reuse its pool). Returns the
        number of keys captured (0 off CUDA, where nothing is captured)."""
        if self.device.type != "cuda":
            return 0
        keys = [GraphKey(q, b) for q in self.q_lens for b in self.buckets]
        for key in sorted(keys, key=lambda k: k.q_len * k.rows, reverse=True):
            step = self.step(key)
            if step.graph is None:
                self._capture(step)
        return len(self.steps)

    def _capture(self, step: StaticStep) -> None:
        self._forward(step)  # warm-up: compile the kernels outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.hidden, step.aux = self._forward(step)
        step.graph = graph

    def _forward(self, step: StaticStep) -> tuple[Tensor, Tensor | None]:
        from sparkserve.engine.attention import AttentionMetadata

        meta = AttentionMetadata(slot_mapping=step.meta.slot_mapping, short_q_index=None, short_q_valid=None,
                                 short_block_tables=None, short_mask=None, prefills=[],
                                 num_tokens=step.meta.num_tokens, block_size=self.block_size, kernel=step.meta)
        return self.model(step.input_ids, step.positions, self.kv_caches, meta, self.aux_layer_ids)
