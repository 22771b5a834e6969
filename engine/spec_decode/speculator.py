"""Speculator: a ``Drafter``, its paged context cache and the scratch blocks its draft blocks write into.

The drafter's context cache shares the target's block tables and slot mapping: the context row of
sequence position p lives at the slot of position p in a separate per-drafter-layer pool with the same
number of blocks. So it is paged like the target's cache, counted in the same block budget, freed with
the request, trimmed with rejected slots, and rebuilt by the re-prefill after a recompute preemption.

Context rows are stored for every row of a step (prefill chunks, anchors, verified drafts, rejected ones
too): a rejected draft's row sits at a position >= the request's next anchor position, which the next
draft block overwrites before it attends to it (or which lies in a block the request gives back), so it
is never read. With ``lazy_context`` (the default) a request's rows are stored only when it drafts again,
from a bounded window of its latest rows (``context_feed.py``): steps where nobody drafts then project nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparkserve.engine.attention import SHORT_QUERY_MAX
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode import draft_graph
from sparkserve.engine.spec_decode.context_feed import DEFAULT_WINDOW, FeedRows, LazyContextFeed
from sparkserve.engine.spec_decode.drafter import DraftBatch, Drafter, DraftMaskFn, DraftOutput
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.step_graph import StepGraph


class Speculator:
    """Runs a drafter for the model runner.

    Args:
        drafter: any ``Drafter``.
        num_blocks: blocks of the target's paged KV cache (the drafter pool mirrors them).
        block_size: tokens per block.
        dtype: cache dtype.
        max_num_seqs: most requests drafted in one step (scratch blocks per row).
        lazy_context: keep the context rows of requests that do not draft pending (``context_feed.py``).
        pending_capacity: rows the pending arena holds (``LazyContextFeed``'s ``capacity``).
        context_window: pending rows kept per request, its latest (``LazyContextFeed``'s ``window``).
    """

    def __init__(self, drafter: Drafter, num_blocks: int, block_size: int, dtype: torch.dtype,
                 max_num_seqs: int, lazy_context: bool = True, pending_capacity: int = 2048,
                 context_window: int = DEFAULT_WINDOW) -> None:
        if not isinstance(drafter, Drafter):
            raise TypeError(f"{type(drafter).__name__} does not implement the Drafter Protocol")
        self.drafter = drafter
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Scratch blocks past the shared ids hold each drafted block's own K/V (positions the request
        # has not allocated yet): ``ceil(gamma / block_size) + 1`` per request row of a step.
        self.scratch_per_row = -(-self.gamma // block_size) + 1
        total = num_blocks + max_num_seqs * self.scratch_per_row
        self.kv_caches = drafter.make_kv_caches(total, block_size, dtype)
        self.feed = (LazyContextFeed(self.add_context, pending_capacity, context_window)
                     if lazy_context and self.target_layer_ids else None)

    @property
    def gamma(self) -> int:
        """Draft tokens proposed per step."""
        return int(self.drafter.num_speculative_tokens)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.drafter.target_layer_ids)

    def draft_tables(self, starts: Sequence[int], block_tables: Sequence[Sequence[int]]) -> list[list[int]]:
        """Block tables for the drafted blocks at positions ``start .. start + gamma - 1``: the
        request's own blocks up to the one holding position ``start - 1`` (a partly filled block has
        free slots from ``start`` on), then this row's scratch blocks.

        ``starts`` may be upper bounds of the anchor positions (the end of the verified block): the own
        blocks then reach further, but they are the request's, allocated for this step, and positions
        at or after the real anchor hold nothing the drafter reads before the block overwrites them."""
        tables = []
        for row, (start, table) in enumerate(zip(starts, block_tables, strict=True)):
            first = self.num_blocks + row * self.scratch_per_row
            own = list(table[: -(-start // self.block_size)])
            tables.append(own + list(range(first, first + self.scratch_per_row)))
        return tables

    def add_context(
        self,
        features: Tensor | None,  # [T, m * d_target] target hidden states of the step's rows
        positions: Tensor,  # [T] int64
        slot_mapping: Tensor,  # [T] int64
    ) -> None:
        """Store context rows (projected target features) in the drafter's paged cache; a no-op for
        drafters without target features."""
        if features is not None and features.shape[0] and self.target_layer_ids:
            self.drafter.add_context(features, positions, slot_mapping, self.kv_caches)

    def feed_step(
        self,
        rows: Sequence[FeedRows],  # the step's scheduled sequences, in row order
        features: Tensor | None,  # [T, m * d_target] target hidden states of the step's rows
        positions: Tensor,  # [T] int64
        slot_mapping: Tensor,  # [T] int64
    ) -> None:
        """Store the step's context rows: all of them now (eager feed), or only the rows of sequences marked
        ``eager`` together with their pending rows (lazy feed)."""
        if features is None or not features.shape[0] or not self.target_layer_ids:
            return
        if self.feed is None:
            self.add_context(features, positions, slot_mapping)
        else:
            self.feed.step(rows, features, positions, slot_mapping)

    def truncate(self, request_id: str, end: int) -> None:
        """The request's rows at positions >= ``end`` were rejected drafts: never store them later."""
        if self.feed is not None:
            self.feed.truncate(request_id, end)

    def release(self, request_ids: Sequence[str]) -> None:
        """Requests finished or were preempted: the drafter's per-request state and pending rows go."""
        for rid in request_ids:
            self.drafter.release(rid)
        if self.feed is not None:
            self.feed.release(request_ids)

    def propose(
        self,
        anchor_ids: Tensor,  # [R] int64 last emitted token of each request
        starts: Tensor,  # [R] int64 position of each anchor (= number of context rows), on the device
        max_starts: Sequence[int],  # [R] host upper bounds of ``starts``
        block_tables: Sequence[Sequence[int]],
        sampling: SamplingMetadata,
        coupled: tuple[bool, ...],
        token_histories: list[list[int]] | None = None,
        mask: DraftMaskFn | None = None,
        request_ids: Sequence[str] = (),
        graphs: StepGraph | None = None,
        table_tensor: Tensor | None = None,  # [R, W] the draft tables on the device (staged), or None
    ) -> DraftOutput:
        """One batched drafter forward for R requests (``token_histories``: prompt + outputs, anchor last,
        for drafters that need them). With ``graphs`` (``draft_graph.draft_step_graph``) a DSpark backbone
        runs through its bucket's static buffers (a CUDA graph replay on CUDA), reading ``table_tensor``
        (built from ``draft_tables`` and copied here when None); without a graph, a given ``table_tensor``
        lets the eager forward build its attention metadata on the device (no host copy)."""
        batch = DraftBatch(
            anchor_ids=anchor_ids, starts=starts, max_start=max(max_starts, default=0),
            block_tables=self.draft_tables(max_starts, block_tables),
            block_size=self.block_size, kv_caches=self.kv_caches, sampling=sampling, coupled=coupled,
            token_histories=token_histories if self.drafter.needs_token_history else None, mask=mask,
            request_ids=tuple(request_ids),
        )
        key = draft_graph.graph_key(graphs, batch.num_rows) if graphs is not None else None
        drafter = self.drafter
        if not self.device_tables or (key is None and table_tensor is None):
            return drafter.propose(batch)
        assert isinstance(drafter, DSparkDrafter)
        if table_tensor is None:
            table_tensor = draft_graph.table_tensor(batch.block_tables).to(anchor_ids.device)
        if key is not None:
            h = draft_graph.graph_hidden_states(graphs, key, drafter, anchor_ids, starts, table_tensor)
        else:
            h = draft_graph.eager_hidden_states(drafter, anchor_ids, starts, table_tensor, batch.max_start,
                                                self.block_size, self.kv_caches)
        return drafter.propose_from_hidden(h, batch)

    @property
    def device_tables(self) -> bool:
        """The drafter's forward reads its block tables as one device tensor (``propose``'s ``table_tensor``,
        staged with the step's inputs): a DSpark / DFlash drafter whose blocks fit the short attention group."""
        return isinstance(self.drafter, DSparkDrafter) and self.gamma <= SHORT_QUERY_MAX
