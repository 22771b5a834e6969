"""The tensor-parallel server's processes end with it (`sparkserve serve -tp 2` on a tiny random Llama
folder, gloo, one worker): SIGTERM and Ctrl-C (SIGINT to the whole process group) stop the worker with
its stop message and exit 0; a worker killed while rank 0 waits inside a step, or one whose tokens part
from rank 0's (a forced divergence: another engine seed for unseeded sampling), ends the server with
status 1 and a message naming the rank and the reason; no worker outlives the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sparkserve.testing.server_harness import free_port
from sparkserve.testing.tensor_parallel import alive, worker_pids

pytestmark = pytest.mark.live_server

# ``sparkserve serve`` (arguments from sys.argv) whose workers run ``reseeded_worker_main`` (``-c``: spawned
# workers do not re-run a main module; the CLI is imported here, not from sparkserve.testing, by the layer rule).
DIVERGING = ("from sparkserve.engine.parallel import executor; "
             "from sparkserve.testing.tensor_parallel import reseeded_worker_main; "
             "executor.worker_main = reseeded_worker_main; "
             "from sparkserve.cli import main; main()")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (4 query heads, 2 KV heads, MLP 128: divides by 2) and tokenizer; untied,
    so sampling at T = 2 spreads over the vocabulary (the tied one repeats one token)."""
    from sparkserve.testing.hf_models import CASES, make_hf_model, write_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model(*CASES["llama-untied-llama3rope"]).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


@dataclass
class Server:
    """A ``sparkserve serve -tp 2`` process (its own process group) and its tensor-parallel worker."""

    proc: subprocess.Popen
    url: str
    log: Path
    worker: int

    def complete(self, **body: object) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json={"model": "tp-test", "prompt": "Once upon a time",
                                                              **body}, timeout=60)

    def complete_in_background(self, **body: object) -> None:
        def send() -> None:
            try:
                self.complete(**body)
            except httpx.HTTPError:
                pass  # the server may die under it

        threading.Thread(target=send, daemon=True).start()

    def exit_status(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def text(self) -> str:
        return self.log.read_text()


@contextmanager
def serve(folder: Path, tmp_path: Path, diverging: bool = False) -> Iterator[Server]:
    port = free_port()
    program = ["-c", DIVERGING] if diverging else ["-m", "sparkserve.cli"]
    args = ["serve", "--model", str(folder), "--port", str(port), "--tensor-parallel-size", "2",
            "--drafter", "none", "--dtype", "float32", "--no-cpu-plan", "--quantization", "none",
            "--num-kv-blocks", "64", "--num-threads", "1", "--served-model-name", "tp-test", "--drain-timeout", "10"]
    log = tmp_path / "server.log"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, *program, *args], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        workers = worker_pids(proc.pid)
        assert len(workers) == 1, workers
        yield Server(proc, url, log, workers[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode} before ready:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server was not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signal_stops_worker_and_server_cleanly(how: str, tiny_folder: Path, tmp_path: Path) -> None:
    with serve(tiny_folder, tmp_path) as server:
        assert server.complete(max_tokens=8).status_code == 200
        if how == "sigterm":
            os.kill(server.proc.pid, signal.SIGTERM)
        else:  # Ctrl-C reaches the whole process group; the worker ignores it, the server drains
            os.killpg(server.proc.pid, signal.SIGINT)
        assert server.exit_status() == 0, server.text()[-3000:]
        text = server.text()
        assert "tensor-parallel workers stopped (exit statuses [0])" in text, text[-3000:]  # by its stop message
        assert "while serving" not in text
        assert _gone(server.worker), "orphaned worker"


def test_killed_worker_stops_server(tiny_folder: Path, tmp_path: Path) -> None:
    with serve(tiny_folder, tmp_path) as server:
        os.kill(server.worker, signal.SIGSTOP)  # rank 0's next step waits for it inside a collective
        server.complete_in_background(max_tokens=32)
        time.sleep(1.0)
        os.kill(server.worker, signal.SIGKILL)
        assert server.exit_status() == 1
        text = server.text()
        assert ("tensor-parallel worker rank 1 exited with status -9 (killed by SIGKILL) while serving: "
                "stopping the server (exit status 1)") in text, text[-3000:]
        assert _gone(server.worker)


def test_diverged_worker_stops_server(tiny_folder: Path, tmp_path: Path) -> None:
    with serve(tiny_folder, tmp_path, diverging=True) as server:
        assert server.complete(max_tokens=8, temperature=0.0).status_code == 200  # greedy: still in step
        server.complete_in_background(max_tokens=48, temperature=2.0)  # unseeded: other random streams
        assert server.exit_status() == 1
        text = server.text()
        assert "RanksDivergedError: rank 1 parted from rank 0 at step" in text, text[-3000:]
        assert ("tensor-parallel worker rank 1 exited with status 3 (its step failed or its tokens parted from "
                "rank 0's) while serving") in text, text[-3000:]
        assert _gone(server.worker)
