"""OpenAI API request and response models (pydantic).

Requests forbid unknown fields, as OpenAI does ("Unrecognized request argument supplied"), so a
misspelt parameter is a 400 instead of being silently ignored. Vendor extensions (vLLM-style) are
``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``, ``target_tpot_ms`` and the structured-output
extras ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``structured_outputs``. Features that
are not supported (legacy ``functions`` / ``function_call``, suffix, non-text content parts) are
declared so that their use fails with a 400 naming the parameter.

Fields that OpenAI's API defines but that mean nothing for a self-hosted model (``service_tier``,
``store``, ``metadata``, ``prompt_cache_key``, ``safety_identifier``, ``reasoning_effort``, ``verbosity``,
...: :data:`IGNORED_OPENAI_FIELDS`) are declared too, so the SDKs and agent frameworks that send them get
an answer: the server logs a warning and changes nothing in the output (as vLLM does), or, in strict
mode (``--strict-openai-fields``), refuses them with a 400.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from sparkserve.server.router_fields import RouterChatFields, RouterCompletionFields

# Request limits (each violation is a 400 whose message states the limit).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_MESSAGES = 2048
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0
TARGET_TPOT_MS_RANGE = (0.1, 60_000.0)
_TOKEN_ID_KEY = re.compile(r"\s*[0-9]{1,10}\s*")  # ASCII digits only: "²".isdigit() but int("²") fails


def _encodable(text: str) -> str:
    """Reject strings that are not valid Unicode text (JSON escapes of lone UTF-16 surrogates such as
    ``"\\ud800"`` decode to them; the tokenizer and the JSON encoder would fail on them later)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"strings must be valid Unicode text: {exc.reason} at position {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
"""A request string: any Unicode text without lone surrogates."""


class _Request(BaseModel):
    # allow_inf_nan=False: Infinity / NaN (which Python's JSON parser accepts) are a 400 for every
    # float field, so no non-finite number reaches the engine.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="extension (as vLLM): with include_usage, every chunk carries the usage so far"
    )


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCallIn(_Request):
    name: Text
    arguments: Text


class ToolCallIn(_Request):
    """A tool call of an earlier assistant message (sent back by the client)."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    """One message; ``content`` is a string or a list of text parts (other part types -> 400).
    An assistant message may carry ``tool_calls`` (content then may be null); a ``tool`` message answers
    one call (``tool_call_id``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only for an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM-style ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None


def _reject_unless_empty(value: Any, what: str) -> Any:
    if value not in (None, [], "none"):
        raise ValueError(f"{what} are not supported by this server")
    return value


IGNORED_OPENAI_FIELDS = (
    "service_tier", "store", "metadata", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "safety_identifier", "reasoning_effort", "verbosity", "prediction", "modalities", "moderation",
)
"""OpenAI request fields accepted and ignored (a warning each), or a 400 in strict mode."""


class IgnoredOpenAIFields(_Request):
    """Fields of OpenAI's request types with no effect on a self-hosted model (see module docstring).

    Types are loose on purpose: whatever shape a newer SDK sends, it is ignored; a value that would
    change the output here (``modalities`` with audio) is refused.
    """

    service_tier: Text | None = None
    store: bool | None = None
    metadata: dict[Text, Any] | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Text | None = None
    reasoning_effort: Text | None = None
    verbosity: Text | None = None
    prediction: Any = None
    modalities: list[Literal["text"]] | None = Field(None, description="only text output is served")
    moderation: Any = None

    def ignored_fields(self) -> list[str]:
        """The ignored fields the client set to something other than null, in declaration order."""
        return [name for name in IGNORED_OPENAI_FIELDS
                if name in self.model_fields_set and getattr(self, name) is not None]


class SamplingRequestFields(IgnoredOpenAIFields):
    """Fields shared by chat and completions requests."""

    model: Text
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension; -1 or 0 = disabled")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="int64; choice i uses seed + i")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="extension"
    )
    max_tokens: int | None = Field(None, ge=1)
    ignore_eos: bool = Field(False, description="extension")
    logit_bias: dict[Text, float] | None = None
    target_tpot_ms: float | None = Field(
        None, ge=TARGET_TPOT_MS_RANGE[0], le=TARGET_TPOT_MS_RANGE[1], description="extension, milliseconds"
    )
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries are allowed, got {len(value)}")
        for key, bias in (value or {}).items():
            if _TOKEN_ID_KEY.fullmatch(key) is None:
                raise ValueError(f"keys must be token ids (decimal integers) given as strings, got {key[:32]!r}")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"bias values must be in [-100, 100], got {bias}")
        return value

    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as sorted (token id, bias) pairs (keys were checked to be decimal integers)."""
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GuidedDecodingFields(_Request):
    """vLLM-style structured-output extensions (chat and completions)."""

    guided_json: dict[str, Any] | None = Field(None, description="extension (vLLM)")
    guided_regex: Text | None = Field(None, description="extension (vLLM)")
    guided_choice: list[Text] | None = Field(None, description="extension (vLLM)")
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (vLLM)")


class ChatCompletionRequest(SamplingRequestFields, GuidedDecodingFields, RouterChatFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("functions", "function_call")
    @classmethod
    def _check_functions(cls, value: Any) -> Any:
        return _reject_unless_empty(value, "legacy functions / function_call (use tools)")

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type == "json_schema" and value.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return value

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequestFields, GuidedDecodingFields, RouterCompletionFields):
    """``POST /v1/completions`` body.

    ``prompt`` is a string, a list of strings, a list of token ids or a list of token-id lists;
    several prompts give ``len(prompts) * n`` choices, choice ``index = prompt_index * n + i``
    (as OpenAI numbers them).
    """

    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = Field(False, description="the prompt in front of the completion (with logprobs: the prompt's too)")
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="extension (vLLM): each prompt token's logprob and top-k"
    )
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    """OpenAI ``usage.prompt_tokens_details``: prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class DrafterUsage(_Response):
    """Speculation of one drafter family within a response."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class SpeculationUsage(_Response):
    """Vendor extension ``usage.speculation``: verify steps with drafts (``drafts``), drafts verified
    (``draft_tokens``) and accepted (``accepted_tokens``), in all and by drafter family."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    by_drafter: dict[str, DrafterUsage] = Field(default_factory=dict)


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    speculation: SpeculationUsage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(_Response):
    """Legacy completions logprobs; with ``echo`` the prompt's first token has null entries."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's ``prompt_logprobs`` entry of one token (keyed by its id): ``rank`` 1 is the most likely
    token; null for a prompt token outside the top-k."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="plain")
    def _drop_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}


class DeltaToolCall(_Response):
    """A streamed tool-call fragment: the first carries ``id``, ``type`` and the function name, later
    ones argument fragments, all under the call's ``index``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="plain")
    def _drop_none(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        out.update({k: v for k, v in (("id", self.id), ("type", self.type)) if v is not None})
        if self.function is not None:
            out["function"] = self.function.model_dump()
        return out


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    tool_calls: list[ToolCall] | None = None


class DeltaMessage(_Response):
    """A streamed delta; unset fields are omitted rather than sent as null (as OpenAI does)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="plain")
    def _drop_none(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls is not None:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


def _now() -> int:
    return int(time.time())


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(_Response):
    """Used both for a whole completion and, with ``object`` unchanged, for stream chunks (as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sparkserve"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
