"""The one launcher of servers: start one (a child process, or an ASGI app on a thread), wait until it
answers, stop it.

Every place that starts a server goes through here: ``sparkserve replicas`` (:mod:`.replicas`: the
replicas and the router), the benches' ``launch_servers`` (``loadtests/bench/client.py``: ``sparkserve
serve`` children), the router benchmark, and the tests' servers (``sparkserve/testing/server_harness.py``:
the fake engine in a child process or served from a thread). So there is one way to find a free port,
one readiness wait (what a child that exits during start-up or never answers raises), and one stop
(SIGTERM, which lets ``sparkserve serve`` drain, then SIGKILL after a timeout).

Server layer, standard library and uvicorn only (no torch, no engine import).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn

LOCALHOST = "127.0.0.1"


class LaunchError(RuntimeError):
    """A server exited during start-up or did not answer in time (the message carries its log's tail)."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that can be bound on ``host`` now (the kernel's choice for port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_at(port: int, host: str = LOCALHOST) -> bool:
    """True when ``port`` can be bound on ``host`` now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_run(count: int, avoid: range = range(0)) -> int:
    """A port ``p`` with ``p .. p + count - 1`` all free now and outside ``avoid`` (for ``sparkserve
    replicas``' base ports: a single free port can be followed by a taken one)."""
    while True:
        base = free_port()
        run = range(base, base + count)
        if all(free_port_at(p) for p in run) and not set(run) & set(avoid):
            return base


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """``GET url``'s status code (error statuses included), None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, ValueError):  # refused, reset, timed out; a half-started server's garbage
        return None


@dataclass
class ServerProcess:
    """A server running as a child process.

    Attributes:
        name: what the logs and errors call it.
        url: its base URL, ``http://HOST:PORT`` (no path).
        proc: the child.
        log_path: the file its stdout and stderr go to (None: inherited from this process).
    """

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its log ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return "".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (``sparkserve serve`` drains), then SIGKILL after ``timeout_s`` seconds."""
        stop_all([self], timeout_s)


def spawn(name: str, argv: Sequence[str], url: str, *, env: Mapping[str, str] | None = None,
          log_path: Path | None = None, cwd: Path | None = None, new_session: bool = False) -> ServerProcess:
    """Start ``argv`` as a child serving ``url``; returns at once (see :func:`wait_ready`).

    ``env``: the child's whole environment (None: this one's); ``log_path``: its stdout and stderr,
    appended (None: inherited); ``new_session``: its own session, so a terminal's Ctrl-C reaches only
    this process, which then stops it.
    """
    out = None if log_path is None else open(log_path, "ab")  # noqa: SIM115 - the child holds its own copy
    try:
        proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), cwd=cwd, stdout=out,
                                stderr=None if out is None else subprocess.STDOUT, start_new_session=new_session)
    finally:
        if out is not None:
            out.close()
    return ServerProcess(name, url.rstrip("/"), proc, log_path)


READY_REQUEST_TIMEOUT_S = 12.0
"""How long one readiness request may take: ``sparkserve serve``'s ``/ready`` runs a one-token generation
limited to 10 s (``ReadinessProbe``), which a loaded machine can need most of."""


def wait_ready(servers: Sequence[ServerProcess], timeout_s: float, path: str = "/ready",
               interval_s: float = 0.2) -> None:
    """Wait until ``GET url + path`` answers 200 for every server (polled together, every ``interval_s``;
    each request may take ``READY_REQUEST_TIMEOUT_S``).

    Raises:
        LaunchError: a server exited first, or ``timeout_s`` seconds passed (the message names the first
            such server, its exit status and its log's tail).
    """
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if not server.alive():
                raise LaunchError(f"{server.name} ({server.url}) exited with status {server.proc.returncode} "
                                  f"during start-up:\n{server.log_tail()}")
            if http_status(server.url + path, READY_REQUEST_TIMEOUT_S) == 200:
                pending.remove(server)
        if not pending:
            return
        if time.monotonic() > deadline:
            first = pending[0]
            raise LaunchError(f"{first.name} ({first.url}) not ready after {timeout_s:.0f} s:\n{first.log_tail()}")
        time.sleep(interval_s)


def stop_all(servers: Sequence[ServerProcess], timeout_s: float = 30.0) -> None:
    """SIGTERM every live server first, then wait for each until one shared deadline ``timeout_s`` seconds
    away; SIGKILL those still alive then."""
    for server in servers:
        if server.alive():
            server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for server in servers:
        try:
            server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


def environ_with(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra`` (a child's environment for :func:`spawn`)."""
    return {**os.environ, **(extra or {})}


@contextmanager
def serve_in_thread(app: Any, host: str = LOCALHOST, port: int | None = None, timeout_s: float = 10.0,
                    **uvicorn_options: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a daemon thread of this process until the block exits;
    yields its base URL. ``uvicorn_options``: extra ``uvicorn.Config`` arguments.

    Raises:
        LaunchError: uvicorn did not start within ``timeout_s`` seconds.
    """
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise LaunchError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
