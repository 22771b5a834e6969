"""``POST /v1/completions``: prompt(s) -> engine -> OpenAI text completion or SSE chunks.

Several prompts (a list of strings or of token-id lists) give one choice per prompt and per ``n``,
numbered ``prompt_index * n + i``; ``best_of`` is accepted only when it equals ``n`` (no
server-side ranking).

``echo`` (as vLLM serves it, what evaluation harnesses send to score a text): the prompt text goes in
front of each choice's text (the string as sent, or the decoded token ids); with ``logprobs: k`` the
logprobs cover the prompt tokens too, the first with null entries, then the generated ones, with
``text_offset`` counted from the start of the echoed text. ``max_tokens: 0`` with echo scores the prompt
without generating: the engine samples one token from the prefill's last logits (no extra forward
pass), which is dropped (``finish_reason: "length"``, no completion tokens). vLLM's ``prompt_logprobs: k``
extension gives ``choices[i].prompt_logprobs``: null for the first token, then per token a map from
token id to ``{logprob, rank, decoded_token}`` (the prompt token and the top k). Prompt logprobs come
from the engine's prefill (``SamplingParams.prompt_logprobs``; such requests bypass the prefix cache).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.server.engine_client import Tokenizer
from sparkserve.server.errors import ApiError, bad_request
from sparkserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    UsageInfo,
)
from sparkserve.server.request_validation import (
    build_sampling_params,
    check_num_choices,
    check_seed,
    check_text_fits,
    check_total_tokens,
    resolve_max_tokens,
)
from sparkserve.server.serving import ChoiceUpdate, Generation, ServerState, collect
from sparkserve.server.serving_chat import token_text
from sparkserve.server.sse import EventSourceResponse, stream_events
from sparkserve.server.structured import compile_grammar, grammar_param, grammar_spec

_MIN_LOGPROB = -9999.0


def completion_prompts(req: CompletionRequest, tokenizer: Tokenizer, max_model_len: int) -> list[list[int]]:
    """The request's prompts as token-id lists (ids are checked against the vocabulary).

    A text prompt is the client's whole model input, so special-token strings in it are special
    tokens (as in vLLM); chat contents, in contrast, never yield special tokens.
    """
    prompt = req.prompt
    if isinstance(prompt, str):
        raw: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        raw = [list(prompt)]  # type: ignore[arg-type]
    else:
        raw = list(prompt)  # type: ignore[arg-type]
    if not raw:
        raise bad_request("prompt must not be an empty list.", param="prompt")
    check_text_fits([p for p in raw if isinstance(p, str)], tokenizer, max_model_len, "prompt")
    prompts = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in raw]
    vocab_size = tokenizer.vocab_size
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise bad_request(f"prompt token ids must be in [0, {vocab_size}).", param="prompt")
    return prompts


def completion_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top_k: int, text_offset: int
) -> CompletionLogprobs:
    """Legacy completions logprobs; ``text_offset`` is where the first token starts in the text."""
    out = CompletionLogprobs()
    _append_logprobs(out, tokenizer, entries, top_k, text_offset)
    return out


def _append_logprobs(
    out: CompletionLogprobs, tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top_k: int, text_offset: int
) -> None:
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(max(entry.logprob, _MIN_LOGPROB))
        out.top_logprobs.append(
            {token_text(tokenizer, t): max(lp, _MIN_LOGPROB) for t, lp in entry.top[:top_k]}
        )
        out.text_offset.append(text_offset)
        text_offset += len(text)


def echo_logprobs(
    tokenizer: Tokenizer, prompt: Sequence[int], entries: Sequence[TokenLogprob], top_k: int
) -> CompletionLogprobs:
    """Logprobs of an echoed prompt: the first token's entries are null, the others from ``entries``
    (one per prompt token after the first, from the engine's prefill)."""
    first = token_text(tokenizer, prompt[0])
    out = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    _append_logprobs(out, tokenizer, entries, top_k, len(first))
    return out


def vllm_prompt_logprobs(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top_k: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's ``prompt_logprobs``: null for the first prompt token, then per token its own entry and the
    ``top_k`` best, keyed by token id (ranks from 1 for the top ones; null for a token outside them)."""
    out: list[dict[str, PromptLogprob] | None] = [None]
    for entry in entries:
        row = {str(t): PromptLogprob(logprob=max(lp, _MIN_LOGPROB), rank=rank, decoded_token=token_text(tokenizer, t))
               for rank, (t, lp) in enumerate(entry.top[:top_k], start=1)}
        if str(entry.token_id) not in row:
            row = {str(entry.token_id): PromptLogprob(logprob=max(entry.logprob, _MIN_LOGPROB),
                                                     decoded_token=token_text(tokenizer, entry.token_id)), **row}
        out.append(row)
    return out


@dataclass(frozen=True)
class _Echo:
    """What a request asks about its prompts. ``texts``: per prompt, the echoed text ("" without echo);
    ``score_only``: ``max_tokens`` 0 (nothing generated is reported)."""

    texts: list[str]
    score_only: bool

    @classmethod
    def of(cls, req: CompletionRequest, prompts: list[list[int]], tokenizer: Tokenizer) -> _Echo:
        if not req.echo:
            return cls([""] * len(prompts), False)
        raw = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        texts = [r if isinstance(r, str) else tokenizer.decode(p, skip_special_tokens=False)
                 for r, p in zip(raw if len(raw) == len(prompts) else prompts, prompts, strict=True)]
        return cls(texts, req.max_tokens == 0)


def _prompt_entries(update: ChoiceUpdate) -> tuple[TokenLogprob, ...]:
    if update.prompt_logprobs is None:
        raise ApiError(500, "The engine returned no prompt logprobs for a request that asked for them.",
                       code="engine_error")
    return update.prompt_logprobs


def _choice_delta(
    generation: Generation, req: CompletionRequest, echo: _Echo, update: ChoiceUpdate, first: bool, offset: int
) -> CompletionChoice:
    """One choice's text, logprobs and prompt logprobs for ``update`` (the echo on its ``first``);
    ``offset``: characters of this choice sent before."""
    tokenizer = generation.state.engine.tokenizer
    choice = generation.choices[update.index]
    prefix = echo.texts[choice.prompt_index] if first else ""
    generated = "" if echo.score_only else update.text
    logprobs = prompt_lp = None
    if req.logprobs is not None:
        logprobs = CompletionLogprobs()
        if first and req.echo:
            logprobs = echo_logprobs(tokenizer, choice.prompt_token_ids, _prompt_entries(update), req.logprobs)
            logprobs.text_offset[:] = [offset + o for o in logprobs.text_offset]
        if not echo.score_only:
            _append_logprobs(logprobs, tokenizer, update.logprobs or (), req.logprobs, offset + len(prefix))
    if first and req.prompt_logprobs is not None:
        prompt_lp = vllm_prompt_logprobs(tokenizer, _prompt_entries(update), req.prompt_logprobs)
    finish = "length" if echo.score_only and update.finish_reason is not None else update.finish_reason
    return CompletionChoice(index=update.index, text=prefix + generated, logprobs=logprobs, finish_reason=finish,
                            stop_reason=None if echo.score_only else update.stop_reason, prompt_logprobs=prompt_lp)


def _usage(generation: Generation, echo: _Echo) -> UsageInfo:
    usage = generation.usage()
    if echo.score_only:  # the one token sampled to end the request is not reported
        usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
    return usage


async def create_completion(req: CompletionRequest, raw_request: Request, state: ServerState) -> Response:
    """Validate, submit and answer one completions request (streaming or not)."""
    arrival = time.monotonic()
    state.check_can_serve(req.model)
    state.check_ignored_fields(req)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported.", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens 0 is only allowed with echo (scoring the prompt).", param="max_tokens")
    check_seed(req.seed, req.n)
    engine = state.engine
    prompts = await run_in_threadpool(completion_prompts, req, engine.tokenizer, engine.max_model_len)
    check_num_choices(state.max_choices, len(prompts), req.n)
    max_tokens = [
        resolve_max_tokens(
            req.requested_max_tokens(), len(p), engine.max_model_len,
            state.default_max_tokens_for(req.n * len(prompts)), "prompt",
        )
        for p in prompts
    ]
    check_total_tokens(state.max_total_tokens, max_tokens, req.n)
    echo = _Echo.of(req, prompts, engine.tokenizer)
    # Prompt logprobs: the larger k of echo's logprobs and of prompt_logprobs (each slices its own).
    asks = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    params = [
        dataclasses.replace(  # max_tokens 0 (score only): one token ends the request, then is dropped
            build_sampling_params(req, engine.tokenizer, max_tokens=max(m, 1), logprobs=req.logprobs),
            prompt_logprobs=max(asks) if asks else None,
        )
        for m in max_tokens
    ]
    spec = grammar_spec(req)
    if spec is not None:  # compiled (or a 400) before the request reaches the engine
        grammar = await run_in_threadpool(compile_grammar, engine.tokenizer.grammar_compiler, spec, grammar_param(req))
        params = [dataclasses.replace(p, grammar=grammar) for p in params]
    generation = Generation.create(
        state, f"cmpl-{uuid.uuid4().hex}", prompts, params, req.n, arrival_time=arrival
    )
    await generation.submit()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(_completion_chunks(generation, req, echo, include_usage))
        return EventSourceResponse(events, background=BackgroundTask(generation.close))
    updates = await collect(generation, raw_request)
    if updates is None:
        return Response(status_code=499)  # client closed the connection; nobody reads this
    return JSONResponse(_completion_response(generation, req, echo, updates).model_dump(mode="json"))


def _completion_response(
    generation: Generation, req: CompletionRequest, echo: _Echo, updates: list[ChoiceUpdate]
) -> CompletionResponse:
    """The whole response: each choice's updates merged into one (the first carries the echo)."""
    choices: dict[int, CompletionChoice] = {}
    for update in updates:
        merged = choices.get(update.index)
        delta = _choice_delta(generation, req, echo, update, merged is None, len(merged.text) if merged else 0)
        if merged is None:
            choices[update.index] = delta
            continue
        if merged.logprobs is not None and delta.logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(merged.logprobs, name).extend(getattr(delta.logprobs, name))
        merged.text += delta.text
        merged.finish_reason, merged.stop_reason = delta.finish_reason, delta.stop_reason
    ordered = [choices.get(i, CompletionChoice(index=i, text="")) for i in range(len(generation.choices))]
    return CompletionResponse(id=generation.response_id, model=req.model, choices=ordered, usage=_usage(generation, echo))


async def _completion_chunks(
    generation: Generation, req: CompletionRequest, echo: _Echo, include_usage: bool
) -> AsyncIterator[str]:
    offsets = [0] * len(generation.choices)
    started = [False] * len(generation.choices)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    async for update in generation.updates():
        first = not started[update.index]
        has_tokens = req.logprobs is not None and update.token_ids and not echo.score_only
        if not (update.text or update.finish_reason or has_tokens or (first and (req.echo or req.prompt_logprobs is not None))):
            continue
        started[update.index] = True
        choice = _choice_delta(generation, req, echo, update, first, offsets[update.index])
        offsets[update.index] += len(choice.text)
        yield CompletionResponse(
            id=generation.response_id, model=req.model, choices=[choice],
            usage=_usage(generation, echo) if continuous else None,
        ).model_dump_json()
    if include_usage:
        yield CompletionResponse(
            id=generation.response_id, model=req.model, choices=[], usage=_usage(generation, echo)
        ).model_dump_json()
