"""``POST /v1/responses``: the Responses API on top of the chat path (template, grammar, tool parser).

A request becomes a chat request: ``instructions`` a leading system message, ``input`` items messages
(``function_call`` items an assistant message's ``tool_calls``, ``function_call_output`` items ``tool``
messages), ``text.format`` the ``response_format``, ``max_output_tokens`` the completion limit, function
tools and ``tool_choice`` the chat tools (the same Hermes grammar and parser). The answer's ``output`` is
one ``message`` item with the text (when there is any) and one ``function_call`` item per call; status
``incomplete`` (reason ``max_output_tokens``) when the limit cut it. Streams send typed events:
``response.created``, ``response.in_progress``, per item ``response.output_item.added``, text
``response.content_part.added`` / ``response.output_text.delta`` / ``.done`` / ``content_part.done``,
call ``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``, then
``response.completed`` (or ``response.incomplete``) carrying the whole response with its usage.
Stateless: ``store: true`` is a 400 (``previous_response_id`` too, in the protocol).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from sparkserve.server.errors import ApiError, bad_request, internal_error
from sparkserve.server.protocol import ChatCompletionRequest
from sparkserve.server.protocol_responses import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
    ResponseUsage,
    ToolChoiceFunction,
)
from sparkserve.server.request_validation import build_sampling_params, check_total_tokens, resolve_max_tokens
from sparkserve.server.serving import Generation, ServerState, collect
from sparkserve.server.serving_chat import build_chat_prompt
from sparkserve.server.sse import EventSourceResponse
from sparkserve.server.structured import compile_grammar, grammar_param, grammar_spec, uses_tools
from sparkserve.server.tool_parsers import HermesStreamParser, parse_tool_calls


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that ``req`` means (see module docstring). Raises RequestValidationError (400)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text()})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_completion_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p,
                            "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


async def create_response(req: ResponsesRequest, raw_request: Request, state: ServerState) -> Response:
    """Validate, submit and answer one Responses API request (streaming or not)."""
    arrival = time.monotonic()
    state.check_can_serve(req.model)
    if req.store:
        raise bad_request("store is not supported: this server is stateless (send store: false).", param="store")
    state.check_ignored_fields(req.model_copy(update={"store": None}))
    chat = to_chat_request(req)
    engine = state.engine
    try:
        prompt = await run_in_threadpool(build_chat_prompt, chat, engine.tokenizer, engine.max_model_len)
    except ApiError as exc:  # the chat path names its field "messages": here it is "input"
        exc.param = "input" if exc.param == "messages" else exc.param
        raise
    max_tokens = resolve_max_tokens(chat.requested_max_tokens(), len(prompt), engine.max_model_len,
                                    state.default_max_tokens_for(1), "input")
    check_total_tokens(state.max_total_tokens, [max_tokens], 1)
    params = build_sampling_params(chat, engine.tokenizer, max_tokens=max_tokens, logprobs=None)
    spec = grammar_spec(chat)
    if spec is not None:
        grammar = await run_in_threadpool(compile_grammar, engine.tokenizer.grammar_compiler, spec, grammar_param(chat))
        params = dataclasses.replace(params, grammar=grammar)
    generation = Generation.create(state, f"resp_{uuid.uuid4().hex}", [prompt], [params], 1, arrival_time=arrival)
    await generation.submit()
    if req.stream:
        events = _sse(_stream(generation, req, chat))
        return EventSourceResponse(events, background=BackgroundTask(generation.close))
    updates = await collect(generation, raw_request)
    if updates is None:
        return Response(status_code=499)
    text = "".join(u.text for u in updates)
    finish = next((u.finish_reason for u in updates if u.finish_reason is not None), None)
    content, calls = parse_tool_calls(text) if uses_tools(chat) else (text, [])
    output: list[OutputItem] = []
    if content:
        output.append(OutputMessage(id=_item_id("msg"), content=[OutputText(text=content)]))
    output += [OutputFunctionCall(id=_item_id("fc"), call_id=c.id, name=c.function.name, arguments=c.function.arguments)
               for c in calls]
    return JSONResponse(_response(generation, req, output, finish).model_dump(mode="json"))


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _response(generation: Generation, req: ResponsesRequest, output: list[OutputItem], finish: str | None,
              status: str | None = None) -> ResponseObject:
    """The response object; ``finish`` (the choice's finish reason) "length" makes it incomplete."""
    usage = generation.usage()
    incomplete = finish == "length"
    return ResponseObject(
        id=generation.response_id, model=req.model, output=output,
        status=status or ("incomplete" if incomplete else "completed"),
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete and status is None else None,
        usage=None if status == "in_progress" else ResponseUsage(
            input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0)),
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, tools=[t.model_dump(exclude_none=True) for t in req.tools or ()],
        tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, ToolChoiceFunction)
        else req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text is not None else {"format": {"type": "text"}},
        metadata=req.metadata or {},
    )


