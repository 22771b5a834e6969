"""``sparkserve.server.launch``, the one launcher: ports, readiness, start-up failures, the stop's SIGKILL
fallback, and an app served from a thread. Stand-in servers (a few lines of ``http.server``): no engine."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from sparkserve.server.launch import (
    LaunchError,
    free_port,
    free_port_at,
    free_port_run,
    http_status,
    serve_in_thread,
    spawn,
    stop_all,
    wait_ready,
)

# answers /ready with 200 and anything else with 503 once it has slept ``--delay`` seconds
STAND_IN = """
import http.server, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
print("stand-in starting", flush=True)
time.sleep(delay)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _stand_in(tmp_path: Path, name: str, *extra: str, delay: float = 0.0) -> tuple[list[str], str, Path]:
    port = free_port()
    return ([sys.executable, "-c", STAND_IN, str(port), str(delay), *extra], f"http://127.0.0.1:{port}",
            tmp_path / f"{name}.log")


def test_free_port_run_is_free_and_avoids_a_range() -> None:
    taken = free_port_run(3)
    assert all(free_port_at(p) for p in range(taken, taken + 3))
    again = free_port_run(2, avoid=range(taken, taken + 3))
    assert not set(range(again, again + 2)) & set(range(taken, taken + 3))


def test_spawned_servers_become_ready_together_and_stop(tmp_path: Path) -> None:
    servers = [spawn(name, argv, url, log_path=log) for name in ("a", "b")
               for argv, url, log in [_stand_in(tmp_path, name, delay=0.3)]]
    try:
        wait_ready(servers, timeout_s=30)
        assert [http_status(s.url + "/ready") for s in servers] == [200, 200]
        assert http_status(servers[0].url + "/health") == 503  # an error status is a status, not None
        assert "stand-in starting" in servers[0].log_tail()
        assert servers[0].port == int(servers[0].url.rsplit(":", 1)[1])
    finally:
        stop_all(servers, timeout_s=10)
    assert [s.proc.returncode for s in servers] == [-signal.SIGTERM, -signal.SIGTERM]
    assert http_status(servers[0].url + "/ready") is None  # nothing answers any more


def test_a_child_exiting_during_start_up_is_a_launch_error_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no model here', flush=True); sys.exit(3)"]
    server = spawn("broken", argv, f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "broken.log")
    with pytest.raises(LaunchError, match=r"(?s)broken .*status 3.*no model here"):
        wait_ready([server], timeout_s=30)


def test_a_server_that_never_answers_times_out_and_is_killed_when_it_ignores_sigterm(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('deaf', flush=True); time.sleep(60)"]
    server = spawn("deaf", argv, f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "deaf.log")
    try:
        with pytest.raises(LaunchError, match="not ready after"):
            wait_ready([server], timeout_s=0.5)
        assert server.alive()
    finally:
        stop_all([server], timeout_s=1.0)
    assert server.proc.returncode == -signal.SIGKILL


def test_serve_in_thread_serves_until_the_block_exits() -> None:
    async def app(scope, receive, send):  # a minimal ASGI app: 204 to every request
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(app, lifespan="off") as url:
        assert http_status(url + "/anything") == 204
    assert http_status(url + "/anything") is None
