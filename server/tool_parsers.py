"""Tool-call parsers: model text -> OpenAI ``tool_calls``, whole (``parse``) or streamed (``feed``).

``hermes``: calls are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes 2 Pro,
Qwen 2.5 / 3, and the default tool prompt of ``server/structured.py``); text outside the blocks is
content. A block that does not parse as a call is left in the content, as vLLM's parser does; a block
with a name and no ``arguments`` (how models write a call of a tool without parameters) is a call with
``{}`` arguments.

Streaming holds back text that may be the start of ``<tool_call>``; inside a block it emits the call's
header (``index``, ``id``, ``type``, function ``name``) as soon as the name is known, then argument
fragments as they arrive (holding back a possible closing ``}``), and the rest at ``</tool_call>``, so
the fragments concatenate to the call's ``arguments``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from sparkserve.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*$")
TOOL_CALL_PARSERS = ("hermes",)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_block(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one block body, or None when it is not a call."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    if "arguments" not in call:
        return (call["name"], "{}") if len(call) == 1 else None
    args = call["arguments"]
    match = _NAME.match(body)
    if match is not None:  # keep the model's own argument text when it is exactly the arguments
        raw = _TAIL.sub("", body[match.end():])
        try:
            if json.loads(raw) == args:
                return call["name"], raw
        except ValueError:
            pass
    return call["name"], json.dumps(args)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole model output."""
    calls: list[ToolCall] = []
    content, pos = [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start)
        if end < 0:
            break
        parsed = _parse_block(text[start + len(OPEN): end])
        content.append(text[pos:start] if parsed is not None else text[pos: end + len(CLOSE)])
        if parsed is not None:
            calls.append(ToolCall(id=new_call_id(), function=FunctionCall(name=parsed[0], arguments=parsed[1])))
        pos = end + len(CLOSE)
    content.append(text[pos:])
    joined = "".join(content)
    if calls:
        joined = joined.strip()
    return (joined or None) if calls else joined, calls


@dataclass
class StreamDelta:
    """What one chunk of text adds: content and tool-call fragments."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass
class HermesStreamParser:
    """Incremental ``parse_tool_calls``: ``feed`` text deltas, then ``finish``."""

    buffer: str = ""
    in_call: bool = False
    num_calls: int = 0
    name_sent: bool = False
    args_sent: str = ""
    content_seen: str = ""

    def feed(self, text: str) -> StreamDelta:
        self.buffer += text
        out = StreamDelta()
        while True:
            if not self.in_call:
                start = self.buffer.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    out.content += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                out.content += self._content(self.buffer[:start])
                self.buffer = self.buffer[start + len(OPEN):]
                self.in_call, self.name_sent, self.args_sent = True, False, ""
                continue
            end = self.buffer.find(CLOSE)
            if end < 0:
                out.tool_calls += self._partial_call(self.buffer[: len(self.buffer) - _partial_suffix(self.buffer, CLOSE)])
                return out
            body, self.buffer = self.buffer[:end], self.buffer[end + len(CLOSE):]
            self.in_call = False
            out.tool_calls += self._complete_call(body, out)

    def finish(self) -> StreamDelta:
        """Flush held-back text (an unterminated block is content)."""
        out = StreamDelta()
        if self.in_call and not self.name_sent:
            out.content = self._content(OPEN + self.buffer)
        elif not self.in_call:
            out.content = self._content(self.buffer)
        self.buffer = ""
        return out

    def _content(self, text: str) -> str:
        # calls strip surrounding whitespace from the content (as parse_tool_calls does)
        if self.num_calls and not text.strip():
            return ""
        self.content_seen += text
        return text

    def _partial_call(self, body: str) -> list[DeltaToolCall]:
        match = _NAME.match(body)
        if match is None:
            return []
        deltas = []
        if not self.name_sent:
            self.name_sent = True
            deltas.append(DeltaToolCall(index=self.num_calls, id=new_call_id(), type="function",
                                        function=DeltaFunctionCall(name=json.loads(f'"{match.group(1)}"'), arguments="")))
        raw = body[match.end():]
        safe = raw[: len(raw) - len(_trailing_close(raw))]
        if len(safe) > len(self.args_sent):
            deltas.append(DeltaToolCall(index=self.num_calls, function=DeltaFunctionCall(arguments=safe[len(self.args_sent):])))
            self.args_sent = safe
        return deltas

    def _complete_call(self, body: str, out: StreamDelta) -> list[DeltaToolCall]:
        parsed = _parse_block(body)
        if parsed is None:
            out.content += self._content(OPEN + body + CLOSE)
            return []
        name, args = parsed
        deltas = []
        if not self.name_sent:
            deltas.append(DeltaToolCall(index=self.num_calls, id=new_call_id(), type="function",
                                        function=DeltaFunctionCall(name=name, arguments="")))
            self.args_sent = ""
        if not args.startswith(self.args_sent):  # cannot happen for _NAME-ordered bodies; stay well-formed
            args = self.args_sent
        if len(args) > len(self.args_sent):
            deltas.append(DeltaToolCall(index=self.num_calls, function=DeltaFunctionCall(arguments=args[len(self.args_sent):])))
        self.num_calls += 1
        return deltas


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _trailing_close(raw: str) -> str:
    """The suffix of ``raw`` that may be the call object's closing ``}`` (and whitespace around it)."""
    match = re.search(r"\s*(\}\s*)?$", raw)
    return match.group(0) if match else ""
