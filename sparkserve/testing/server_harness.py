"""Servers for tests, all started through :mod:`sparkserve.server.launch` (the one launcher): a
sparkserve app on a real uvicorn server in a background thread (``run_server``), the fake engine's
server as a child process (``launch_fake_engine``); its port helpers, ``http_status`` and ``wait_for``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from sparkserve.server.app import build_app
from sparkserve.server.launch import (
    LOCALHOST,
    ServerProcess,
    free_port,
    free_port_at,
    free_port_run,
    http_status,
    serve_in_thread,
    spawn,
    stop_all,
    wait_ready,
)
from sparkserve.testing.fake_engine import FakeEngine

__all__ = ["FAKE_ENGINE_COMMAND", "RunningServer", "free_port", "free_port_at", "free_port_run", "http_status", "launch_fake_engine",
           "run_server", "wait_for"]

FAKE_ENGINE_COMMAND = (sys.executable, "-m", "sparkserve.testing.fake_engine")
"""The fake engine's server as a program (``python -m sparkserve.testing.fake_engine --port P ...``)."""


@dataclass
class RunningServer:
    """A live server: its base URL and the fake engine behind it."""

    url: str
    engine: FakeEngine
    api_key: str = "unused"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=30)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)


@contextmanager
def run_server(
    engine: FakeEngine | None = None, uvicorn_options: dict[str, Any] | None = None, **app_kwargs: Any
) -> Iterator[RunningServer]:
    """Serve ``build_app(engine, **app_kwargs)`` on 127.0.0.1 from a thread until the block exits
    (``uvicorn_options``: extra ``uvicorn.Config`` arguments)."""
    engine = engine or FakeEngine()
    with serve_in_thread(build_app(engine, **app_kwargs), **(uvicorn_options or {})) as url:
        yield RunningServer(url, engine, app_kwargs.get("api_key") or "unused")


@contextmanager
def launch_fake_engine(*args: str, log_path: Path | None = None, timeout_s: float = 60.0,
                       stop_timeout_s: float = 10.0) -> Iterator[ServerProcess]:
    """The fake engine's HTTP server (``server/http_server.py``: drain, watchdog) as a child process with
    the flags ``args``, on a free port; yields once ``/health`` answers 200 and stops it on exit (SIGTERM,
    then SIGKILL after ``stop_timeout_s``).

    Raises:
        LaunchError: it exited or did not answer within ``timeout_s`` seconds.
    """
    port = free_port()
    server = spawn("fake-engine", [*FAKE_ENGINE_COMMAND, "--port", str(port), *args], f"http://{LOCALHOST}:{port}",
                   log_path=log_path)
    try:
        wait_ready([server], timeout_s, path="/health")
        yield server
    finally:
        stop_all([server], stop_timeout_s)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` every ``interval_s`` seconds until it is true or ``timeout_s`` passes; returns its
    last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
