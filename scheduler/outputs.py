"""Typed contracts between scheduler, model runner and engine (pure Python, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's work in a step: compute ``token_ids`` at positions ``start_pos ...``.

    Attributes:
        request_id: the request.
        token_ids: tokens fed to the target this step, length ``num_new_tokens``:
            a prefill chunk, or the last generated token, followed by ``num_spec_tokens`` drafts
            to verify.
        start_pos: position of ``token_ids[0]`` (= ``num_computed_tokens`` before the step).
        block_table: physical KV block ids covering positions ``[0, start_pos + num_new_tokens)``.
        num_spec_tokens: trailing draft tokens in ``token_ids`` to verify (l_r); 0 = plain decode.
        sample: True when this chunk reaches the end of the known tokens, so the runner samples
            (or verifies) and returns new tokens; False for a non-final prefill chunk.
        new_request: present the first time a request is scheduled after arrival; the runner then
            (re)creates its per-request state (sampling generator, penalty counts).
        resumed: True on the first step after a recompute preemption (runner rebuilds drafter
            context from this re-prefill).
        draft: when ``sample``, whether the runner drafts the next block for the request after this
            step (False: the scheduler's drafting gate priced it out; the drafter context still grows).
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    num_spec_tokens: int = 0
    sample: bool = True
    new_request: NewRequestData | None = None
    resumed: bool = False
    draft: bool = True

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Context length after the step (= ``start_pos + num_new_tokens``)."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class NewRequestData:
    """What the runner needs to know about a request once (sampling state)."""

    sampling_params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan for one engine step.

    Attributes:
        seqs: scheduled requests, decode/verify requests first, then prefill chunks.
        finished_request_ids: requests finished or aborted since the last step; the runner drops
            their per-request state.
        preempted_request_ids: requests preempted (recompute) in this schedule call.
        num_batched_tokens: total tokens of the step (prefill chunks + 1 + l_r per decode request).
    """

    seqs: tuple[ScheduledSeq, ...]
    finished_request_ids: frozenset[str] = frozenset()
    preempted_request_ids: tuple[str, ...] = ()
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a chosen token and the top alternatives: natural-log softmax of the
    target logits after penalties and logit_bias, before temperature and top-k/top-p/min-p filters."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class DraftProposal:
    """Drafts for a request's next verify step (from the drafter, via the runner).

    Attributes:
        token_ids: gamma draft tokens.
        confidences: conditional survival estimates c_k in (0, 1), same length (empty for drafters
            without a confidence head).
    """

    token_ids: tuple[int, ...]
    confidences: tuple[float, ...] = ()


@dataclass
class RunnerOutput:
    """What the model runner produced for a step (python ints and floats only).

    Attributes:
        sampled_token_ids: per request that sampled: accepted drafts followed by the recovered or
            bonus token (exactly one token without speculation).
        logprobs: per request, one entry per sampled token, when the request asked for logprobs.
        drafts: per request, drafts for the next step (empty without a drafter).
        num_draft_tokens_verified: per request, drafts that were verified this step (l_r).
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    drafts: dict[str, DraftProposal] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCoreOutput:
    """Per-request result of a step, after stop checks (tokens past a stop are already dropped).

    Attributes:
        request_id: the request.
        new_token_ids: tokens newly emitted this step (may be several with speculation).
        new_logprobs: one entry per new token when requested, else None.
        finish_reason: "stop" | "length" | "abort" | "error" when the request finished, else None.
        stop_reason: the stop token id that ended it, if any.
        num_prompt_tokens: prompt length (for usage).
        num_draft_tokens: drafts verified this step; num_accepted_tokens: drafts accepted.
        first_scheduled_time: ``time.monotonic()`` when the request first ran (queue-time metric).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
