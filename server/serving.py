"""Request handling shared by chat and completions: admission, fan-out, decoding, disconnects.

A :class:`Generation` is one HTTP request turned into ``len(prompts) * n`` engine requests with
ids ``{response_id}-{i}``. It is submitted before any response byte (so 400 / 429 / 503 are real
HTTP statuses), then yields :class:`ChoiceUpdate` deltas that are already detokenized, cut at stop
strings and counted for usage. Closing it (always, via ``finally`` or the response's background
task) aborts every engine request that has not finished, which frees its KV blocks.

Metrics (when ``ServerState.metrics`` is set), per choice: the prompt tokens once per prompt at its
first update and the tokens of every update, exactly as usage counts them; one token event per update
that carried tokens; and, once, the finish (stop / length / abort / error) with the request's times:
arrival = when the server received the HTTP request, queued = when the engine accepted it, first
scheduled = from the engine's outputs (``time.monotonic()`` seconds, all on one clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio
from fastapi import Request

from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import DraftOutcome, per_drafter
from sparkserve.server.detokenizer import StopStringDecoder
from sparkserve.server.engine_client import EngineClient, RequestOutput
from sparkserve.server.errors import ApiError, engine_error_to_api_error, internal_error
from sparkserve.server.protocol import (
    DrafterUsage,
    IgnoredOpenAIFields,
    PromptTokensDetails,
    SpeculationUsage,
    UsageInfo,
)

logger = logging.getLogger(__name__)

_background_tasks: set[asyncio.Task[object]] = set()


@runtime_checkable
class RequestMetrics(Protocol):
    """The request-level part of :class:`sparkserve.server.metrics.ServerMetrics` the server feeds (a
    metrics hook that only renders, ``MetricsRenderer``, is not one: ``isinstance`` tells them apart)."""

    def on_prompt_tokens(self, n: int) -> None: ...

    def on_generation_tokens(self, n: int) -> None: ...

    def on_request_rejected(self, reason: str) -> None: ...

    def on_request_finished(
        self,
        *,
        finished_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        arrival_time: float,
        finished_time: float,
        queued_time: float | None = None,
        first_scheduled_time: float | None = None,
        token_event_times: Sequence[float] = (),
    ) -> None: ...


@dataclass
class ServerState:
    """Serving configuration and the mutable bits the routes share.

    Attributes:
        engine: the engine (or a fake with the same shape).
        served_model_name: the only model name requests may use (404 otherwise).
        default_max_tokens: ``max_tokens`` when a request omits it, further capped by what is
            left of the context (``max_model_len - prompt_len``).
        max_choices: most choices (``n`` times the number of prompts) in one request.
        max_total_tokens: most tokens one request may ask for (``n`` x ``max_tokens`` over prompts).
        draining: set on graceful shutdown; new requests then get 503 and readiness is false.
        generations: generations submitted and not yet closed.
        metrics: request metrics to feed (None = no metrics).
        strict_openai_fields: refuse (400) the OpenAI fields this server ignores
            (:data:`sparkserve.server.protocol.IGNORED_OPENAI_FIELDS`) instead of logging a warning.
    """

    engine: EngineClient
    served_model_name: str
    default_max_tokens: int = 1024
    max_choices: int = 16
    max_total_tokens: int = 65536
    draining: bool = False
    generations: set[Generation] = field(default_factory=set)
    metrics: RequestMetrics | None = None
    strict_openai_fields: bool = False

    @property
    def num_inflight(self) -> int:
        """Generations submitted and not yet closed."""
        return len(self.generations)

    async def abort_all(self) -> None:
        """Abort every in-flight engine request; each generation then ends with finish_reason
        "abort" (its streams still send their last chunk and ``[DONE]``)."""
        for generation in list(self.generations):
            await generation.abort_engine_requests()

    def check_ignored_fields(self, req: IgnoredOpenAIFields) -> None:
        """Log the OpenAI fields ``req`` sets that have no effect here; in strict mode, a 400 for the first.

        Raises:
            ApiError: 400 (strict mode only) naming the field, as for an unknown field.
        """
        ignored = req.ignored_fields()
        if not ignored:
            return
        if self.strict_openai_fields:
            raise ApiError(400, f"Unrecognized request argument supplied: {ignored[0]} (this server runs with "
                           "--strict-openai-fields)", param=ignored[0])
        logger.warning("ignoring request fields with no effect on this server: %s", ", ".join(ignored))

    def default_max_tokens_for(self, num_choices: int) -> int:
        """``max_tokens`` for a request that omits it: ``default_max_tokens``, lowered so that all
        ``num_choices`` choices stay within ``max_total_tokens`` (the context cap comes later)."""
        return max(1, min(self.default_max_tokens, self.max_total_tokens // num_choices))

    def check_can_serve(self, model: str) -> None:
        """404 for an unknown model, 503 while draining (checked before any work)."""
        if model != self.served_model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.served_model_name}`.",
                param="model",
                code="model_not_found",
            )
        if self.draining:
            raise ApiError(
                503, "The server is shutting down and does not accept new requests.", code="draining"
            )


@dataclass(frozen=True)
class ChoiceUpdate:
    """New text of one choice, after detokenization and stop strings.

    Attributes:
        index: choice index in the response.
        text: text to append (may be empty when only held-back tokens arrived).
        token_ids: the tokens this update accounts for (cut after a stop string).
        logprobs: one entry per token in ``token_ids`` when requested.
        finish_reason: "stop" | "length" | "abort" on the choice's last update.
        stop_reason: the stop string or stop token id that ended the choice.
        prompt_logprobs: on the choice's first update, when asked: one entry per prompt token after
            the first.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class _Choice:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decoder: StopStringDecoder
    prompt_index: int = 0
    num_output_tokens: int = 0
    finished: bool = False
    outputs: AsyncIterator[RequestOutput] | None = None
    # Metrics: engine times (monotonic s) from its outputs, token event times, finish recorded.
    queued_time: float | None = None
    first_scheduled_time: float | None = None
    token_event_times: list[float] = field(default_factory=list)
    recorded: bool = False
    num_cached_tokens: int = 0
    speculation: list[DraftOutcome] = field(default_factory=list)  # the verify steps of its deltas

    def observe_times(self, out: RequestOutput) -> None:
        """Take the engine's arrival / first-scheduled stamps (0.0 arrival = not set)."""
        if self.queued_time is None:
            self.queued_time = out.arrival_time or None
        if self.first_scheduled_time is None:
            self.first_scheduled_time = out.first_scheduled_time

    def observe_usage(self, out: RequestOutput) -> None:
        """Take the prefix-cache hit and this delta's row of the step's speculation record."""
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.speculation is not None:
            self.speculation.append(out.speculation)

    def apply(self, out: RequestOutput) -> ChoiceUpdate:
        if out.finish_reason == "error":
            raise ApiError(500, "The engine failed while generating this request.", code="engine_error")
        final = out.finish_reason is not None
        # A stop token id ends the choice: it counts in usage but is not part of the text.
        skip_last = final and out.finish_reason == "stop" and isinstance(out.stop_reason, int)
        delta = self.decoder.process(out.new_token_ids, final=final, skip_last=skip_last)
        self.num_output_tokens += delta.num_tokens
        token_ids = tuple(out.new_token_ids[: delta.num_tokens])
        logprobs = None if out.new_logprobs is None else tuple(out.new_logprobs[: delta.num_tokens])
        prompt = out.prompt_logprobs
        if delta.stop is not None:
            self.finished = True
            return ChoiceUpdate(self.index, delta.text, token_ids, logprobs, "stop", delta.stop, prompt)
        if final:
            self.finished = True
            return ChoiceUpdate(
                self.index, delta.text, token_ids, logprobs, out.finish_reason, out.stop_reason, prompt
            )
        return ChoiceUpdate(self.index, delta.text, token_ids, logprobs, prompt_logprobs=prompt)


