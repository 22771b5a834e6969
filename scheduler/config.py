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
        long_prefill_token_threshold: a prompt with more tokens than this left to prefill is *long*;
            every prefill chunk is first capped at this many tokens, and only budget left after
            decode rows and admissions tops a chunk up (vLLM's ``--long-prefill-token-threshold``).
            None = a quarter of ``max_num_batched_tokens``.
        max_num_partial_prefills: most requests mid-prefill at once (vLLM's
            ``--max-num-partial-prefills``); a waiting request whose first chunk would not finish its
            prompt is admitted only below this.
        max_long_partial_prefills: most *long* prompts mid-prefill at once (vLLM's
            ``--max-long-partial-prefills``); a waiting long prompt past it is skipped so shorter ones
            behind it are admitted (it keeps its place: the oldest long prompt goes next).
        enable_prefix_caching: share the KV of full blocks whose tokens were computed before
            (``sparkserve.scheduler.block_manager``); a new request skips the prefill of its cached prefix.
        cache_extra_key: mixed into every block key (the drafter in use: its context cache is cached
            with the target's blocks).
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    num_lookahead_tokens: int = 0
    shuffle_blocks: bool = False
    seed: int = 0
    long_prefill_token_threshold: int | None = None
    max_num_partial_prefills: int = 4
    max_long_partial_prefills: int = 1
    enable_prefix_caching: bool = False
    cache_extra_key: str = ""

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "block_size",
            "num_kv_blocks",
            "max_num_partial_prefills",
            "max_long_partial_prefills",
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
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be >= 1, got {self.long_prefill_token_threshold}")
        if self.max_long_partial_prefills > self.max_num_partial_prefills:
            raise ValueError("max_long_partial_prefills must be <= max_num_partial_prefills")

    @property
    def prefill_chunk_cap(self) -> int:
        """Tokens a prefill chunk gets before leftovers are shared out (the long-prefill threshold)."""
        if self.long_prefill_token_threshold is not None:
            return self.long_prefill_token_threshold
        return max(1, self.max_num_batched_tokens // 4)
