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

    def __init__(self, drafter, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.drafter = drafter
        self.block_size = block_size
        self.kv_caches = drafter.make_kv_caches(num_blocks, block_size, dtype)
        self.pending: dict[str, PendingDraft] = {}

    @property
    def gamma(self) -> int:
        """Draft tokens proposed per step (the checkpoint's ``block_size``)."""
        return int(self.drafter.config.block_size)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.drafter.config.target_layer_ids)

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
    ) -> dict[str, DraftProposal]:
        """One batched drafter forward for R requests; remembers q for the next verify step."""
        if not request_ids:
            return {}
        out = self.drafter.propose(
            anchor_ids, starts, block_tables, self.block_size, self.kv_caches, temperatures, generators
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
