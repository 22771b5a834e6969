"""Grammar specs -> compiled xgrammar grammars, cached by spec, with a time limit; one matcher type.

The engine is xgrammar (https://github.com/mlc-ai/xgrammar), picked by measured per-token mask cost on
this CPU (``bench_results/structured_mask_cost.json``, ``scripts/bench_structured_mask.py``: 3.4-5.9 us
per token vs 9-65 us for llguidance; a bounded-string schema is where llguidance is slowest). Its
vocabulary comes from the ``tokenizers`` backend the GGUF gives (byte-level BPE; there is no
tokenizer.json file and no transformers tokenizer). xgrammar imports torch, so it is imported lazily
(the first constrained request); the server only calls ``GrammarCompiler.compile``.

Every JSON grammar allows no free whitespace (``any_whitespace=False``, separators ``,`` and ``:``): a
small model would otherwise emit whitespace until ``max_tokens``. ``json_schema`` is strict
(``strict_mode``: properties the schema does not list are not generated), as OpenAI's strict mode.

``SamplingParams.grammar`` carries ``GrammarSpec.key`` (plain text: the scheduler never sees a compiled
object); the engine side finds the compiled grammar in the same cache (recompiling on a miss).
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

import numpy as np

SEPARATORS = (",", ":")
MAX_PARALLEL_CALLS = 8
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "tool_calls"]
_KINDS = ("json_schema", "json_object", "regex", "choice", "tool_calls")


class GrammarError(ValueError):
    """The grammar engine cannot compile a spec (its message is the engine's), or compiling took too long."""


class GrammarTimeoutError(GrammarError):
    """Compilation exceeded the time limit (not cached)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a request's output to.

    Attributes:
        kind: ``json_schema`` (source = the schema as JSON text), ``json_object`` (any JSON object),
            ``regex`` (the pattern), ``choice`` (a JSON list of strings), ``tool_calls`` (JSON
            ``{"tools": [{"name", "parameters"}], "parallel": bool}``: ``<tool_call>`` blocks whose
            ``{"name", "arguments"}`` follow one tool's schema; up to ``MAX_PARALLEL_CALLS`` when parallel).
        source: the kind's text (hashable: the cache key).
    """

    kind: GrammarKind
    source: str = ""

    @property
    def key(self) -> str:
        """The spec as one string (``SamplingParams.grammar``)."""
        return f"{self.kind}\n{self.source}"

    @classmethod
    def from_key(cls, key: str) -> GrammarSpec:
        kind, _, source = key.partition("\n")
        if kind not in _KINDS:
            raise GrammarError(f"unknown grammar kind {kind!r}")
        return cls(kind, source)  # type: ignore[arg-type]


def tool_call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON schema of one Hermes call object of tool ``name``."""
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def _build(compiler: Any, spec: GrammarSpec) -> Any:
    """Compile ``spec`` with an ``xgrammar.GrammarCompiler`` (raises the engine's errors)."""
    import xgrammar as xgr

    if spec.kind == "json_schema":
        return compiler.compile_json_schema(spec.source, any_whitespace=False, separators=SEPARATORS, strict_mode=True)
    if spec.kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=SEPARATORS,
                                            strict_mode=False)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("choice must be a non-empty list of strings")
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
    tools = json.loads(spec.source)
    literal = xgr.Grammar.from_ebnf
    calls = [xgr.Grammar.concat(literal(f"root ::= {json.dumps(TOOL_CALL_OPEN)}"),
                                xgr.Grammar.from_json_schema(json.dumps(tool_call_schema(t["name"], t.get("parameters"))),
                                                             any_whitespace=False, separators=SEPARATORS),
                                literal(f"root ::= {json.dumps(TOOL_CALL_CLOSE)}"))
             for t in tools["tools"]]
    call = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    grammar = call
    for _ in range(MAX_PARALLEL_CALLS - 1 if tools.get("parallel") else 0):  # call ("\n" call){0,7}, linear size
        grammar = xgr.Grammar.concat(call, xgr.Grammar.union(literal('root ::= ""'),
                                                             xgr.Grammar.concat(literal('root ::= "\\n"'), grammar)))
    return compiler.compile_grammar(grammar)


class GrammarMatcher:
    """One request's position in a compiled grammar (xgrammar ``GrammarMatcher`` with unlimited rollback).

    ``consume`` advances over tokens and returns how many were accepted (it stops at the first rejected
    one or after a stop token); ``rollback`` undoes the last ``n``; ``allowed`` is the ``[V_tok]`` bool
    mask of the next token (stop tokens included once the grammar accepts).
    """

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=-1)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32
        self.vocab_size = vocab_size

    def consume(self, tokens: Sequence[int]) -> int:
        for n, token in enumerate(tokens):
            if self._matcher.is_terminated() or not self._matcher.accept_token(int(token)):
                return n
        return len(tokens)

    def rollback(self, n: int) -> None:
        if n:
            self._matcher.rollback(n)

    def is_stopped(self) -> bool:
        """A stop token was consumed: nothing may follow."""
        return self._matcher.is_terminated()

    def allowed(self) -> np.ndarray:
        """``[V_tok]`` bool (a view into a fresh array)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")  # [32 W] 0/1
        return bits[: self.vocab_size].view(np.bool_)


class GrammarCompiler:
    """Compiles grammar specs for one tokenizer; results (errors too) cached by spec (LRU).

    Args:
        encoded_vocab: every token's vocabulary string by id (byte-level form, e.g. ``Ġthe``).
        eos_token_ids: tokens that end generation (the grammar allows them once it accepts).
        cache_size: compiled specs kept.
        timeout_s: compilation time limit in seconds (GrammarError past it).
    """

    def __init__(self, encoded_vocab: Sequence[str], eos_token_ids: Sequence[int], cache_size: int = 256,
                 timeout_s: float = 10.0) -> None:
        import xgrammar as xgr

        self.vocab_size = len(encoded_vocab)
        info = xgr.TokenizerInfo(list(encoded_vocab), vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                 stop_token_ids=list(eos_token_ids), add_prefix_space=False)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")

    def compile(self, spec: GrammarSpec) -> str:
        """Compile ``spec`` (blocking; call it off the event loop) and return its key for
        ``SamplingParams.grammar``.

        Raises:
            GrammarError: with the engine's message, or when compilation exceeds ``timeout_s``.
        """
        self.compiled(spec)
        return spec.key

    def compiled(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of ``spec`` (from the cache when there). Raises GrammarError."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._compile_uncached(spec)
            if isinstance(hit, GrammarTimeoutError):
                raise hit  # not cached: the next request may find the machine less busy
            with self._lock:
                self._cache[spec] = hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise hit
        return hit

    def matcher(self, key: str) -> GrammarMatcher:
        """A matcher at the start of the grammar ``key`` names (``compile``'s result). Raises GrammarError."""
        return GrammarMatcher(self.compiled(GrammarSpec.from_key(key)), self.vocab_size)

    def _compile_uncached(self, spec: GrammarSpec) -> Any:
        future = self._pool.submit(_build, self._compiler, spec)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            return GrammarTimeoutError(f"grammar compilation exceeded the {self.timeout_s:g} s limit")
        except GrammarError as exc:
            return exc
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad schemas as RuntimeError
            return GrammarError(_engine_message(exc))


def _engine_message(exc: Exception) -> str:
    """xgrammar's message without its ``[time] file:line:`` prefix."""
    text = str(exc).strip()
    if text.startswith("[") and ": " in text:
        head, _, rest = text.partition("] ")
        _, _, message = rest.partition(": ")
        return message.strip() or text
    return text
