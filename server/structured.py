"""Structured outputs and tool calls of a chat request: which grammar constrains it, and the prompt.

``response_format`` (``json_object``, ``json_schema``), the vLLM-style extras (``guided_json``,
``guided_regex``, ``guided_choice``, ``structured_outputs``) and ``tool_choice`` ``required`` / named
each become one ``GrammarSpec``; the tokenizer's ``GrammarCompiler`` compiles it (cached by spec, with a
time limit) before the request reaches the engine, so a schema the engine cannot compile is a 400 with
the engine's message before any SSE byte.

Tool calls use the Hermes format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as
Hermes / Qwen models emit): a template that renders ``tools`` itself gets them; one that does not (SmolLM2)
gets the default Hermes tool prompt below, with assistant ``tool_calls`` rendered as ``<tool_call>``
blocks and ``tool`` messages as ``<tool_response>`` user turns.
"""

from __future__ import annotations

import json
from typing import Any

from sparkserve.engine.structured.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, GrammarError, GrammarSpec
from sparkserve.server.errors import bad_request
from sparkserve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

HERMES_TOOL_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>{tools}</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-dict>}}\n</tool_call>"
)


def uses_tools(req: ChatCompletionRequest) -> bool:
    """The request offers tools and lets the model call them."""
    return bool(req.tools) and req.tool_choice != "none"


def grammar_spec(req: ChatCompletionRequest | CompletionRequest) -> GrammarSpec | None:
    """The one grammar constraining ``req``'s output, or None.

    Raises:
        ApiError: 400 for two constraints at once or a named tool that is not in ``tools``.
    """
    if not isinstance(req, ChatCompletionRequest):
        guided = _guided_specs(req)
        return guided[0][1] if guided else None
    if req.tool_choice not in (None, "none") and not req.tools:
        raise bad_request("tool_choice is only allowed when tools are specified", param="tool_choice")
    specs: list[tuple[str, GrammarSpec]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        specs.append(("response_format", GrammarSpec("json_object")))
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        specs.append(("response_format", GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_))))
    specs += _guided_specs(req)
    tool_spec = _tool_grammar(req)
    if tool_spec is not None:
        specs.append(("tool_choice", tool_spec))
    if len(specs) > 1:
        raise bad_request(f"at most one output constraint per request, got {', '.join(p for p, _ in specs)}",
                          param=specs[1][0])
    return specs[0][1] if specs else None


def _guided_specs(req: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, GrammarSpec]]:
    """(field, spec) of each vLLM-style extra given; 400 for two of them."""
    specs: list[tuple[str, GrammarSpec]] = []
    if req.guided_json is not None:
        specs.append(("guided_json", GrammarSpec("json_schema", json.dumps(req.guided_json))))
    if req.guided_regex is not None:
        specs.append(("guided_regex", GrammarSpec("regex", req.guided_regex)))
    if req.guided_choice is not None:
        specs.append(("guided_choice", GrammarSpec("choice", json.dumps(req.guided_choice))))
    so = req.structured_outputs
    if so is not None:
        given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice)) if v is not None]
        if len(given) != 1:
            raise bad_request("structured_outputs needs exactly one of json, regex, choice", param="structured_outputs")
        kind, value = given[0]
        source = value if kind == "regex" else json.dumps(value)
        specs.append(("structured_outputs", GrammarSpec("json_schema" if kind == "json" else kind, source)))
    if len(specs) > 1:
        raise bad_request(f"at most one output constraint per request, got {', '.join(p for p, _ in specs)}",
                          param=specs[1][0])
    return specs


def grammar_param(req: ChatCompletionRequest | CompletionRequest) -> str:
    """The request field a grammar error is reported under."""
    for name in ("guided_json", "guided_regex", "guided_choice", "structured_outputs"):
        if getattr(req, name) is not None:
            return name
    return "response_format" if getattr(req, "response_format", None) is not None else "tools"


def compile_grammar(compiler: Any, spec: GrammarSpec, param: str) -> str:
    """Compile ``spec`` (blocking). Raises ApiError 400 with the engine's message."""
    try:
        return compiler.compile(spec)
    except GrammarError as exc:
        raise bad_request(f"Invalid {param}: the grammar engine cannot compile it: {exc}", param=param) from exc


def _tool_grammar(req: ChatCompletionRequest) -> GrammarSpec | None:
    """``required``: one or more calls of any tool; named: one call of that tool."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    tools = req.tools
    if not isinstance(choice, str):
        tools = [t for t in req.tools if t.function.name == choice.function.name]
        if not tools:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
    parallel = choice == "required" and req.parallel_tool_calls is not False
    source = {"tools": [{"name": t.function.name, "parameters": tool_parameters(t.function.parameters)} for t in tools],
              "parallel": parallel}
    return GrammarSpec("tool_calls", json.dumps(source, sort_keys=True))


NO_ARGUMENTS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments schema a tool call is constrained to.

    A tool whose ``parameters`` is absent or declares no ``properties`` takes no arguments: its calls
    are constrained to ``{}`` (an open ``{"type": "object"}`` lets a small model write nested keys until
    ``max_tokens``, so no call is ever parsed; the same failure as vLLM #28806). A schema that opens
    ``additionalProperties`` explicitly (a map) is kept as given.
    """
    schema = parameters or {}
    opened = schema.get("additionalProperties") not in (None, False)
    return schema if schema.get("properties") or opened else NO_ARGUMENTS_SCHEMA


def chat_messages(req: ChatCompletionRequest, template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Template messages and extra template variables (``tools`` for a template that renders them).

    ``developer`` is sent as ``system``. Without tools (or with ``tool_choice`` none) messages are
    plain; tool messages and assistant tool calls are still rendered (Hermes form) so a conversation
    stays valid whatever ``tool_choice`` says.
    """
    native = template is not None and "tools" in template
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()] if uses_tools(req) else []
    messages = [_message(m, native) for m in req.messages]
    if native:
        return messages, ({"tools": tools} if tools else {})
    if tools:
        prompt = HERMES_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, {}


def _message(m: ChatMessage, native: bool) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    content = m.text()
    calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls or ()]
    if native:
        out: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                                 for c, call in zip(m.tool_calls, calls, strict=True)]
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        return out
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    if calls:
        blocks = "\n".join(f"{TOOL_CALL_OPEN}\n{json.dumps(c)}\n{TOOL_CALL_CLOSE}" for c in calls)
        content = f"{content}\n{blocks}" if content else blocks
    return {"role": role, "content": content}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
