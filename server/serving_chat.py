"""``POST /v1/chat/completions``: chat template -> engine -> OpenAI response or SSE chunks."""

from __future__ import annotations

import dataclasses
import json
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
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
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
from sparkserve.server.sse import EventSourceResponse, stream_events
from sparkserve.server.structured import (
    chat_messages,
    compile_grammar,
    grammar_param,
    grammar_spec,
    uses_tools,
)
from sparkserve.server.tool_parsers import HermesStreamParser, parse_tool_calls

_MIN_LOGPROB = -9999.0  # OpenAI reports impossible tokens with this instead of -inf


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token as logprobs report it (special tokens included)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=max(logprob, _MIN_LOGPROB), bytes=list(text.encode()))


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top_k: int) -> ChatLogprobs:
    """OpenAI chat ``logprobs.content`` for the given tokens, with ``top_k`` alternatives each."""
    content = []
    for entry in entries:
        chosen = _top(tokenizer, entry.token_id, entry.logprob)
        alternatives = [_top(tokenizer, t, lp) for t, lp in entry.top[:top_k]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def build_chat_prompt(
    req: ChatCompletionRequest, tokenizer: Tokenizer, max_model_len: int, add_generation_prompt: bool = True
) -> list[int]:
    """Render the chat template (``developer`` is sent as ``system``) and tokenize it; special tokens
    come only from the template's markup (``tokenizer.encode_chat``: message contents are text).
    ``add_generation_prompt`` ends the text with the assistant turn's header (``/tokenize`` may omit it).

    Raises:
        ApiError: 400 when the contents cannot fit the context (checked before tokenizing) or the
            template rejects the messages.
    """
    messages, extra = chat_messages(req, tokenizer.chat_template)
    check_text_fits(["".join(m["content"] for m in messages) + json.dumps(extra)], tokenizer, max_model_len, "messages")
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # jinja2 errors such as raise_exception("roles must alternate")
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc


async def create_chat_completion(
    req: ChatCompletionRequest, raw_request: Request, state: ServerState
) -> Response:
    """Validate, submit and answer one chat completion request (streaming or not)."""
    arrival = time.monotonic()
    state.check_can_serve(req.model)
    state.check_ignored_fields(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    check_num_choices(state.max_choices, 1, req.n)
    check_seed(req.seed, req.n)
    engine = state.engine
    # Off the event loop: a long prompt takes a while to render and tokenize.
    prompt = await run_in_threadpool(build_chat_prompt, req, engine.tokenizer, engine.max_model_len)
    max_tokens = resolve_max_tokens(
        req.requested_max_tokens(), len(prompt), engine.max_model_len, state.default_max_tokens_for(req.n),
        "messages",
    )
    check_total_tokens(state.max_total_tokens, [max_tokens], req.n)
    top_k = req.top_logprobs or 0
    params = build_sampling_params(
        req, engine.tokenizer, max_tokens=max_tokens, logprobs=top_k if req.logprobs else None
    )
    spec = grammar_spec(req)
    if spec is not None:  # compiled (or a 400) before the request reaches the engine
        compiler = engine.tokenizer.grammar_compiler
        grammar = await run_in_threadpool(compile_grammar, compiler, spec, grammar_param(req))
        params = dataclasses.replace(params, grammar=grammar)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation.create(state, response_id, [prompt], [params], req.n, arrival_time=arrival)
    await generation.submit()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(_chat_chunks(generation, req, top_k, include_usage))
        return EventSourceResponse(events, background=BackgroundTask(generation.close))
    updates = await collect(generation, raw_request)
    if updates is None:
        return Response(status_code=499)  # client closed the connection; nobody reads this
    return JSONResponse(_chat_response(generation, req, updates, top_k).model_dump(mode="json"))


def _chat_response(
    generation: Generation, req: ChatCompletionRequest, updates: list[ChoiceUpdate], top_k: int
) -> ChatCompletionResponse:
    tokenizer = generation.state.engine.tokenizer
    texts = ["" for _ in generation.choices]
    logprobs: list[list[TokenLogprob]] = [[] for _ in generation.choices]
    finish: list[tuple[str | None, int | str | None]] = [(None, None) for _ in generation.choices]
    for update in updates:
        texts[update.index] += update.text
        logprobs[update.index].extend(update.logprobs or ())
        if update.finish_reason is not None:
            finish[update.index] = (update.finish_reason, update.stop_reason)
    choices = []
    for i in range(len(generation.choices)):
        message = ChatResponseMessage(content=texts[i])
        reason = finish[i][0]
        if uses_tools(req):
            content, calls = parse_tool_calls(texts[i])
            if calls:
                message = ChatResponseMessage(content=content, tool_calls=calls)
                reason = "tool_calls" if reason == "stop" else reason
        choices.append(ChatChoice(
            index=i, message=message, logprobs=chat_logprobs(tokenizer, logprobs[i], top_k) if req.logprobs else None,
            finish_reason=reason, stop_reason=finish[i][1],
        ))
    return ChatCompletionResponse(
        id=generation.response_id, model=req.model, choices=choices, usage=generation.usage()
    )


async def _chat_chunks(
    generation: Generation, req: ChatCompletionRequest, top_k: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE data payloads: a role chunk per choice, content deltas, then an optional usage chunk."""
    tokenizer = generation.state.engine.tokenizer

    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choices: list[ChatChunkChoice]) -> str:
        return ChatCompletionChunk(
            id=generation.response_id, model=req.model, choices=choices,
            usage=generation.usage() if continuous else None,
        ).model_dump_json()

    for choice in generation.choices:
        yield chunk([ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))])
    parsers = {c.index: HermesStreamParser() for c in generation.choices} if uses_tools(req) else {}
    async for update in generation.updates():
        if not (update.text or update.finish_reason or (req.logprobs and update.token_ids)):
            continue
        logprobs = chat_logprobs(tokenizer, update.logprobs or (), top_k) if req.logprobs else None
        delta, reason = DeltaMessage(content=update.text) if update.text else DeltaMessage(), update.finish_reason
        parser = parsers.get(update.index)
        if parser is not None:
            parsed = parser.feed(update.text)
            if update.finish_reason is not None:
                rest = parser.finish()
                parsed.content += rest.content
                reason = "tool_calls" if parser.num_calls and reason == "stop" else reason
            delta = DeltaMessage(content=parsed.content or None, tool_calls=parsed.tool_calls or None)
            if delta.content is None and delta.tool_calls is None and reason is None and logprobs is None:
                continue
        yield chunk(
            [
                ChatChunkChoice(
                    index=update.index, delta=delta, logprobs=logprobs,
                    finish_reason=reason, stop_reason=update.stop_reason,
                )
            ]
        )
    if include_usage:
        yield ChatCompletionChunk(
            id=generation.response_id, model=req.model, choices=[], usage=generation.usage()
        ).model_dump_json()
