"""Scheduler configuration (frozen, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step and of the paged KV cache.

    Attributes:
        max_num_seqs: most requests running at once (each holds KV blocks and runner state).
        max_num_batched_tokens: token budget of one step: prefill chunks + ``1 + l_r`` per decode
            request. Must be >= ``max_num_seqs`` so every running decode request always gets its
            base token (no running request is starved by the budget).
        max_model_len: context length of the model (prompt + generated tokens).
        block_size: tokens per KV block.
        num_kv_blocks: physical KV blocks in the cache.
        num_lookahead_tokens: most drafts verified per request per step (gamma); 0 disables
            speculation. Blocks for verify slots are allocated only for drafts actually scheduled.
        shuffle_blocks: hand out physical blocks in a random order, so tests catch code that
            silently assumes contiguous KV (i.e. that paging is not real).
        seed: seed of that random order.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    num_lookahead_tokens: int = 0
    shuffle_blocks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "block_size",
            "num_kv_blocks",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be >= 0, got {self.num_lookahead_tokens}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running request gets at least one token per step"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        """Token positions the whole KV cache can hold (``num_kv_blocks * block_size``)."""
        return self.num_kv_blocks * self.block_size
