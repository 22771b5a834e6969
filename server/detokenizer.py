"""Incremental detokenization with stop strings.

Two problems make "decode each new token and append" wrong:

* A byte-level BPE token can hold part of a UTF-8 character (an emoji is often 2-4 tokens);
  decoding it alone gives U+FFFD. :class:`IncrementalDetokenizer` uses the prefix offset / read
  offset scheme (Hugging Face TGI, vLLM): decode the window ``ids[prefix_offset:]`` and emit only
  what extends the already-emitted ``ids[prefix_offset:read_offset]`` text, and only when it does
  not end in U+FFFD. The window keeps a few tokens of left context so tokenizers that drop a
  leading space of the first token (SentencePiece) decode correctly.
* A stop string can span tokens, so text that may be the start of a stop string is held back
  until it is known not to be one. :class:`StopStringDecoder` does that and reports which token
  completed a stop string.

Usage rule when a stop string matches: the text is cut just before the stop string, and the
completion counts the tokens up to and including the token that completed the stop string;
later tokens (and their logprobs) are dropped, and the server aborts the engine request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5


class DecodingTokenizer(Protocol):
    """The part of ``sparkserve.engine.tokenizer.Tokenizer`` the detokenizer needs."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never end inside a UTF-8 character.

    Args:
        tokenizer: decodes token id windows.
        prompt_token_ids: the prompt; its last few tokens are used as left context only.
        skip_special_tokens: drop special tokens (EOS, ``<|im_end|>``) from the text.
    """

    def __init__(
        self,
        tokenizer: DecodingTokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decode window (left context)
        self._read_offset = len(self._ids)  # tokens before this are already emitted as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _advance(self, *, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def add_token(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (may be empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (a dangling partial character decodes
        to U+FFFD, as decoding the whole sequence would)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(final=True)


def _held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass(frozen=True)
class DecodedDelta:
    """What one batch of new tokens adds to a choice.

    Attributes:
        text: text safe to send now.
        num_tokens: how many of the offered tokens count (fewer than offered when a stop string
            was completed inside the batch).
        stop: the stop string that ended generation, if one did.
    """

    text: str
    num_tokens: int
    stop: str | None = None


class StopStringDecoder:
    """Incremental detokenizer plus stop-string matching and hold-back for one choice.

    Args:
        tokenizer: decodes token ids.
        prompt_token_ids: left context for the first tokens.
        stop: stop strings (not included in the output).
    """

    def __init__(
        self,
        tokenizer: DecodingTokenizer,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = tuple(stop)
        self._text = ""  # all decoded text (emitted + held back)
        self._sent = 0  # characters of _text already returned
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._text[: self._sent]

    def _find_stop(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self._text.find(stop, self._sent)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def process(
        self, token_ids: Sequence[int], *, final: bool = False, skip_last: bool = False
    ) -> DecodedDelta:
        """Decode new tokens.

        Args:
            token_ids: the new tokens of this output (several with speculative decoding).
            final: the engine finished the request with this output: flush everything held back.
            skip_last: do not detokenize the last token (it is a stop token id: counted in usage,
                not part of the text).
        """
        if self.stopped_by is not None:
            return DecodedDelta("", 0, None)
        decode_ids = token_ids[:-1] if skip_last and token_ids else token_ids
        for i, token_id in enumerate(decode_ids):
            self._text += self._detokenizer.add_token(token_id)
            if self._stops and (hit := self._find_stop()) is not None:
                return self._stop_at(hit, num_tokens=i + 1)
        if final:
            self._text += self._detokenizer.flush()
            if self._stops and (hit := self._find_stop()) is not None:
                return self._stop_at(hit, num_tokens=len(token_ids))
            emit_to = len(self._text)
        else:
            emit_to = len(self._text) - _held_back_length(self._text[self._sent :], self._stops)
        delta = self._text[self._sent : emit_to]
        self._sent = emit_to
        return DecodedDelta(delta, len(token_ids))

    def _stop_at(self, hit: tuple[int, str], num_tokens: int) -> DecodedDelta:
        pos, stop = hit
        self._text = self._text[:pos]
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        self.stopped_by = stop
        return DecodedDelta(delta, num_tokens, stop)
