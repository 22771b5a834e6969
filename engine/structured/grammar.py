"""Grammar specs -> validated llguidance grammars, cached by spec, with a time limit (no torch).

The engine is llguidance (https://github.com/guidance-ai/llguidance): per-token mask cost on this CPU is
in ``bench_results/structured_mask_cost.json`` (llguidance and xgrammar are within 2x of each other; the
choice is llguidance for its 1-10x faster compilation, lark grammars with embedded JSON schemas for tool
calls, matcher rollback, and no transformers dependency). Its tokenizer is built from the ``tokenizers``
backend the GGUF gives (``Tokenizer.backend.to_str()``: there is no tokenizer.json file).

Every JSON grammar allows no free whitespace (compact ``,`` and ``:`` separators): a small model would
otherwise emit whitespace until ``max_tokens``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from threading import Lock
from typing import Any, Literal

import llguidance as llg

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


class GrammarError(ValueError):
    """The grammar engine cannot compile a spec (its message is the engine's), or compiling took too long."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a request's output to.

    Attributes:
        kind: ``json_schema`` (source = the schema as JSON text), ``json_object`` (any JSON object),
            ``regex`` (source = the pattern), ``choice`` (source = a JSON list of strings), ``lark``
            (source = an llguidance lark grammar; tool calls use it).
        source: the kind's text (hashable: the cache key).
    """

    kind: GrammarKind
    source: str = ""


def json_schema_lark(schema: dict[str, Any]) -> str:
    """The lark ``%json`` literal for ``schema`` with the no-whitespace options."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar (serialized) for ``spec``.

    Raises:
        GrammarError: the source is not what its kind needs (bad JSON, not a list of strings).
    """
    try:
        if spec.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice must be a non-empty list of strings")
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return llg.LLMatcher.grammar_from_lark(spec.source)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, GrammarError):
            raise
        raise GrammarError(str(exc)) from exc


class GrammarCompiler:
    """Compiles and validates grammar specs for one tokenizer; results (errors too) cached by spec (LRU).

    Args:
        tokenizer_json: the ``tokenizers`` backend serialized (``Tokenizer.backend.to_str()``).
        vocab_size: the tokenizer's vocabulary size (incl. added tokens).
        eos_token_ids: tokens that end generation (the grammar allows them once it accepts).
        cache_size: compiled specs kept.
        timeout_s: compilation time limit in seconds (GrammarError past it).
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256,
                 timeout_s: float = 10.0) -> None:
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.limits = llg.LLParserLimits(verbose_errors=False)
        self._cache: OrderedDict[GrammarSpec, str | GrammarError] = OrderedDict()
        self._lock = Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")

    def compile(self, spec: GrammarSpec) -> str:
        """The validated llguidance grammar of ``spec`` (blocking; call it off the event loop).

        Raises:
            GrammarError: with the engine's message, or when compilation exceeds ``timeout_s``.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._compile_uncached(spec)
            with self._lock:
                self._cache[spec] = hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise hit
        return hit

    def _compile_uncached(self, spec: GrammarSpec) -> str | GrammarError:
        try:
            grammar = to_llguidance(spec)
        except GrammarError as exc:
            return exc
        future = self._pool.submit(llg.LLMatcher.validate_grammar_with_warnings, grammar, self.tokenizer,
                                   limits=self.limits)
        try:
            is_error, messages = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            return GrammarError(f"grammar compilation exceeded the {self.timeout_s:g} s limit")
        return GrammarError("; ".join(messages)) if is_error else grammar

    def matcher(self, grammar: str) -> llg.LLMatcher:
        """A fresh matcher at the start of ``grammar`` (a string ``compile`` returned)."""
        return llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
