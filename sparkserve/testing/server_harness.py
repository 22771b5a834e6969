"""Run a sparkserve app on a real uvicorn server in a background thread (test helper)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import uvicorn

from sparkserve.server.app import build_app
from sparkserve.testing.fake_engine import FakeEngine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int, avoid: range = range(0)) -> int:
    """A port ``p`` with ``p .. p + count - 1`` all free now and outside ``avoid`` (a single free port can
    be followed by a taken one: other tests on the machine hold ports too)."""
    while True:
        base = free_port()
        run = range(base, base + count)
        if all(free_port_at(p) for p in run) and not set(run) & set(avoid):
            return base


def free_port_at(port: int) -> bool:
    """True when ``port`` can be bound on 127.0.0.1 now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
    """Serve ``build_app(engine, **app_kwargs)`` on 127.0.0.1 until the block exits
    (``uvicorn_options``: extra ``uvicorn.Config`` arguments)."""
    engine = engine or FakeEngine()
    port = free_port()
    config = uvicorn.Config(
        build_app(engine, **app_kwargs), host="127.0.0.1", port=port, log_level="warning",
        **(uvicorn_options or {}),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, app_kwargs.get("api_key") or "unused")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def http_status(url: str) -> int | None:
    """``GET url``'s status code, None when nothing answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None
