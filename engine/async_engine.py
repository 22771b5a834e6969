"""AsyncEngine: the asyncio front of the engine (continuous batching loop).

The loop runs ``EngineCore.step()`` in a single worker thread (the model forward releases the GIL,
so HTTP handlers stay responsive) and applies new requests and aborts *between* steps, so the
scheduler is only ever touched by one thread at a time. Each request owns an ``asyncio.Queue`` of
``RequestOutput`` deltas.

Aborts free a request's KV blocks before the next step, and the step listeners (metrics) run right
after aborts are applied, so the running / waiting / KV gauges drop at once even when no step
follows. A step that raises fails its requests, not the loop (``sparkserve.engine.step_faults``); only an
engine that cannot step any more (``EngineBrokenError``) or a bug in the loop itself ends it, and
then every in-flight request gets ``EngineDeadError`` and ``is_healthy`` turns false (the CLI then
exits the process non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.outputs import (
    EngineDeadError,
    EngineDrainingError,
    EngineStats,
    QueueFullError,
    RequestOutput,
    StepStats,
)
from sparkserve.scheduler.outputs import EngineCoreOutput, TokenLogprob

__all__ = ["AsyncEngine", "EngineDeadError", "EngineDrainingError", "QueueFullError", "RequestOutput"]
from sparkserve.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    queue: asyncio.Queue
    num_prompt_tokens: int
    arrival_time: float
    num_output_tokens: int = 0


class AsyncEngine:
    """Serves many concurrent requests from one continuous-batching loop.

    Args:
        core: the synchronous engine core.
        max_waiting_requests: bound on queued (not yet running) requests.
        max_waiting_tokens: bound on the prompt tokens of queued requests (None = no bound).
    """

    def __init__(self, core: EngineCore, max_waiting_requests: int = 512, max_waiting_tokens: int | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        # The one thread that runs torch for this engine (steps, adds, aborts): see ``from_args``.
        self._executor = executor or new_engine_executor()
        self._tracked: dict[str, _Tracked] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._admitting = True
        # callables (stats: EngineStats, outputs) run on the loop after each step (and after aborts only)
        self.step_listeners: list[Callable[[EngineStats, list[EngineCoreOutput]], None]] = []
        self._waiting_tokens = 0  # tokens in the scheduler's waiting queue, counted between steps

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngine:
        """Build the core (model load, profile, warm-up) on the engine thread that will run its steps.

        On the CPU, torch's OpenMP runtime keeps one worker team per calling thread: a model loaded and
        warmed on the main thread and stepped on another leaves two teams competing for the cores, which
        measured 40.6 ms per c=1 decode step against 14.2 ms when one thread does everything (2 cores,
        bf16 SmolLM2-135M). So every torch call of the engine happens on this one thread.
        """
        executor = new_engine_executor()
        core = executor.submit(EngineCore, args).result()
        return cls(core, max_waiting_requests=args.max_waiting_requests,
                   max_waiting_tokens=args.max_waiting_tokens, executor=executor)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run_loop(), name="engine-loop")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.core.close()

    def stop_admitting(self) -> None:
        """Graceful shutdown: new requests get ``EngineDrainingError`` (503)."""
        self._admitting = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight or ``timeout_s`` passes. Returns True if drained."""
        deadline = time.monotonic() + timeout_s
        while self._tracked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._tracked

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._task is not None and not self._task.done()

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting + len(self._pending_adds)

    def stats(self) -> EngineStats:
        """The core's stats snapshot without a step (gauges, totals, controller): start-up and metrics sizing."""
        return self.core.stats()

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens (outputs of preempted requests included) of the queued requests, as of the
        last step (the step thread changes the queue while it runs) plus the requests added since."""
        return self._waiting_tokens + sum(r.num_tokens for r in self._pending_adds)

    def _count_waiting_tokens(self) -> None:
        """Between steps only (the step thread is idle)."""
        self._waiting_tokens = sum(r.num_tokens for r in self.core.scheduler.waiting)

    def _check_queue_room(self, num_tokens: int) -> None:
        """QueueFullError (429) when the waiting queue is full by requests or by tokens."""
        if self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"too many waiting requests ({self.num_waiting})", retry_after_s=1.0)
        limit = self.max_waiting_tokens
        if limit is not None and self.num_waiting and self.num_waiting_tokens + num_tokens > limit:
            raise QueueFullError(
                f"too many waiting prompt tokens ({self.num_waiting_tokens} + {num_tokens} > {limit})",
                retry_after_s=1.0,
            )

    # ------------------------------------------------------------ requests
    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; errors are raised here, before the caller sends any byte.

        Raises:
            RequestRejectedError: the request can never fit (HTTP 400).
            QueueFullError: the waiting queue is full (HTTP 429).
            EngineDrainingError: the server is shutting down (HTTP 503).
            EngineDeadError: the engine loop died (HTTP 503).
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        if not self._admitting:
            raise EngineDrainingError("server is shutting down")
        if request_id in self._tracked:
            raise ValueError(f"duplicate request id {request_id!r}")
        request = self.core.make_request(request_id, prompt_token_ids, params)
        self.core.validate(request)
        self._check_queue_room(request.num_tokens)
        tracked = _Tracked(asyncio.Queue(), request.num_prompt_tokens, request.arrival_time)
        self._tracked[request_id] = tracked
        self._pending_adds.append(request)
        if self._wakeup is not None:
            self._wakeup.set()
        return self._stream(request_id, tracked)

    async def _stream(self, request_id: str, tracked: _Tracked) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await tracked.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its KV blocks are freed before the next step. Its stream ends
        with a final ``finish_reason="abort"`` output (for a consumer still reading it, e.g. when the
        server aborts requests at the end of a drain)."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        tracked.queue.put_nowait(
            RequestOutput(request_id, (), None, "abort", None, tracked.num_prompt_tokens,
                          tracked.num_output_tokens, tracked.arrival_time)
        )
        self._pending_aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestOutput:
        """Convenience: run one request to completion and return all its tokens as one output."""
        request_id = uuid.uuid4().hex
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        last = None
        async for out in await self.add_request(request_id, prompt_token_ids, params):
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or ())
            last = out
        assert last is not None
        return RequestOutput(
            request_id, tuple(tokens), tuple(logprobs) if logprobs else None, last.finish_reason,
            last.stop_reason, last.num_prompt_tokens, last.num_output_tokens, last.arrival_time,
            last.first_scheduled_time,
        )

    async def check_ready(self, timeout_s: float = 5.0) -> bool:
        """Readiness: a real 1-token generation through the engine queue within ``timeout_s``."""
        if not self.is_healthy or not self._admitting:
            return False
        prompt = self.tokenizer.encode("ping") or [0]
        try:
            out = await asyncio.wait_for(
                self.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1)), timeout_s
            )
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        return out.num_output_tokens == 1

    # ------------------------------------------------------------ loop
    def _take_pending(self) -> tuple[list, list[str]]:
        """New requests (still tracked: not aborted meanwhile) and aborts since the last step (loop thread)."""
        adds, self._pending_adds = self._pending_adds, []
        aborts, self._pending_aborts = self._pending_aborts, []
        return [r for r in adds if r.request_id in self._tracked], aborts

    def _apply_and_step(self, adds: list, aborts: list[str]) -> tuple[list[str], list[EngineCoreOutput] | None,
                                                                       EngineStats]:
        """On the engine thread: hand adds and aborts to the core, then run one step if anything is left.
        Returns the ids whose add failed, the step's outputs (None when no step ran) and the stats
        snapshot after it (taken here, so it matches the step)."""
        failed = []
        for request in adds:
            try:
                self.core.add_request(request)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not end the loop
                logger.error("adding request %s failed: %r", request.request_id, exc)
                failed.append(request.request_id)
        for request_id in aborts:
            self.core.abort_request(request_id)
        outputs = self.core.step() if self.core.has_unfinished_requests() else None
        return failed, outputs, self.core.stats(self.core.last_step if outputs is not None else None)

    def _fail(self, request_id: str) -> None:
        self._dispatch([EngineCoreOutput(request_id, (), finish_reason="error")])

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        try:
            while True:
                adds, aborts = self._take_pending()
                if not adds and not aborts and not self.core.has_unfinished_requests():
                    self._wakeup.clear()
                    if not self._pending_adds and not self._pending_aborts:
                        await self._wakeup.wait()
                    continue
                failed, outputs, stats = await loop.run_in_executor(self._executor, self._apply_and_step, adds, aborts)
                for request_id in failed:
                    self._fail(request_id)
                self._count_waiting_tokens()
                if outputs is None:  # aborts only: the gauges show the freed requests and blocks at once
                    for listener in self.step_listeners:
                        listener(stats, [])
                    continue
                self._dispatch(outputs, stats.step)
                for listener in self.step_listeners:
                    listener(stats, outputs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the loop must report any failure
            logger.exception("engine loop died")
            self._dead = exc
            error = EngineDeadError(f"engine loop died: {exc!r}")
            for tracked in self._tracked.values():
                tracked.queue.put_nowait(error)
            self._tracked.clear()

    def _dispatch(self, outputs: list[EngineCoreOutput], step: StepStats | None = None) -> None:
        """Push each output to its request's queue, with the request's row of the step's speculation record."""
        spec = step.scheduler.spec_decoding if step is not None else None
        outcomes = {d.request_id: d for d in spec.drafts} if spec is not None else {}
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            tracked.num_output_tokens += len(out.new_token_ids)
            tracked.queue.put_nowait(RequestOutput(
                request_id=out.request_id, new_token_ids=out.new_token_ids, new_logprobs=out.new_logprobs,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                num_prompt_tokens=tracked.num_prompt_tokens, num_output_tokens=tracked.num_output_tokens,
                arrival_time=tracked.arrival_time, first_scheduled_time=out.first_scheduled_time,
                num_cached_tokens=out.num_cached_tokens, speculation=outcomes.get(out.request_id),
                prompt_logprobs=out.prompt_logprobs,
            ))
            if out.finish_reason is not None:
                del self._tracked[out.request_id]


def new_engine_executor() -> ThreadPoolExecutor:
    """The single-thread executor an engine runs all its torch work on (``AsyncEngine.from_args``)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