async def _sse(events: AsyncIterator[ResponseStreamEvent]) -> AsyncIterator[dict[str, str]]:
    """Typed SSE events (``event: <type>``, numbered); an error after the first byte is an ``error`` event."""
    number = 0
    try:
        async for event in events:
            event.sequence_number = number
            number += 1
            yield {"event": event.type, "data": event.model_dump_json()}
    except Exception as exc:
        error = exc if isinstance(exc, ApiError) else internal_error(exc)
        event = ErrorEvent(sequence_number=number, code=str(error.code) if error.code else None, message=error.message,
                           param=error.param)
        yield {"event": "error", "data": event.model_dump_json()}


@dataclasses.dataclass
class _StreamState:
    """The output items of a streamed response as they open (``output`` in order)."""

    output: list[OutputItem] = dataclasses.field(default_factory=list)
    message: OutputMessage | None = None
    calls: dict[int, OutputFunctionCall] = dataclasses.field(default_factory=dict)  # parser call index -> item
    held: str = ""  # whitespace before any text of a tool-using reply (dropped if nothing follows, as unstreamed)

    def text(self, delta: str, hold_whitespace: bool) -> list[ResponseStreamEvent]:
        if self.message is None and hold_whitespace and not (self.held + delta).strip():
            self.held += delta
            return []
        delta, self.held = self.held + delta, ""
        events: list[ResponseStreamEvent] = []
        if self.message is None:
            self.message = OutputMessage(id=_item_id("msg"), status="in_progress", content=[OutputText(text="")])
            self.output.append(self.message)
            index = len(self.output) - 1
            events += [OutputItemAddedEvent(output_index=index, item=self.message.model_copy(update={"content": []})),
                       ContentPartAddedEvent(item_id=self.message.id, output_index=index, part=OutputText(text=""))]
        self.message.content[0].text += delta
        events.append(OutputTextDeltaEvent(item_id=self.message.id, output_index=self.output.index(self.message),
                                           delta=delta))
        return events

    def call(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> list[ResponseStreamEvent]:
        events: list[ResponseStreamEvent] = []
        item = self.calls.get(index)
        if item is None:
            item = OutputFunctionCall(id=_item_id("fc"), call_id=call_id or _item_id("call"), name=name or "",
                                      arguments="", status="in_progress")
            self.calls[index] = item
            self.output.append(item)
            events.append(OutputItemAddedEvent(output_index=len(self.output) - 1, item=item.model_copy()))
        if arguments:
            item.arguments += arguments
            events.append(FunctionCallArgumentsDeltaEvent(item_id=item.id, output_index=self.output.index(item),
                                                          delta=arguments))
        return events

    def close(self) -> list[ResponseStreamEvent]:
        events: list[ResponseStreamEvent] = []
        for index, item in enumerate(self.output):
            item.status = "completed"
            if isinstance(item, OutputMessage):
                part = item.content[0]
                events += [OutputTextDoneEvent(item_id=item.id, output_index=index, text=part.text),
                           ContentPartDoneEvent(item_id=item.id, output_index=index, part=part)]
            else:
                events.append(FunctionCallArgumentsDoneEvent(item_id=item.id, output_index=index, name=item.name,
                                                             arguments=item.arguments))
            events.append(OutputItemDoneEvent(output_index=index, item=item.model_copy(deep=True)))
        return events


async def _stream(generation: Generation, req: ResponsesRequest, chat: ChatCompletionRequest
                  ) -> AsyncIterator[ResponseStreamEvent]:
    started = _response(generation, req, [], None, status="in_progress")
    yield ResponseCreatedEvent(response=started)
    yield ResponseInProgressEvent(response=started)
    parser = HermesStreamParser() if uses_tools(chat) else None
    state, finish = _StreamState(), None
    async for update in generation.updates():
        if parser is None:
            deltas, calls = update.text, []
        else:
            parsed = parser.feed(update.text)
            if update.finish_reason is not None:
                parsed.content += parser.finish().content
            deltas, calls = parsed.content, parsed.tool_calls
        for event in state.text(deltas, parser is not None) if deltas else ():
            yield event
        for call in calls:
            function = call.function
            for event in state.call(call.index, call.id, function.name if function else None,
                                    function.arguments if function else None):
                yield event
        finish = update.finish_reason or finish
    for event in state.close():
        yield event
    final = _response(generation, req, state.output, finish)
    yield ResponseIncompleteEvent(response=final) if final.status == "incomplete" else ResponseCompletedEvent(response=final)
