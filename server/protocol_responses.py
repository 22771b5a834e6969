"""OpenAI Responses API models (``POST /v1/responses``), the stateless subset vLLM serves.

Request: ``input`` (a string or message / ``function_call`` / ``function_call_output`` items, as the
SDKs and the Agents SDK send them back, ids and statuses included), ``instructions``,
``max_output_tokens``, ``temperature`` / ``top_p``, ``text.format`` (``text`` / ``json_object`` /
``json_schema``), function ``tools`` with ``tool_choice``, ``stream``. ``store: true``,
``previous_response_id`` and ``background: true`` need server-side state and are a 400. The other OpenAI
fields that mean nothing here are ignored with a warning (``IgnoredOpenAIFields``).

Response: a ``response`` object whose ``output`` holds a ``message`` item (``output_text`` content)
and / or ``function_call`` items, with ``usage`` in input / output tokens. Streams are typed SSE events
(``event: <type>``), each a model below with a ``sequence_number``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from sparkserve.server.protocol import MAX_MESSAGES, IgnoredOpenAIFields, Text, _Request, _Response

# ---- request --------------------------------------------------------------------------------------


class InputText(_Request):
    type: Literal["input_text", "output_text", "text"]
    text: Text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[InputText]
    id: Text | None = None
    status: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text
    id: Text | None = None
    status: Text | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text
    id: Text | None = None
    status: Text | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(_Request):
    type: Literal["function"]
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Request):
    type: Literal["function"]
    name: Text


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Text | None = None


class ResponsesRequest(IgnoredOpenAIFields):
    """``POST /v1/responses`` body."""

    model: Text
    input: Text | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    previous_response_id: Text | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[Text] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    stream_options: dict[str, Any] | None = None

    def ignored_fields(self) -> list[str]:
        """The OpenAI fields with no effect here, the Responses API's own included."""
        own = [name for name in ("reasoning", "include", "max_tool_calls", "top_logprobs", "stream_options")
               if name in self.model_fields_set and getattr(self, name) is not None]
        return super().ignored_fields() + own

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("this server is stateless: it keeps no responses (send the whole conversation as input)")
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value


# ---- response -------------------------------------------------------------------------------------


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(_Response):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class OutputFunctionCall(_Response):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(_Response):
    cached_tokens: int = 0


class OutputTokensDetails(_Response):
    reasoning_tokens: int = 0


class ResponseUsage(_Response):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(_Response):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "completed"
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    previous_response_id: str | None = None
    store: bool = False
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, Any] = Field(default_factory=dict)


# ---- stream events --------------------------------------------------------------------------------


class _Event(_Response):
    sequence_number: int = 0


class _ResponseEvent(_Event):
    response: ResponseObject


class _OutputItemEvent(_Event):
    output_index: int
    item: OutputItem


class _ItemEvent(_Event):
    item_id: str
    output_index: int


class _ContentEvent(_ItemEvent):
    content_index: int = 0


class ResponseCreatedEvent(_ResponseEvent):
    type: Literal["response.created"] = "response.created"


class ResponseInProgressEvent(_ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"


class ResponseCompletedEvent(_ResponseEvent):
    type: Literal["response.completed"] = "response.completed"


class ResponseIncompleteEvent(_ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"


class OutputItemAddedEvent(_OutputItemEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"


class OutputItemDoneEvent(_OutputItemEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"


class ContentPartAddedEvent(_ContentEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: OutputText


class ContentPartDoneEvent(_ContentEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: OutputText


class OutputTextDeltaEvent(_ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(_ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class FunctionCallArgumentsDoneEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    name: str
    arguments: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


ResponseStreamEvent = (
    ResponseCreatedEvent | ResponseInProgressEvent | ResponseCompletedEvent | ResponseIncompleteEvent
    | OutputItemAddedEvent | OutputItemDoneEvent | ContentPartAddedEvent | ContentPartDoneEvent
    | OutputTextDeltaEvent | OutputTextDoneEvent | FunctionCallArgumentsDeltaEvent | FunctionCallArgumentsDoneEvent
    | ErrorEvent
)
