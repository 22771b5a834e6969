"""What the step graphs hold on the device, reserved before the KV cache is sized (issue 26).

On CUDA the KV cache takes what ``gpu_memory_utilization`` leaves after the weights and the activation peak
of a profiling forward (vLLM's rule, ``EngineCore._kv_cache_bytes``). The step graphs (``engine/step_graph.py``;
the target's decode / verify keys and the DSpark drafter's block keys) are captured after the cache exists,
so what they hold must be reserved first, or the capture runs out of memory or eats the activations' room:

- **static buffers**: each key's inputs and Triton metadata (:func:`static_step_bytes`, exact);
- **outputs**: each key's captured outputs stay allocated (``hidden [N, d]``, ``aux [N, A * d]``);
- **pool transient**: the activations of one captured forward live in the graphs' private memory pool; keys
  are captured largest first and share the pool (nano-vllm's order), so it holds about one forward of the
  largest key: the profiling forward's peak scaled by tokens, plus the split-KV scratch of that key.

vLLM measures the same quantity by capturing before sizing (``profile_cudagraph_memory``; its first
version extrapolated from two graphs linearly and over-reserved, since the graphs share one pool). This
module estimates it from shapes and the measured activation peak; the runner measures the pool after its
capture (``ModelRunner.graph_memory_bytes``) and the engine logs both, so the first device window checks
the estimate against the card.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.staging import packed_nbytes
from sparkserve.engine.step_graph import GraphKey, default_buckets, graph_q_lens
from sparkserve.kernels.attention_metadata import MAX_SPLITS, SHORT_ROWS_MAX, split_scratch_bytes


def static_step_bytes(q_len: int, rows: int, max_blocks: int) -> int:
    """Bytes of one key's static buffers as ``StepGraph`` allocates them: the packed inputs (input ids,
    positions, slot mapping ``[N]`` int64; context lengths, start positions ``[rows]`` int32; block tables
    ``[rows, max_blocks]`` int32; 8-byte aligned) and the constant metadata (``cu_seqlens_q`` ``[rows + 1]``,
    causal flags, tile sequence and tile start ``[rows]`` int32 each)."""
    num_tokens, i64, i32 = q_len * rows, torch.int64, torch.int32
    packed = packed_nbytes([((num_tokens,), i64)] * 3 + [((rows,), i32)] * 2 + [((rows, max_blocks), i32)])
    return packed + 4 * (rows + 1) + 3 * 4 * rows


@dataclass(frozen=True)
class GraphShapes:
    """The keys of one ``StepGraph`` and what each of its tokens costs.

    Attributes:
        keys: every key it captures.
        max_blocks: block-table columns per row.
        output_bytes_per_token: bytes of the captured outputs per token (``(d + A * d) * itemsize``).
        num_heads / head_dim: of its attention (the split-KV scratch of a key).
    """

    keys: tuple[GraphKey, ...]
    max_blocks: int
    output_bytes_per_token: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class GraphReserve:
    """Device bytes the step graphs hold (module docstring): ``total`` is reserved before sizing the KV cache."""

    static_bytes: int
    output_bytes: int
    pool_transient_bytes: int

    @property
    def total(self) -> int:
        return self.static_bytes + self.output_bytes + self.pool_transient_bytes


def engine_graph_shapes(config: ModelConfig, block_size: int, max_num_seqs: int, max_model_len: int,
                        dtype: torch.dtype, drafter: Drafter | None) -> tuple[GraphShapes, ...]:
    """The shapes of the graphs a ``ModelRunner`` with step graphs will capture (its target's, and a DSpark
    drafter's when ``engine/spec_decode/draft_graph.py`` serves it), known before it exists."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    gamma = drafter.num_speculative_tokens if drafter is not None else 0
    buckets = default_buckets(max_num_seqs)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    width = -(-(max_model_len + gamma + 1) // block_size) + 1  # the persistent batch's block-table columns
    aux = len(drafter.target_layer_ids) if drafter is not None else 0
    target = GraphShapes(tuple(GraphKey(q, b) for q in graph_q_lens(block_size, heads // kv_heads, gamma)
                               for b in buckets), width, (1 + aux) * config.hidden_size * itemsize, heads, config.head_dim)
    if not isinstance(drafter, DSparkDrafter):
        return (target,)
    cfg = drafter.config
    if gamma * (cfg.num_attention_heads // cfg.num_key_value_heads) > SHORT_ROWS_MAX:
        return (target,)
    per_row = -(-gamma // block_size) + 1  # Speculator.scratch_per_row
    draft = GraphShapes(tuple(GraphKey(gamma, b) for b in buckets), width + per_row, cfg.hidden_size * itemsize,
                        cfg.num_attention_heads, cfg.head_dim)
    return target, draft


def graph_reserve(graph_sets: Sequence[GraphShapes], activation_peak_bytes: int, activation_tokens: int) -> GraphReserve:
    """The reserve of these graphs, given the activation peak (bytes) measured for a forward of
    ``activation_tokens`` tokens: the pool holds the largest key's share of that peak (linear in tokens,
    rounded up) and its split-KV scratch at ``MAX_SPLITS``."""
    static = sum(static_step_bytes(k.q_len, k.rows, s.max_blocks) for s in graph_sets for k in s.keys)
    outputs = sum(k.q_len * k.rows * s.output_bytes_per_token for s in graph_sets for k in s.keys)
    transient = 0
    for shapes in graph_sets:
        if not shapes.keys:
            continue
        tokens = max(k.q_len * k.rows for k in shapes.keys)
        activations = -(-activation_peak_bytes * tokens // max(activation_tokens, 1))
        transient = max(transient, activations + split_scratch_bytes(tokens, shapes.num_heads, shapes.head_dim,
                                                                     MAX_SPLITS))
    return GraphReserve(static, outputs, transient)


def kv_cache_budget(total_bytes: int, in_use_bytes: int, utilization: float, activation_peak_bytes: int,
                    split_scratch_bytes: int, graphs: GraphReserve | None) -> int:
    """Bytes left for the KV cache: ``utilization * total`` minus what is in use (weights), the activation
    peak, the eager split-KV scratch and the step graphs' reserve.

    Raises:
        ValueError: nothing is left (the message gives each part in GiB).
    """
    graph_bytes = graphs.total if graphs is not None else 0
    budget = int(total_bytes * utilization) - in_use_bytes - activation_peak_bytes - split_scratch_bytes - graph_bytes
    if budget <= 0:
        gib = 2**30
        raise ValueError(f"no memory left for the KV cache at --gpu-memory-utilization {utilization} "
                         f"({in_use_bytes / gib:.1f} GiB in use, {activation_peak_bytes / gib:.1f} GiB activation "
                         f"peak, {split_scratch_bytes / gib:.2f} GiB split-KV scratch, {graph_bytes / gib:.2f} GiB "
                         f"step graphs; --cuda-graphs off frees the last)")
    return budget
