"""The engine's grammar mask: one grammar matcher per constrained request, behind the logits-mask hook.

The hook (``engine/sampling/mask.py``) asks for the tokens allowed after a request's outputs followed by
a draft prefix, for the target's p at every verified position and for the drafter's q slot by slot. The
matcher's committed state follows the request's outputs only (accepted tokens: the runner records them
before drafting); a draft prefix is consumed, the mask computed, and the prefix rolled back, so the
state never advances over a draft that verification may reject. Outputs that shrink (a step rolled back)
roll the matcher back too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from threading import Lock

import torch
from torch import Tensor

from sparkserve.engine.structured.grammar import GrammarCompiler, GrammarError, GrammarMatcher
from sparkserve.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _State:
    """A request's matcher and the output tokens it has consumed (committed)."""

    matcher: GrammarMatcher | None
    consumed: list[int] = field(default_factory=list)
    broken: bool = False
    cache: dict[tuple[int, ...], Tensor] = field(default_factory=dict)  # draft prefix -> mask, for ``consumed``


class GrammarLogitsMask:
    """``LogitsMask`` for requests whose ``SamplingParams.grammar`` is set.

    Args:
        compiler: returns the tokenizer's ``GrammarCompiler`` (called on the first constrained request:
            building the grammar tokenizer takes ~0.3 s).
        vocab_size: the model's V (masks are ``[V]``; ids past the tokenizer's vocabulary are never allowed).
    """

    def __init__(self, compiler: Callable[[], GrammarCompiler], vocab_size: int) -> None:
        self._compiler_fn = compiler
        self._compiler: GrammarCompiler | None = None
        self.vocab_size = vocab_size
        self._grammars: dict[str, str] = {}
        self._states: dict[str, _State] = {}
        self._lock = Lock()

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        """Register a (re)created request; unconstrained ones are ignored."""
        if params.grammar is None:
            return
        with self._lock:
            self._grammars[request_id] = params.grammar
            self._states.pop(request_id, None)

    def constrained(self, request_id: str) -> bool:
        return request_id in self._grammars

    def release(self, request_id: str) -> None:
        with self._lock:
            self._grammars.pop(request_id, None)
            self._states.pop(request_id, None)

    def allowed(self, request_id: str, output_token_ids: Sequence[int], prefix: Sequence[int]) -> Tensor:
        """``[V]`` bool: tokens the grammar allows after ``output_token_ids + prefix``. A prefix the
        grammar rejects (a row past a forbidden draft, never emitted) or a broken matcher allows all.
        The tensor is cached until the outputs change: callers must not modify it."""
        state = self._state(request_id)
        self._sync(state, output_token_ids)
        if state.broken:
            return torch.ones(self.vocab_size, dtype=torch.bool)
        key = tuple(prefix)
        hit = state.cache.get(key)
        if hit is None:
            assert state.matcher is not None
            hit = state.cache[key] = self._compute(state.matcher, key)
        return hit

    def _compute(self, matcher: GrammarMatcher, prefix: tuple[int, ...]) -> Tensor:
        if matcher.is_stopped():  # after EOS within this step: the scheduler finishes the request
            return torch.ones(self.vocab_size, dtype=torch.bool)
        n = matcher.consume(prefix)
        if n < len(prefix) or matcher.is_stopped():  # a row past a forbidden draft or EOS: never emitted
            matcher.rollback(n)
            return torch.ones(self.vocab_size, dtype=torch.bool)
        bits = matcher.allowed()  # [V_tok] bool
        matcher.rollback(n)
        if bits.shape[0] >= self.vocab_size:
            return torch.from_numpy(bits[: self.vocab_size])
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)  # ids past the tokenizer's vocabulary: never
        allowed[: bits.shape[0]] = torch.from_numpy(bits)
        return allowed

    def _state(self, request_id: str) -> _State:
        state = self._states.get(request_id)
        if state is None:
            if self._compiler is None:
                self._compiler = self._compiler_fn()
            try:
                state = _State(self._compiler.matcher(self._grammars[request_id]))
            except GrammarError as exc:  # not a key GrammarCompiler.compile returned
                logger.warning("grammar of %s does not compile (%s); request unconstrained", request_id, exc)
                state = _State(None, broken=True)
            self._states[request_id] = state
        return state

    def _sync(self, state: _State, outputs: Sequence[int]) -> None:
        """Commit the outputs the matcher has not consumed; roll back ones that are gone."""
        consumed = state.consumed
        keep = 0
        if len(outputs) >= len(consumed) and (not consumed or outputs[len(consumed) - 1] == consumed[-1]):
            keep = len(consumed)  # the usual case: outputs only grew (tokens are never rewritten in place)
        limit = min(len(consumed), len(outputs))
        while keep < limit and consumed[keep] == outputs[keep]:
            keep += 1
        if keep < len(consumed) or keep < len(outputs):
            state.cache.clear()
        if state.matcher is None:
            return
        if keep < len(consumed):
            state.matcher.rollback(len(consumed) - keep)
            del consumed[keep:]
        new = list(outputs[keep:])
        if new and not state.broken and not state.matcher.is_stopped():
            n = state.matcher.consume(new)
            consumed.extend(new[:n])
            # tokens after a stop (EOS) of the same step are recorded by the runner, dropped by the scheduler
            if n < len(new) and not state.matcher.is_stopped():
                state.broken = True
                logger.warning("grammar matcher rejected output tokens %s after %d; request unconstrained from here",
                               new, len(consumed))