@dataclass(eq=False)
class Generation:
    """The engine requests behind one HTTP request (see module docstring)."""

    state: ServerState
    response_id: str
    prompts: list[list[int]]
    choices: list[_Choice] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    _closed: bool = False
    _submitted: bool = False
    _prompts_counted: set[int] = field(default_factory=set)

    @classmethod
    def create(
        cls,
        state: ServerState,
        response_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        arrival_time: float | None = None,
    ) -> Generation:
        """``params[p]`` is the per-prompt template; choice ``p * n + i`` gets seed ``seed + i``.

        ``arrival_time``: ``time.monotonic()`` when the HTTP request arrived (default: now).
        """
        gen = cls(state, response_id, prompts)
        if arrival_time is not None:
            gen.arrival_time = arrival_time
        tokenizer = state.engine.tokenizer
        for p, (prompt, base) in enumerate(zip(prompts, params, strict=True)):
            for i in range(n):
                index = p * n + i
                choice_params = base if base.seed is None else dataclasses.replace(base, seed=base.seed + i)
                decoder = StopStringDecoder(tokenizer, prompt, base.stop)
                gen.choices.append(
                    _Choice(index, f"{response_id}-{index}", prompt, choice_params, decoder, prompt_index=p)
                )
        return gen

    async def submit(self) -> None:
        """Add every choice to the engine; on any failure abort the ones already added and raise."""
        try:
            for choice in self.choices:
                choice.outputs = await self.state.engine.add_request(
                    choice.request_id, choice.prompt_token_ids, choice.params
                )
        except ApiError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise engine_error_to_api_error(exc) or internal_error(exc) from exc
        self._submitted = True
        self.state.generations.add(self)

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        """Decoded updates of all choices, interleaved as the engine produces them.

        Raises:
            ApiError: 503 if the engine dies mid-generation, 500 on an engine error.
        """
        merged = _merge([c.outputs for c in self.choices if c.outputs is not None])
        try:
            async for index, out in merged:
                choice = self.choices[index]
                if choice.finished:
                    continue
                choice.observe_times(out)
                choice.observe_usage(out)
                update = choice.apply(out)
                self._record_update(choice, update)
                if update.finish_reason is not None and out.finish_reason is None:
                    await _shielded_abort(self.state.engine, [choice.request_id])  # stop string
                yield update
                if all(c.finished for c in self.choices):
                    break
        except ApiError:
            self._record_unfinished("error")
            raise
        except Exception as exc:
            self._record_unfinished("error")
            raise engine_error_to_api_error(exc) or internal_error(exc) from exc
        finally:
            await merged.aclose()
            await self.close()

    def usage(self) -> UsageInfo:
        """Prompt tokens count each distinct prompt once; completion tokens sum over choices."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        cached: dict[int, int] = {}  # per distinct prompt, its cache hit (choices of one prompt share it)
        for c in self.choices:
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.num_cached_tokens)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
            speculation=self._speculation_usage(),
        )

    def _speculation_usage(self) -> SpeculationUsage | None:
        """Per-response speculation counts summed over choices (None when nothing was verified)."""
        rows = per_drafter(d for c in self.choices for d in c.speculation)
        if not rows:
            return None
        drafters = {r.drafter: DrafterUsage(drafts=r.num_drafts, draft_tokens=r.num_draft_tokens,
                                            accepted_tokens=r.num_accepted_tokens) for r in rows}
        return SpeculationUsage(drafts=sum(r.num_drafts for r in rows), draft_tokens=sum(r.num_draft_tokens for r in rows),
                                accepted_tokens=sum(r.num_accepted_tokens for r in rows), by_drafter=drafters)

    async def close(self) -> None:
        """Abort unfinished engine requests (idempotent); frees their KV blocks."""
        if self._closed:
            return
        self._closed = True
        if self._submitted:
            self.state.generations.discard(self)
            self._record_unfinished("abort")  # closed before the end: client gone or server stopping
        pending = [c.request_id for c in self.choices if c.outputs is not None and not c.finished]
        for choice in self.choices:
            choice.finished = True
        if pending:
            await _shielded_abort(self.state.engine, pending)

    async def abort_engine_requests(self) -> None:
        """Abort the unfinished engine requests but keep consuming: each engine stream then ends
        with a final ``finish_reason="abort"`` output, which :meth:`updates` delivers (graceful
        drain past its timeout)."""
        pending = [c.request_id for c in self.choices if c.outputs is not None and not c.finished]
        if pending:
            await _shielded_abort(self.state.engine, pending)

    # ---- metrics ----------------------------------------------------------------------------

    def _record_update(self, choice: _Choice, update: ChoiceUpdate) -> None:
        """Count what usage counts for this update; record the choice's finish on its last one."""
        metrics = self.state.metrics
        if metrics is None:
            return
        if choice.prompt_index not in self._prompts_counted:
            self._prompts_counted.add(choice.prompt_index)
            metrics.on_prompt_tokens(len(self.prompts[choice.prompt_index]))
        if update.token_ids:
            choice.token_event_times.append(time.monotonic())
            metrics.on_generation_tokens(len(update.token_ids))
        if update.finish_reason is not None:
            self._record_finished(choice, update.finish_reason)

    def _record_unfinished(self, reason: str) -> None:
        """Record every admitted choice whose finish was not recorded yet as ``reason``."""
        if self.state.metrics is None or not self._submitted:
            return
        for choice in self.choices:
            if choice.outputs is not None:
                self._record_finished(choice, reason)

    def _record_finished(self, choice: _Choice, reason: str) -> None:
        metrics = self.state.metrics
        if metrics is None or choice.recorded:
            return
        choice.recorded = True
        try:
            metrics.on_request_finished(
                finished_reason=reason,
                num_prompt_tokens=len(choice.prompt_token_ids),
                num_generation_tokens=choice.num_output_tokens,
                arrival_time=self.arrival_time,
                finished_time=time.monotonic(),
                queued_time=choice.queued_time,
                first_scheduled_time=choice.first_scheduled_time,
                token_event_times=choice.token_event_times,
            )
        except ValueError:  # inconsistent engine stamps must not fail the request
            logger.exception("recording metrics of %s failed", choice.request_id)


async def _shielded_abort(engine: EngineClient, request_ids: Sequence[str]) -> None:
    """Abort requests even while the calling task is being cancelled (client disconnect)."""

    async def abort_all() -> None:
        for request_id in request_ids:
            await engine.abort(request_id)

    task: asyncio.Task[None] = asyncio.ensure_future(abort_all())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)
    with anyio.CancelScope(shield=True):
        await asyncio.shield(task)


async def _merge(iterators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine output streams, tagging each output with its stream index."""
    if len(iterators) == 1:
        async for out in iterators[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                await queue.put((index, out, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
                continue
            yield index, out
    finally:
        for task in tasks:
            task.cancel()


async def collect(generation: Generation, raw_request: Request) -> list[ChoiceUpdate] | None:
    """All updates of a non-streaming request, or None if the client disconnected first (the
    generation is then closed, which aborts its engine requests)."""

    async def consume() -> list[ChoiceUpdate]:
        return [update async for update in generation.updates()]

    async def wait_disconnect() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await generation.close()
    return None if consumer.cancelled() else consumer.result()
