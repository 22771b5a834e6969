"""Per-request rules of the scheduler as small pure functions: admission and stop checks.

Kept apart from ``Scheduler`` so each rule is unit-testable on a bare ``Request``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.request import Request, RequestStatus
from sparkserve.scheduler.sampling_params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def max_kv_positions(num_prompt_tokens: int, max_tokens: int) -> int:
    """KV positions a request can ever need: every token but the last generated one is fed back,
    so at full length it caches ``prompt + max_tokens - 1`` positions."""
    return num_prompt_tokens + max_tokens - 1


def check_admissible(request: Request, config: SchedulerConfig) -> None:
    """Raise ``RequestRejectedError`` for a request that could never be served.

    Such a request would otherwise wait forever (or be preempted forever): a prompt that is empty,
    ``prompt + max_tokens > max_model_len``, or more KV blocks at full length than the cache has
    (``param`` names the prompt when the prompt alone needs more blocks than exist).
    """
    num_prompt, max_tokens = request.num_prompt_tokens, request.sampling_params.max_tokens
    if request.num_computed_tokens or request.output_token_ids:
        raise RequestRejectedError("a new request must not carry progress", None, "invalid_request")
    if num_prompt == 0:
        raise RequestRejectedError("the prompt is empty", "prompt", "empty_prompt")
    if num_prompt + max_tokens > config.max_model_len:
        raise RequestRejectedError(
            f"This model's maximum context length is {config.max_model_len} tokens. However, you "
            f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in "
            "the completion). Please reduce the length of the prompt or completion.",
            "prompt" if num_prompt >= config.max_model_len else "max_tokens",
            "context_length_exceeded",
        )
    num_blocks = -(-max_kv_positions(num_prompt, max_tokens) // config.block_size)
    if num_blocks > config.num_kv_blocks:
        prompt_blocks = -(-num_prompt // config.block_size)
        raise RequestRejectedError(
            f"the request needs {num_blocks} KV blocks at full length ({prompt_blocks} for the prompt) "
            f"but the cache holds {config.num_kv_blocks} blocks of {config.block_size} tokens",
            "prompt" if prompt_blocks > config.num_kv_blocks else "max_tokens",
            "kv_cache_too_small",
        )


def check_sampling_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise ``RequestRejectedError`` for parameters the engine step could not use.

    The server validates every field before it builds ``SamplingParams``; this is the engine's own
    guard for any other caller, so no value that would raise inside a step reaches one: seeds
    outside int64, non-finite floats, a non-positive ``target_tpot_ms``, token ids outside the
    model's vocabulary.
    """
    if params.seed is not None and not INT64_MIN <= params.seed <= INT64_MAX:
        raise RequestRejectedError(f"seed must be an int64, got {params.seed}", "seed", "invalid_seed")
    floats = [
        ("temperature", params.temperature), ("top_p", params.top_p), ("min_p", params.min_p),
        ("presence_penalty", params.presence_penalty), ("frequency_penalty", params.frequency_penalty),
        *(("logit_bias", bias) for _, bias in params.logit_bias),
    ]
    for name, value in floats:
        if not math.isfinite(value):
            raise RequestRejectedError(f"{name} must be finite, got {value}", name, "invalid_value")
    target = params.target_tpot_ms
    if target is not None and not (math.isfinite(target) and target > 0 and target / 1000.0 > 0):
        raise RequestRejectedError(f"target_tpot_ms must be finite and > 0, got {target}", "target_tpot_ms",
                                   "invalid_value")
    if params.top_k is not None and params.top_k > INT64_MAX:
        raise RequestRejectedError(f"top_k must be an int64, got {params.top_k}", "top_k", "invalid_value")
    ids = {"stop_token_ids": params.stop_token_ids, "logit_bias": [t for t, _ in params.logit_bias]}
    for name, token_ids in ids.items():
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise RequestRejectedError(f"{name} must be token ids in [0, {vocab_size})", name, "invalid_token_id")


