"""The HTTP server process: the app under uvicorn, with graceful drain and an engine watchdog.

Graceful shutdown: the first SIGTERM / SIGINT stops admission (new requests get 503, readiness
turns false) and waits for in-flight requests; those still running near the end of
``--drain-timeout`` are aborted and end cleanly (last chunk with ``finish_reason: "abort"``, then
``[DONE]``) within it; then uvicorn shuts down (closing connections, then the engine). A second
signal exits at once.

Engine death: if the engine loop dies (``/health`` turns 503), the process shuts down and exits
with status 1, so a supervisor (Kubernetes, systemd, compose ``restart:``) starts a fresh one.

The ``sparkserve serve`` command (``sparkserve.cli``) and the fake engine's server
(``sparkserve.testing.fake_engine``) both run through ``serve``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from sparkserve.server.app import drain
from sparkserve.server.http_guard import HeaderTimeoutH11Protocol

logger = logging.getLogger("sparkserve")

ENGINE_DEAD_EXIT_CODE = 1
_WATCHDOG_PERIOD_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first exit signal drains in-flight requests before shutting down, and
    which shuts down (``exit_code`` 1) when the engine dies."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._draining = False
        self.exit_code = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._watchdog = asyncio.ensure_future(self._watch_engine())
        try:
            await super().serve(sockets)
        finally:
            self._watchdog.cancel()

    async def _watch_engine(self) -> None:
        """Shut down with exit code 1 once the engine reports itself dead (after start-up)."""
        engine = self._app.state.server.engine
        while not self.should_exit:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            if self.started and not engine.is_healthy and not self._draining:
                logger.critical("the engine died: shutting down (exit status %d)", ENGINE_DEAD_EXIT_CODE)
                self.exit_code = ENGINE_DEAD_EXIT_CODE
                self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: exit now
            return
        self._draining = True
        logger.info("received %s: draining for up to %.1f s", signal.Signals(sig).name, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        finished = await drain(self._app.state.server, self._drain_timeout_s)
        if not finished:
            logger.warning("drain timeout: the remaining requests were aborted")
        self.should_exit = True


def serve(
    app: FastAPI,
    *,
    host: str,
    port: int,
    drain_timeout_s: float,
    log_level: str = "info",
    timeout_keep_alive_s: int = 5,
    limit_concurrency: int | None = None,
) -> None:
    """Run ``app`` with uvicorn until a signal, draining gracefully (see module docstring).

    Raises:
        SystemExit: status 1 when the engine died while serving.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        lifespan="on",
        http=HeaderTimeoutH11Protocol,
        timeout_keep_alive=timeout_keep_alive_s,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=2,  # the drain already ended every request
    )
    server = DrainingServer(config, app, drain_timeout_s)
    server.run()
    if server.exit_code:
        sys.exit(server.exit_code)
