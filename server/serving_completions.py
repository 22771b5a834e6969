"""``POST /v1/completions``: prompt(s) -> engine -> OpenAI text completion or SSE chunks.

Several prompts (a list of strings or of token-id lists) give one choice per prompt and per ``n``,
numbered ``prompt_index * n + i``; ``best_of`` is accepted only when it equals ``n`` (no
server-side ranking).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.server.engine_client import Tokenizer
from sparkserve.server.errors import bad_request
from sparkserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(max(entry.logprob, _MIN_LOGPROB))
        out.top_logprobs.append(
            {token_text(tokenizer, t): max(lp, _MIN_LOGPROB) for t, lp in entry.top[:top_k]}
        )
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


async def create_completion(req: CompletionRequest, raw_request: Request, state: ServerState) -> Response:
    """Validate, submit and answer one completions request (streaming or not)."""
    arrival = time.monotonic()
    state.check_can_serve(req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported.", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
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
    params = [
        build_sampling_params(req, engine.tokenizer, max_tokens=m, logprobs=req.logprobs) for m in max_tokens
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
        events = stream_events(_completion_chunks(generation, req, include_usage))
        return EventSourceResponse(events, background=BackgroundTask(generation.close))
    updates = await collect(generation, raw_request)
    if updates is None:
        return Response(status_code=499)  # client closed the connection; nobody reads this
    return JSONResponse(_completion_response(generation, req, updates).model_dump(mode="json"))


def _completion_response(
    generation: Generation, req: CompletionRequest, updates: list[ChoiceUpdate]
) -> CompletionResponse:
    tokenizer = generation.state.engine.tokenizer
    num_choices = len(generation.choices)
    texts = ["" for _ in range(num_choices)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
    finish: list[tuple[str | None, int | str | None]] = [(None, None)] * num_choices
    for update in updates:
        texts[update.index] += update.text
        entries[update.index].extend(update.logprobs or ())
        if update.finish_reason is not None:
            finish[update.index] = (update.finish_reason, update.stop_reason)
    top_k = req.logprobs or 0
    choices = [
        CompletionChoice(
            index=i,
            text=texts[i],
            logprobs=None if req.logprobs is None else completion_logprobs(tokenizer, entries[i], top_k, 0),
            finish_reason=finish[i][0],
            stop_reason=finish[i][1],
        )
        for i in range(num_choices)
    ]
    return CompletionResponse(
        id=generation.response_id, model=req.model, choices=choices, usage=generation.usage()
    )


async def _completion_chunks(
    generation: Generation, req: CompletionRequest, include_usage: bool
) -> AsyncIterator[str]:
    tokenizer = generation.state.engine.tokenizer
    offsets = [0] * len(generation.choices)
    top_k = req.logprobs or 0
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    async for update in generation.updates():
        if not (update.text or update.finish_reason or (req.logprobs is not None and update.token_ids)):
            continue
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(tokenizer, update.logprobs or (), top_k, offsets[update.index])
        offsets[update.index] += len(update.text)
        choice = CompletionChoice(
            index=update.index,
            text=update.text,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
            stop_reason=update.stop_reason,
        )
        yield CompletionResponse(
            id=generation.response_id, model=req.model, choices=[choice],
            usage=generation.usage() if continuous else None,
        ).model_dump_json()
    if include_usage:
        yield CompletionResponse(
            id=generation.response_id, model=req.model, choices=[], usage=generation.usage()
        ).model_dump_json()
