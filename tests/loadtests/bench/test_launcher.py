"""``launch_servers``, the one launcher of ``sparkserve serve`` for the benches and tests: another
program in place of this checkout's CLI (``bench_first_start``'s ``--sparkserve``), extra environment,
the serve flags passed through, and every child stopped (a stand-in server: no model, no torch)."""

from __future__ import annotations

import json
import os
import sys

import httpx

from sparkserve.loadtests.bench.client import launch_servers, stop_servers

# answers /ready with what it was started with: its argv and the two environment variables under test
STAND_IN = """
import http.server, json, os, sys
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
body = json.dumps({"argv": argv, "probe": os.environ.get("LAUNCH_PROBE"),
                   "pythonpath": os.environ.get("PYTHONPATH")}).encode()
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def test_launch_servers_runs_another_program_with_extra_env() -> None:
    launched = launch_servers([("a", "--max-num-seqs 3"), ("b", "")], ready_timeout_s=30,
                              program=[sys.executable, "-c", STAND_IN], env={"LAUNCH_PROBE": "yes"}, parallel=True)
    try:
        seen = [json.loads(httpx.get(f"http://127.0.0.1:{s.port}/ready", timeout=5).text) for s in launched]
    finally:
        stop_servers(launched)
    assert all(s.proc.poll() is not None for s in launched)
    assert seen[0]["argv"][0] == "serve" and seen[0]["argv"][-2:] == ["--max-num-seqs", "3"]
    assert seen[1]["argv"][-2:] == ["--drain-timeout", "5"]
    assert [d["probe"] for d in seen] == ["yes", "yes"]
    # another program runs with this environment as it is: no checkout put first on its PYTHONPATH
    assert all(d["pythonpath"] == os.environ.get("PYTHONPATH") for d in seen)
