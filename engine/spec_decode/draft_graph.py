"""The DSpark drafter's block forward through ``engine/step_graph.py`` (CUDA graphs at padded buckets).

A drafter step is uniform by construction: every drafting request runs one block of ``q = gamma`` tokens
(its anchor, then mask tokens), bidirectional over its context rows and the block. So the backbone
(``DSparkDrafter.backbone``: embedding, decoder layers, final norm) is served like the target's decode and
verify steps: one ``StepGraph`` with ``q_lens = (gamma,)``, ``causal=False``, the target's buckets and
memory pool. The LM head, Markov head, sampling and confidences stay eager (their shapes and branches
depend on the rows' sampling parameters and masks).

Unlike the target's inputs, the drafter's come from the device: the anchors and their positions are
computed there from the verify step's accepted counts. They are written into the static buffers with
``StepGraph.stage_device`` (device copies only); the block tables come from the step's one staged host
copy (``ModelRunner._step_tensors``), so the graph path adds no host-to-device copy and no host read.

Pad rows reuse the scratch blocks of the drafter's last request row (``Speculator``: ``scratch_per_row``
blocks per row past the shared ones): a step with pad rows has fewer real rows than the largest bucket,
whose last row is ``max_num_seqs - 1``, so no real row of that step writes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sparkserve.engine.attention import AttentionMetadata
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.step_graph import GraphKey, StepGraph
from sparkserve.kernels.attention_metadata import SHORT_ROWS_MAX

if TYPE_CHECKING:
    from sparkserve.engine.spec_decode.speculator import Speculator


def draft_step_graph(speculator: Speculator, buckets: Sequence[int], max_table_blocks: int,
                     pool: object | None = None, num_splits: int | None = None) -> StepGraph | None:
    """The drafter's ``StepGraph``, or None when its blocks cannot be served by graphs (not a DSpark /
    DFlash drafter, or ``gamma * G`` past one short kernel tile).

    Args:
        speculator: the runner's speculator (its drafter's paged pools; ``buckets[-1]`` rows at most, the
            rows its scratch blocks were sized for).
        buckets: the target's padded batch sizes; pool: the target graphs' memory pool (one pool).
        max_table_blocks: blocks of a request's own table (the persistent batch's width); the drafter's
            tables add ``scratch_per_row`` scratch blocks.
        num_splits: split-KV count of every key (None: the heuristic).
    """
    drafter = speculator.drafter
    if not isinstance(drafter, DSparkDrafter):
        return None
    cfg = drafter.config
    heads = (int(cfg.num_key_value_heads), int(cfg.num_attention_heads) // int(cfg.num_key_value_heads))
    gamma = speculator.gamma
    if gamma * heads[1] > SHORT_ROWS_MAX:
        return None
    per_row = speculator.scratch_per_row
    last_row_scratch = speculator.kv_caches[0][0].shape[1] - per_row  # the last request row's scratch blocks
    return StepGraph(drafter.backbone, speculator.kv_caches, heads, speculator.block_size,
                     max_table_blocks + per_row, scratch_block=last_row_scratch, buckets=buckets, q_lens=(gamma,),
                     num_splits=num_splits, causal=False, scratch_blocks=per_row, pool=pool)


def graph_key(graphs: StepGraph, num_rows: int) -> GraphKey | None:
    """The key serving a drafter forward of ``num_rows`` requests (None: more than the largest bucket)."""
    return graphs.key_for([next(iter(graphs.q_lens))] * num_rows) if num_rows else None


def graph_hidden_states(graphs: StepGraph, key: GraphKey, drafter: DSparkDrafter, anchor_ids: Tensor,
                        starts: Tensor, block_tables: Tensor) -> Tensor:
    """``DSparkDrafter.block_hidden_states`` through the key's static buffers (a graph replay on CUDA).

    Args:
        anchor_ids: ``[R]`` int64 and starts ``[R]`` int64 anchor positions, on the device.
        block_tables: ``[R, W]`` the drafter's block tables (``Speculator.draft_tables``) on the device.
    Returns:
        h: ``[R, B, d]`` (a view of the static output on CUDA: read it before the next replay).
    """
    num_rows, gamma = int(anchor_ids.shape[0]), key.q_len
    ids, positions = drafter.block_inputs(anchor_ids, starts)
    step = graphs.stage_device(graphs.step(key), ids, positions, block_tables, starts + gamma)
    hidden, _ = graphs.run(step)
    return hidden.view(num_rows, gamma, -1)


def eager_hidden_states(drafter: DSparkDrafter, anchor_ids: Tensor, starts: Tensor, block_tables: Tensor,
                        max_start: int, block_size: int, kv_caches: list) -> Tensor:
    """``DSparkDrafter.block_hidden_states`` on the torch attention path from device inputs only (anchors,
    starts and the staged block tables ``[R, W]``; ``max_start`` a host bound of the starts): no host copy,
    no host read. Returns ``[R, B, d]``."""
    num_rows, gamma = int(anchor_ids.shape[0]), drafter.num_speculative_tokens
    ids, positions = drafter.block_inputs(anchor_ids, starts)
    meta = block_attention_metadata(starts, block_tables, gamma, block_size, max_start + gamma)
    return drafter.backbone(ids, positions, kv_caches, meta)[0].view(num_rows, gamma, -1)


def block_attention_metadata(starts: Tensor, block_tables: Tensor, q_len: int, block_size: int,
                             max_kv_len: int) -> AttentionMetadata:
    """The torch path's metadata of R bidirectional blocks of ``q_len <= SHORT_QUERY_MAX`` tokens at
    ``starts`` ``[R]`` (``build_attention_metadata(q_lens=[q_len] * R, kv_lens=starts + q_len, causal=False)``:
    the same tensors), built from device tensors by device ops only; ``block_tables`` ``[R, W]`` cover
    ``start + q_len`` positions, ``max_kv_len`` is a host bound of ``starts + q_len``."""
    device, num_rows = starts.device, int(starts.shape[0])
    token = torch.arange(num_rows * q_len, device=device)  # [T]
    owner = token // q_len
    positions = starts[owner] + token % q_len  # [T]
    tables = block_tables.long()
    slot_mapping = tables[owner, positions // block_size] * block_size + positions % block_size
    num_cols = max(1, -(-max_kv_len // block_size))
    tables = torch.nn.functional.pad(tables, (0, max(0, num_cols - tables.shape[1])))[:, :num_cols]
    kv_lens = starts + q_len  # [R]
    used = torch.arange(num_cols, device=device)[None, :] * block_size < kv_lens[:, None]
    key_pos = torch.arange(num_cols * block_size, device=device)
    mask = (key_pos[None, None, None, :] < kv_lens[:, None, None, None]).expand(-1, 1, q_len, -1)  # [R, 1, q, L]
    return AttentionMetadata(
        slot_mapping=slot_mapping, short_q_index=token.view(num_rows, q_len),
        short_q_valid=torch.ones(num_rows, q_len, dtype=torch.bool, device=device),
        short_block_tables=torch.where(used, tables, torch.zeros_like(tables)), short_mask=mask.contiguous(),
        prefills=[], num_tokens=num_rows * q_len, block_size=block_size, short_dst=token, short_src=None)


def table_tensor(tables: Sequence[Sequence[int]]) -> Tensor:
    """Per-request block id lists -> ``[R, W]`` int32 host tensor (rows padded with their last block; the
    padding is never read: keys stop at ``kv_len``)."""
    width = max((len(t) for t in tables), default=0) or 1
    return torch.tensor([list(t) + [t[-1] if t else 0] * (width - len(t)) for t in tables], dtype=torch.int32)