def check_stop(request: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """Final status after ``token`` was appended to ``request.output_token_ids``, or None.

    Order: EOS (unless ``ignore_eos``) or a ``stop_token_ids`` member -> FINISHED_STOPPED; only then
    ``max_tokens`` or ``max_model_len`` -> FINISHED_LENGTH, so a stop token landing exactly at the cap
    is a "stop". Sets ``request.stop_reason`` to the stop token id; it stays None for EOS (as vLLM
    reports it), since EOS is the model's natural end rather than a user-requested stop.
    """
    params = request.sampling_params
    if token == request.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if token in params.stop_token_ids:
        request.stop_reason = token
        return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def append_with_stop_checks(
    request: Request, sampled: list[int], max_model_len: int
) -> tuple[int, RequestStatus | None]:
    """Append ``sampled`` token by token, stopping at the first stop; returns (kept, status).

    Tokens after a stop (e.g. accepted drafts past an EOS inside a verify block) are dropped.
    """
    for index, token in enumerate(sampled):
        request.output_token_ids.append(token)
        status = check_stop(request, token, max_model_len)
        if status is not None:
            return index + 1, status
    return len(sampled), None


def token_slice(request: Request, start: int, end: int) -> tuple[int, ...]:
    """``request.all_token_ids[start:end]`` without concatenating prompt and outputs."""
    prompt, outputs = request.prompt_token_ids, request.output_token_ids
    num_prompt = len(prompt)
    if end <= num_prompt:
        return tuple(prompt[start:end])
    if start >= num_prompt:
        return tuple(outputs[start - num_prompt : end - num_prompt])
    return tuple(prompt[start:]) + tuple(outputs[: end - num_prompt])


def may_draft(request: Request, num_lookahead_tokens: int) -> bool:
    """Whether drafts made after this step could be verified: the one drafting rule, stated once.

    No drafting without a drafter (``num_lookahead_tokens`` 0); none for requests with presence /
    frequency penalties (their target distribution inside a block would depend on the drafts: verified
    correctly, but every verified position would need its own penalty counts, so speculation does not pay
    for them); none when the step's token would leave no room for a draft within ``max_tokens`` (drafts
    made now are verified after it: at most ``max_tokens - (outputs + 1) - 1`` of them, ``draft_cap``).
    """
    if num_lookahead_tokens <= 0 or request.sampling_params.needs_penalties:
        return False
    return request.sampling_params.max_tokens - request.num_output_tokens - 2 > 0


def draft_cap(request: Request, num_lookahead_tokens: int, max_model_len: int) -> int:
    """Most drafts a verify step may carry: at most gamma, and the step's up to ``l_r + 1`` emitted
    tokens must stay within ``max_tokens`` and ``max_model_len``."""
    max_tokens_left = request.sampling_params.max_tokens - request.num_output_tokens
    model_room = max_model_len - request.num_tokens
    return max(0, min(num_lookahead_tokens, max_tokens_left - 1, model_room - 1))


class PrefillSlots(NamedTuple):
    """Partial-prefill slots taken in the step being planned: requests that will still be mid-prefill
    after it (``partial``) and, of those, the ones with more than the long-prefill threshold to go."""

    partial: int
    long: int

    def plus(self, num_left_after: int, threshold: int) -> PrefillSlots:
        """The slots after admitting a request that has ``num_left_after`` tokens left after its chunk."""
        return PrefillSlots(self.partial + (num_left_after > 0), self.long + (num_left_after > threshold))


def prefill_slots_in_use(running: Sequence[Request], planned: Mapping[str, int], threshold: int) -> PrefillSlots:
    """Slots taken by running requests, given the chunk each got this step (``planned``, tokens)."""
    partial = long = 0
    for request in running:
        num_known = request.num_tokens - request.num_computed_tokens
        left = num_known - planned.get(request.request_id, 0)
        if num_known > 1 and left > 0:
            partial += 1
            long += left > threshold
    return PrefillSlots(partial, long)


def held_by_prefill_limits(num_left: int, num_new: int, slots: PrefillSlots, config: SchedulerConfig) -> bool:
    """Whether a waiting request with ``num_left`` tokens to prefill, offered a ``num_new`` chunk, must
    wait for a partial-prefill slot: only when the chunk leaves it mid-prefill, and then while
    ``max_num_partial_prefills`` are taken, or, for a long prompt (more than the threshold left),
    while ``max_long_partial_prefills`` long ones are (vLLM's partial-prefill limits)."""
    if num_new >= num_left:
        return False
    is_long = num_left > config.prefill_chunk_cap
    return slots.partial >= config.max_num_partial_prefills or (
        is_long and slots.long >= config.max_long_partial_prefills
    )
