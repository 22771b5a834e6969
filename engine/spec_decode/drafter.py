"""The ``Drafter`` Protocol: what the runner needs from any drafter, and the typed batch it gets.

Terms: the *anchor* is the last token a request emitted (at position ``start``); a drafter proposes
``gamma`` draft tokens for positions ``start + 1 .. start + gamma``. Drafters that read the target's
hidden states (DSpark / DFlash, KV injection) get their *context rows* through ``add_context``; drafters
that read tokens (a draft LM, test oracles) get each request's token history.

How a row samples (``DraftBatch.sampling`` and ``coupled``):
- greedy requests: argmax of the drafter's logits; verification compares with the target's argmax;
- coupled rows (seeded requests): ``argmax(q logits + Gumbel noise keyed by (seed, position))``; the
  verifier accepts a draft iff the target's own keyed Gumbel choice agrees (Gumbel-max coupling), so the
  output is the target's seeded sample whatever was drafted or verified;
- free rows (unseeded sampled requests): sampled from q with the drafter's own keyed stream; q is kept
  (``DraftOutput.draft_probs``) for rejection sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sparkserve.engine.sampling.metadata import SamplingMetadata

KVCache = tuple[Tensor, Tensor]  # ([Hkv, num_blocks, block_size, hd], same) per drafter layer
DraftMaskFn = Callable[[int, Sequence[int]], "Tensor | None"]
"""``(row, drafts so far) -> [V] bool allowed tokens (None = unconstrained)`` for a draft slot."""


@dataclass(frozen=True)
class DraftBatch:
    """One drafter forward for R requests.

    Attributes:
        anchor_ids: ``[R]`` int64 last emitted token of each request.
        starts: ``[R]`` int64 anchor positions (= context rows the drafter has for the request), on the
            drafter's device: computed there from the verify step's accepted counts (no host sync).
        max_start: a host-side upper bound of ``starts`` (attention shapes).
        block_tables: per request, the drafter's block table covering ``start + gamma`` positions (the
            request's own blocks, then scratch blocks; ``Speculator.draft_tables``).
        block_size: tokens per KV block.
        kv_caches: the drafter's paged pools (``Drafter.make_kv_caches``).
        sampling: R rows of the requests' sampling parameters (penalties are not applied to drafts).
        coupled: per row, draw with the target's keyed Gumbel noise (module docstring).
        token_histories: per request, prompt + output tokens (anchor last), for drafters with
            ``needs_token_history``; None otherwise.
        mask: allowed tokens per slot (grammars), None when no row is constrained.
        request_ids: the requests of the rows (drafters with per-request state key it by them).
    """

    anchor_ids: Tensor
    starts: Tensor
    max_start: int
    block_tables: list[list[int]]
    block_size: int
    kv_caches: list[KVCache]
    sampling: SamplingMetadata
    coupled: tuple[bool, ...]
    token_histories: list[list[int]] | None = None
    mask: DraftMaskFn | None = None
    request_ids: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return int(self.anchor_ids.shape[0])

    @property
    def free_rows(self) -> list[int]:
        """Rows that sample from q with their own stream (their q is kept for verification)."""
        return [r for r, (g, c) in enumerate(zip(self.sampling.greedy, self.coupled, strict=True)) if not g and not c]


@dataclass
class DraftOutput:
    """One block of drafts per request.

    Attributes:
        token_ids: ``[R, gamma]`` int64 drafts (slot k = position start + k + 1).
        draft_probs: ``[F, gamma, V']`` fp32 distributions q the drafts of F sampled rows were drawn
            from (rows ``q_rows``); None when F = 0. V' <= V is the draft vocabulary (a prefix of the
            token ids). Rows without q (greedy, coupled, or deterministic drafts) verify with one-hot q.
        confidences: ``[R, gamma]`` fp32 conditional survival estimates c_k, or None.
        num_tokens: per row, how many leading drafts are valid (a mask may cut a block); None = all.
        q_rows: the batch rows of ``draft_probs``; None means ``DraftBatch.free_rows``.
        drafters: per row, the drafter family that made the row's drafts (a hybrid mixes them); None
            means ``Drafter.name`` for every row.
    """

    token_ids: Tensor
    draft_probs: Tensor | None
    confidences: Tensor | None
    num_tokens: list[int] | None = None
    q_rows: list[int] | None = None
    drafters: list[str] | None = None


@runtime_checkable
class Drafter(Protocol):
    """What the runner needs from a drafter.

    Attributes:
        name: the drafter family, for stats ("dspark", "dflash", "draft-model", ...).
        num_speculative_tokens: gamma, drafts proposed per step.
        target_layer_ids: target layers whose outputs feed ``add_context`` (empty: no features).
        needs_token_history: ``DraftBatch.token_histories`` must be filled.
    """

    name: str
    num_speculative_tokens: int
    target_layer_ids: tuple[int, ...]
    needs_token_history: bool

    def context_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes the drafter's paged context cache adds to one KV block (0 without one)."""
        ...

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[KVCache]:
        """The drafter's paged pools, sharing the target's block ids (empty without a cache)."""
        ...

    def add_context(self, target_features: Tensor, positions: Tensor, slot_mapping: Tensor,
                    kv_caches: list[KVCache]) -> None:
        """Store context rows: ``target_features`` ``[N, m * d]`` at ``positions`` / ``slot_mapping`` ``[N]``."""
        ...

    def propose(self, batch: DraftBatch) -> DraftOutput:
        """Draft gamma tokens for each row of ``batch``."""
        ...

    def release(self, request_id: str) -> None:
        """The request finished or was preempted: drop any state kept for it."""
        ...


class TokenDrafter:
    """Base of drafters that read token histories instead of target features (a draft LM, test
    oracles): no context cache, ``needs_token_history``. Subclasses set ``name`` and
    ``num_speculative_tokens`` and implement ``propose``."""

    needs_token_history = True
    target_layer_ids: tuple[int, ...] = ()

    def context_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 0

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[KVCache]:
        return []

    def add_context(self, target_features: Tensor, positions: Tensor, slot_mapping: Tensor,
                    kv_caches: list[KVCache]) -> None:
        return None

    def release(self, request_id: str) -> None:
        return None
