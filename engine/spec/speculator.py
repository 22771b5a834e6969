"""Speculator: the drafter, its paged context cache and each request's pending drafts.

The drafter's context cache shares the target's block tables and slot mapping: the context row of
sequence position p lives at the slot of position p in a separate per-drafter-layer pool with the
same number of blocks. So it is paged like the target's cache, counted in the same block budget,
freed with the request, trimmed with rejected slots, and rebuilt by the re-prefill after a recompute
preemption (the re-prefill recomputes every row's target features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.outputs import DraftProposal


@dataclass
class PendingDraft:
    """Drafts proposed at the end of the previous step, to verify in this one.

    Attributes:
        token_ids: [gamma] int64 draft tokens.
        draft_probs: [gamma, V] fp32 distributions q the drafts were sampled from (None for greedy:
            q is one-hot at the draft).
    """

    token_ids: torch.Tensor
    draft_probs: torch.Tensor | None


class Speculator:
    """Wraps a block drafter (DSpark / DFlash) for the model runner.

    Args:
        drafter: a module with ``config.block_size``, ``config.target_layer_ids``, ``make_kv_caches``,
            ``add_context`` and ``propose`` (engine.spec.dspark.DSparkDrafter).
        num_blocks: blocks of the target's paged KV cache (the drafter pool mirrors it).
        block_size: tokens per block.
        dtype: cache dtype.
    """

    def __init__(
        self, drafter, num_blocks: int, block_size: int, dtype: torch.dtype, max_num_seqs: int
    ) -> None:
        self.drafter = drafter
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Scratch blocks past the shared ids hold each drafted block's own K/V (positions the request
        # has not allocated yet): ``ceil(gamma / block_size) + 1`` per request row of a step.
        self.scratch_per_row = -(-self.gamma // block_size) + 1
        total = num_blocks + max_num_seqs * self.scratch_per_row
        self.kv_caches = drafter.make_kv_caches(total, block_size, dtype)
        self.pending: dict[str, PendingDraft] = {}

    @property
    def gamma(self) -> int:
        """Draft tokens proposed per step (the checkpoint's ``block_size``)."""
        return int(self.drafter.config.block_size)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.drafter.config.target_layer_ids)

    def draft_tables(self, starts: list[int], block_tables: list[tuple[int, ...]]) -> list[list[int]]:
        """Block tables for the drafted block at positions ``start .. start + gamma - 1``: the
        request's own blocks up to the one holding position ``start - 1`` (a partly filled block has
        free slots from ``start`` on), then this row's scratch blocks."""
        tables = []
        for row, (start, table) in enumerate(zip(starts, block_tables, strict=False)):
            first = self.num_blocks + row * self.scratch_per_row
            own = list(table[: -(-start // self.block_size)])
            tables.append(own + list(range(first, first + self.scratch_per_row)))
        return tables

    @property
    def needs_token_history(self) -> bool:
        return bool(getattr(self.drafter, "needs_token_history", False))

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def add_context(
        self,
        features: torch.Tensor,  # [N, m * d_target] target hidden states of accepted rows
        positions: torch.Tensor,  # [N] int64
        slot_mapping: torch.Tensor,  # [N] int64
    ) -> None:
        """Store context rows (projected target features) in the drafter's paged cache."""
        if features.shape[0]:
            self.drafter.add_context(features, positions, slot_mapping, self.kv_caches)

    def propose(
        self,
        request_ids: list[str],
        anchor_ids: torch.Tensor,  # [R] int64 last emitted token of each request
        starts: list[int],  # [R] position of each anchor (= number of context rows)
        block_tables: list[tuple[int, ...]],
        temperatures: torch.Tensor,  # [R] fp32
        generators: list[torch.Generator | None],
        token_histories: list[list[int]] | None = None,
    ) -> dict[str, DraftProposal]:
        """One batched drafter forward for R requests; remembers q for the next verify step.

        ``token_histories`` (prompt + generated tokens, anchor last) go to drafters that declare
        ``needs_token_history`` (draft-model and test oracle drafters).
        """
        if not request_ids:
            return {}
        kwargs = {"token_histories": token_histories} if self.needs_token_history else {}
        out = self.drafter.propose(
            anchor_ids, starts, self.draft_tables(starts, block_tables), self.block_size, self.kv_caches,
            temperatures, generators, **kwargs,
        )
        tokens = out.token_ids  # [R, gamma]
        token_lists = tokens.tolist()
        conf_lists = out.confidences.float().tolist() if out.confidences is not None else None
        greedy = (temperatures < 1e-5).tolist()
        proposals: dict[str, DraftProposal] = {}
        for i, rid in enumerate(request_ids):
            q = None if greedy[i] else out.draft_probs[i]
            self.pending[rid] = PendingDraft(tokens[i], q)
            conf = tuple(conf_lists[i]) if conf_lists is not None else ()
            proposals[rid] = DraftProposal(tuple(token_lists[i]), conf)
        return proposals
