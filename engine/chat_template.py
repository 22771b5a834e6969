"""Chat templates: a sandboxed jinja2 environment with the Hugging Face conventions, and chat
tokenization in which only the template's own markup yields special tokens (no torch).

Message contents are data: ``<|im_end|>`` typed inside a message is encoded as text, so a user cannot
close its own turn and forge a system turn (:func:`encode_chat_markup_only`). Templates render in an
``ImmutableSandboxedEnvironment``, so a template (or a content it evaluates) cannot reach Python
internals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_MASK_BASE = 0x100000  # Supplementary Private Use Area-B: one mask character per special token


def encode_chat_markup_only(
    render: Callable[[list[dict[str, Any]]], str],
    encode: Callable[[str], list[int]],
    encode_text: Callable[[str], list[int]],
    special_tokens: Mapping[str, int],
    messages: list[dict[str, Any]],
) -> list[int]:
    """Token ids of ``render(messages)`` where special tokens come only from the template's markup.

    Args:
        render: the chat template (messages -> text).
        encode: text -> ids with special-token strings mapped to their ids (the usual encode).
        encode_text: text -> ids with special-token strings encoded as plain text.
        special_tokens: special token string -> id.
        messages: messages with string ``content``.

    Method: when no content contains a special-token string, the markup is the only source of
    specials and ``encode(render(messages))`` is the answer. Otherwise the chat is rendered a second
    time with every special string inside contents replaced by a run of a private-use mask character
    of the same length, so both renderings align character by character; the specials found in the
    masked rendering are the markup's. The real rendering is cut at those spans: each span is its
    special id, each text piece between them is ``encode_text`` (this is how the tokenizer itself
    treats specials: they split the input before the pieces are tokenized).

    Raises:
        ValueError: the template changed a content's special-token text (the renderings do not
            align), so markup and content cannot be told apart.
    """
    rendered = render(messages)
    contents = [m.get("content") for m in messages if isinstance(m.get("content"), str)]
    by_length = sorted(special_tokens, key=len, reverse=True)
    if not by_length or not any(s in c for c in contents for s in by_length):
        return encode(rendered)
    base = next(b for b in range(_MASK_BASE, _MASK_BASE + 0xFFFF, len(by_length))
                if not any(chr(b + k) in c for c in contents for k in range(len(by_length))))
    pattern = re.compile("|".join(map(re.escape, by_length)))
    masks = {s: chr(base + k) * len(s) for k, s in enumerate(by_length)}

    def mask(message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, str):
            return message
        return {**message, "content": pattern.sub(lambda m: masks[m.group(0)], content)}

    masked = render([mask(m) for m in messages])
    unmasked = masked
    for s, run in masks.items():
        unmasked = unmasked.replace(run, s)
    if unmasked != rendered:
        raise ValueError("a message contains special-token text that the chat template alters, so it "
                         "cannot be kept apart from the template's own markup")
    ids: list[int] = []
    start = 0
    for match in pattern.finditer(masked):
        ids += encode_text(rendered[start:match.start()]) if match.start() > start else []
        ids.append(special_tokens[match.group(0)])
        start = match.end()
    return ids + (encode_text(rendered[start:]) if start < len(rendered) else [])


def flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"unsupported content part {part!r}: only text parts are accepted")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def chat_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
