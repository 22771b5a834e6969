"""Typed contracts between scheduler, model runner and engine (pure Python, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkserve.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's work in a step, as a diff against what the runner already holds (vLLM v1's
    cached-request data): the runner keeps each request's tokens, block table and sampling state
    between steps (``engine/input_batch.py``).

    The step computes positions ``start_pos .. start_pos + num_new_tokens - 1``: ``num_known_tokens``
    known tokens (a prefill chunk, or the last generated token) followed by the drafts to verify.

    Attributes:
        request_id: the request.
        start_pos: position of the first token computed (= ``num_computed_tokens`` before the step).
        num_known_tokens: known tokens (prompt or generated) computed this step.
        spec_token_ids: drafts to verify (l_r of them), appended after the known tokens; taken from the
            scheduler's copy of the request's drafts (the one source of truth for what is verified).
        spec_draft_id: the runner's id of those drafts (``DraftProposal.draft_id``), which is where their
            q lives; None for drafts the runner did not propose (deterministic, one-hot q).
        new_block_ids: physical KV blocks appended to the request's block table since the runner last
            saw it (all of them for a new request).
        num_blocks: the block table's length after this step's allocation; the runner's table is first
            cut to ``num_blocks - len(new_block_ids)`` (blocks of rejected drafts were given back).
        sample: True when this chunk reaches the end of the known tokens, so the runner samples (or
            verifies) and returns new tokens; False for a non-final prefill chunk.
        draft: when ``sample``, whether the runner drafts the next block after this step (the scheduler's
            decision: drafting gate, penalties, max_tokens; the drafter context grows regardless).
        new_request: present the first time a request is scheduled after arrival or after a recompute
            preemption; the runner then (re)creates its state from it.
    """

    request_id: str
    start_pos: int
    num_known_tokens: int
    spec_token_ids: tuple[int, ...] = ()
    spec_draft_id: int | None = None
    new_block_ids: tuple[int, ...] = ()
    num_blocks: int = 0
    sample: bool = True
    draft: bool = False
    new_request: NewRequestData | None = None

    @property
    def num_spec_tokens(self) -> int:
        """l_r, drafts verified this step."""
        return len(self.spec_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens fed to the target this step (known + drafts)."""
        return self.num_known_tokens + len(self.spec_token_ids)

    @property
    def end_pos(self) -> int:
        """Context length after the step (= ``start_pos + num_new_tokens``)."""
        return self.start_pos + self.num_new_tokens


@dataclass(frozen=True)
class NewRequestData:
    """What the runner needs to (re)create a request's state.

    Attributes:
        prompt_token_ids / output_token_ids: the request's tokens (outputs are non-empty after a
            recompute preemption: they are re-prefilled like the prompt).
        sampling_params: its sampling parameters.
    """

    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    output_token_ids: tuple[int, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


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
    """Drafts for a request's next verify step (from the runner's drafter).

    Attributes:
        token_ids: the draft tokens (gamma of them, fewer when a logits mask ended the block).
        confidences: conditional survival estimates c_k in (0, 1), same length (empty for drafters
            without a confidence head).
        draft_id: the runner's id for these drafts (their q stays in the runner under it).
        drafter: the drafter family that proposed them (per-drafter statistics).
    """

    token_ids: tuple[int, ...]
    confidences: tuple[float, ...] = ()
    draft_id: int | None = None
    drafter: str = ""


@dataclass
class RunnerOutput:
    """What the model runner produced for a step (python ints and floats only).

    Attributes:
        sampled_token_ids: per request that sampled: accepted drafts followed by the recovered or
            bonus token (exactly one token without speculation).
        logprobs: per request, one entry per sampled token, when the request asked for logprobs.
        drafts: per request, drafts for the next step (empty without a drafter).
        prompt_logprobs: per request that asked for them, on the step that samples its first token:
            one entry per prompt token after the first (``sparkserve.engine.sampling.logprobs.PromptLogprobs``).
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    drafts: dict[str, DraftProposal] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


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
        first_scheduled_time: ``time.monotonic()`` when the request first ran (queue-time metric).
        num_cached_tokens: prompt tokens found in the prefix cache at admission.
        prompt_logprobs: on the request's first output, when asked: one entry per prompt token after
            the first.

    The step's speculation counts are in the step's stats record (``sparkserve.scheduler.stats``).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
