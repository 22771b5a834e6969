"""Observability end to end: a real ``sparkserve serve`` process scraped by a real Prometheus.

One module-scoped server (the embedded SmolLM2 in bf16, a random DSpark drafter so every speculative
decoding series and the throughput profile are live) takes a short bounded load through the official
``openai`` client: streaming and non-streaming requests, stop strings, one 400 and one client
disconnect. Then:

* the counters equal what the responses' usage reported (read from /metrics and through Prometheus);
* every PromQL expression of every dashboard panel and alert rule (``deploy/promql_exprs.py``)
  returns data from that Prometheus;
* SIGTERM during a stream (last, it ends the server): the stream completes, new requests get 503,
  the process exits within the drain timeout.

Prometheus comes from Debian's ``prometheus`` package (``deploy/install_test_tools.sh``); when it is
missing the test tries that script, then fails under ``CI=true`` and skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sparkserve.server.launch import LaunchError, ServerProcess, free_port, spawn, stop_all, wait_ready
from sparkserve.testing.server_harness import http_status, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GAMMA = 4  # drafts per block of the random drafter
DRAIN_TIMEOUT_S = 20.0
RATE_INTERVAL = "20s"  # >= 4 scrape intervals of 1 s

pytestmark = [pytest.mark.slow, pytest.mark.live_server]


def _load_promql_exprs():
    spec = importlib.util.spec_from_file_location("promql_exprs", DEPLOY / "promql_exprs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("promql_exprs", module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def prometheus_binary() -> str:
    """The Debian ``prometheus`` server; installs it if missing, fails under CI, else skips."""
    found = shutil.which("prometheus")
    if found is None:
        subprocess.run(["bash", str(DEPLOY / "install_test_tools.sh")], capture_output=True, timeout=600)
        found = shutil.which("prometheus")
    if found is None:
        message = "prometheus not found; run deploy/install_test_tools.sh (CI runs it before the tests)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def make_random_drafter(folder: Path) -> None:
    """A randomly initialised DSpark drafter for the embedded SmolLM2 (weights untrained: acceptance
    is low, but every speculative decoding code path and metric runs)."""
    import torch

    from sparkserve.engine.gguf_loader import gguf_model_config, open_gguf
    from sparkserve.engine.loader import default_model_path
    from sparkserve.engine.spec_decode.dspark import DSparkDrafter
    from sparkserve.engine.spec_decode.dspark_loader import random_drafter_config, save_drafter

    target = gguf_model_config(open_gguf(default_model_path()))
    config = random_drafter_config(
        target, (1, target.num_hidden_layers // 2), block_size=GAMMA, markov_rank=16
    )
    shared = torch.zeros(target.vocab_size, target.hidden_size, dtype=torch.bfloat16)  # not saved
    drafter = DSparkDrafter(config, shared, shared)
    drafter.reset_parameters(torch.Generator().manual_seed(0))
    save_drafter(drafter, folder)


def write_profile(path: Path) -> None:
    """A small synthetic throughput profile (the dspark policy needs one; measuring takes minutes)."""
    from sparkserve.scheduler.profile.grid import ThroughputProfile

    batch, requests = (8, 32, 128, 256), (1, 2, 4, 8)
    times = tuple(tuple(0.02 + 1e-4 * b + 1e-3 * r for r in requests) for b in batch)
    ThroughputProfile(batch, requests, times).save(path)


@dataclass
class Live:
    """The running server and Prometheus, and what the test sent."""

    server: ServerProcess
    prom: ServerProcess
    model: str = ""
    usages: list[openai.types.CompletionUsage] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def prom_url(self) -> str:
        return self.prom.url

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.server.proc

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def query(self, expr: str) -> dict:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:  # 400 = bad PromQL: Prometheus' error body
            return json.load(err)

    def scalar(self, expr: str) -> float | None:
        answer = self.query(expr)
        result = answer.get("data", {}).get("result", []) if answer.get("status") == "success" else []
        return float(result[0]["value"][1]) if result else None

    def server_log(self) -> str:
        return self.server.log_tail(60)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus = prometheus_binary()
    tmp = tmp_path_factory.mktemp("observability")
    make_random_drafter(tmp / "drafter")
    write_profile(tmp / "profile.json")
    port, prom_port = free_port(), free_port()
    command = shutil.which("sparkserve")
    server_cmd = [command] if command else [sys.executable, "-m", "sparkserve"]
    server_cmd += [
        "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
        "--max-model-len", "512", "--num-kv-blocks", "256", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "256", "--num-threads", str(min(4, os.cpu_count() or 1)),
        "--drafter", str(tmp / "drafter"), "--verify-policy", "dspark", "--profile", str(tmp / "profile.json"),
        "--drain-timeout", str(DRAIN_TIMEOUT_S), "--default-max-tokens", "32", "--log-level", "warning",
    ]  # fmt: skip
    server = spawn("sparkserve", server_cmd, f"http://127.0.0.1:{port}", log_path=tmp / "server.log", cwd=tmp)
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "sparkserve", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                ],
            }
        )
    )
    prom = spawn("prometheus", [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{prom_port}"],
                 f"http://127.0.0.1:{prom_port}", log_path=tmp / "prometheus.log")
    running = Live(server, prom)
    try:
        try:
            wait_ready([server], 120, interval_s=0.5)
        except LaunchError as exc:
            pytest.fail(str(exc))
        running.model = running.client().models.list().data[0].id
        yield running
    finally:
        stop_all([server, prom], 10)


# ---- load ---------------------------------------------------------------------------------------


def _chat_stream(live: Live, content: str, stop: list[str] | None) -> openai.types.CompletionUsage:
    stream = live.client().chat.completions.create(
        model=live.model,
        messages=[{"role": "user", "content": content}],
        max_tokens=24,
        temperature=0.0,
        stop=stop,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage


def _completion(live: Live, prompt: str, stop: list[str] | None) -> openai.types.CompletionUsage:
    response = live.client().completions.create(
        model=live.model, prompt=prompt, max_tokens=16, temperature=0.7, seed=1, stop=stop
    )
    assert response.usage is not None
    return response.usage


@pytest.fixture(scope="module")
def loaded(live: Live) -> Live:
    """Six finished requests (3 streaming chat, 3 completions; stop strings in two) and one 400."""
    jobs = [
        (_chat_stream, "Name three colours.", None),
        (_chat_stream, "Count from one to ten in words.", [" five", "5"]),
        (_chat_stream, "What is the capital of France?", None),
        (_completion, "The quick brown fox", None),
        (_completion, "Once upon a time", ["."]),
        (_completion, "def fibonacci(n):", None),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(fn, live, text, stop) for fn, text, stop in jobs]
        live.usages = [f.result(timeout=120) for f in futures]
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens beyond the 512-token context
        live.client().completions.create(model=live.model, prompt="hello", max_tokens=4096)
    return live


# ---- tests --------------------------------------------------------------------------------------


def test_counters_match_usage(loaded: Live) -> None:
    expected = {
        "sparkserve:request_success_total": float(len(loaded.usages)),
        "sparkserve:generation_tokens_total": float(sum(u.completion_tokens for u in loaded.usages)),
        "sparkserve:prompt_tokens_total": float(sum(u.prompt_tokens for u in loaded.usages)),
    }
    series = loaded.metrics()  # straight from /metrics
    got = {name: sum(v for (n, _), v in series.items() if n == name) for name in expected}
    assert got == expected
    assert series[("sparkserve:request_rejected_total", (("reason", "invalid_request"),))] == 1
    assert series[("sparkserve:request_success_total", (("finished_reason", "abort"),))] == 0
    assert series[("sparkserve:e2e_request_latency_seconds_count", ())] == len(loaded.usages)
    assert series[("sparkserve:time_to_first_token_seconds_count", ())] == len(loaded.usages)
    assert series[("sparkserve:request_queue_time_seconds_count", ())] == len(loaded.usages)
    assert series[("sparkserve:spec_decode_num_drafts_total", ())] > 0  # the drafter ran
    assert sum(v for (n, _), v in series.items() if n == "sparkserve:profile_steps_per_second") > 0
    # The same numbers through Prometheus, once it has scraped after the load.
    queries = {name: f"sum({name})" for name in expected}
    assert wait_for(lambda: all(loaded.scalar(q) == expected[n] for n, q in queries.items()), 20, 0.5), {
        n: loaded.scalar(q) for n, q in queries.items()
    }


def test_disconnect_counts_as_abort(loaded: Live) -> None:
    body = {
        "model": loaded.model,
        "prompt": "Tell me a long story.",
        "max_tokens": 200,
        "ignore_eos": True,  # cannot end on its own before the hang-up
        "stream": True,
    }
    with httpx.stream("POST", f"{loaded.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # first event, then hang up mid-stream
    key = ("sparkserve:request_success_total", (("finished_reason", "abort"),))
    assert wait_for(lambda: loaded.metrics()[key] == 1, 20, 0.2)


def test_every_dashboard_and_alert_expression_returns_data(loaded: Live) -> None:
    exprs = _load_promql_exprs().all_exprs(rate_interval=RATE_INTERVAL)
    assert len(exprs) > 50
    missing: dict[str, str] = {}

    def all_have_data() -> bool:
        answers = {e.source: (e.expr, loaded.query(e.expr)) for e in exprs}
        missing.clear()
        missing.update(
            {
                source: f"{expr}\n    -> {answer.get('error') or 'no data'}"
                for source, (expr, answer) in answers.items()
                if answer.get("status") != "success" or not answer["data"]["result"]
            }
        )
        return not missing

    assert wait_for(all_have_data, 30, 1.0), "expressions without data:\n" + "\n".join(
        f"{s}: {m}" for s, m in missing.items()
    )


def test_sigterm_drains_stream_then_exits(loaded: Live) -> None:
    """Last (it ends the server): SIGTERM mid-stream -> stream completes, 503s, exit in time."""
    result: dict[str, object] = {}
    first_chunk = threading.Event()

    def stream() -> None:
        chunks = loaded.client().completions.create(  # ignore_eos: long enough to outlive the signal
            model=loaded.model,
            prompt="Write a poem about the sea.",
            max_tokens=64,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        for chunk in chunks:
            first_chunk.set()
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        result["finish_reason"] = finish
        result["finished_at"] = time.monotonic()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_chunk.wait(60)
    sent = time.monotonic()
    loaded.proc.send_signal(signal.SIGTERM)
    seen: list[tuple[float, int | None]] = []

    def not_ready() -> bool:
        seen.append((round(time.monotonic() - sent, 2), http_status(loaded.url + "/ready")))
        return seen[-1][1] == 503

    assert wait_for(not_ready, 20), seen
    with pytest.raises(openai.APIStatusError) as info:
        loaded.client().completions.create(model=loaded.model, prompt="hi", max_tokens=2)
    assert info.value.status_code == 503
    rejected = ("sparkserve:request_rejected_total", (("reason", "draining"),))
    assert loaded.metrics()[rejected] == 1  # /metrics stays up while draining
    thread.join(timeout=DRAIN_TIMEOUT_S + 10)
    assert result.get("finish_reason") == "length", result
    assert float(result["finished_at"]) > sent  # the stream really outlived the signal
    assert loaded.proc.wait(timeout=DRAIN_TIMEOUT_S + 10) == 0, loaded.server_log()
    assert time.monotonic() - sent < DRAIN_TIMEOUT_S + 10
