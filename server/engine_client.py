"""What the server needs from the engine, as typing Protocols.

The server codes against these shapes instead of importing ``sparkserve.engine.async_engine`` (which pulls
in torch); ``sparkserve.engine.async_engine.AsyncEngine`` and ``sparkserve.testing.fake_engine.FakeEngine`` both satisfy
them structurally.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from sparkserve.engine.outputs import EngineStats
from sparkserve.scheduler.outputs import EngineCoreOutput, TokenLogprob
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import DraftOutcome


class Tokenizer(Protocol):
    """The part of ``sparkserve.engine.tokenizer.Tokenizer`` the server uses."""

    eos_token_id: int | None
    bos_token_id: int | None
    chat_template: str | None  # jinja source; None when the model ships none
    stop_token_ids: tuple[int, ...]
    vocab_size: int
    max_token_bytes: int  # upper bound on the UTF-8 bytes one token stands for

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    **kwargs: object) -> list[int]:
        """Rendered + tokenized chat in which only the template's markup yields special tokens."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...


class RequestOutput(Protocol):
    """One output delta of a request (``sparkserve.engine.outputs.RequestOutput``): every field the server
    reads (times for metrics, the prefix-cache hit and the verify step's row for ``usage``, the prompt's
    logprobs), so the server reads them as attributes, never with a default."""

    @property
    def request_id(self) -> str: ...
    @property
    def new_token_ids(self) -> tuple[int, ...]: ...
    @property
    def new_logprobs(self) -> tuple[TokenLogprob, ...] | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def stop_reason(self) -> int | str | None: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def arrival_time(self) -> float: ...
    @property
    def first_scheduled_time(self) -> float | None: ...
    @property
    def num_cached_tokens(self) -> int: ...
    @property
    def speculation(self) -> DraftOutcome | None: ...
    @property
    def prompt_logprobs(self) -> tuple[TokenLogprob, ...] | None: ...


class EngineClient(Protocol):
    """The asyncio engine API the HTTP layer drives.

    ``add_request`` raises ``RequestRejectedError`` / ``QueueFullError`` / ``EngineDeadError``
    before returning, so the server can answer 400 / 429 / 503 before any SSE byte; the returned
    iterator ends after the output carrying ``finish_reason`` and raises ``EngineDeadError`` if
    the engine loop dies. ``abort`` ends a request's iterator with a ``finish_reason="abort"``
    output (for a consumer still reading it).
    """

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_ready(self, timeout_s: float) -> bool: ...

    @property
    def is_healthy(self) -> bool: ...

    def stop_admitting(self) -> None: ...

    async def drain(self, timeout_s: float) -> object: ...


class StatsEngine(Protocol):
    """What the metrics glue (``sparkserve.server.metrics_glue``) needs from an engine: its size, a stats
    snapshot and the listeners run after every step with ``(stats, outputs)``."""

    model_name: str
    max_model_len: int
    step_listeners: list[Callable[[EngineStats, list[EngineCoreOutput]], None]]

    def stats(self) -> EngineStats: ...
