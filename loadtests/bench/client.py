"""HTTP side of ``sparkserve bench``: streaming requests to any OpenAI-compatible server, the
one-time capability probe, /metrics scraping and launching sparkserve configurations.

Works with sparkserve, vLLM, SGLang and llama.cpp's ``llama-server``: usage is read from whichever
chunk carries it (OpenAI sends it in a last chunk with no choices; llama-server has put it on the
chunk with ``finish_reason``), ``ignore_eos`` and ``stream_options.continuous_usage_stats`` (a vLLM
extension sparkserve implements: cumulative usage in every chunk, hence exact tokens per chunk) are
sent only when the probe found the server accepts them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sparkserve.loadtests.bench.metrics import (
    RequestRecord,
    chunk_tokens_from_cumulative,
    estimate_chunk_tokens,
)
from sparkserve.server.launch import LOCALHOST, ServerProcess, free_port, spawn, stop_all, wait_ready


@dataclass
class Target:
    """A server under test.

    Attributes:
        name: label in tables; ``url``: OpenAI base URL ending in /v1.
        model: model id sent in requests (from /v1/models when not given).
        ignore_eos: send ``ignore_eos: true``; ``continuous_usage``: ask for usage in every chunk.
        probe: what the probe found (JSON-ready).
        launch_flags: the ``sparkserve serve`` flags when the bench started it.
    """

    name: str
    url: str
    model: str = ""
    api_key: str | None = None
    ignore_eos: bool = False
    continuous_usage: bool = False
    probe: dict[str, Any] = field(default_factory=dict)
    launch_flags: str | None = None

    @property
    def root(self) -> str:
        """Server root (the base URL without /v1): where /metrics and /ready live."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def normalize_url(url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1/`` -> ``http://h:p/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def request_body(target: Target, endpoint: str, messages: list[dict[str, str]], max_tokens: int,
                 temperature: float, extra: dict[str, Any] | None = None,
                 ignore_eos: bool | None = None, continuous_usage: bool | None = None) -> dict[str, Any]:
    """The JSON body of one streaming request (``endpoint``: "chat" or "completions"; completions
    send the last user message as the prompt)."""
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True}
    if endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = messages[-1]["content"]
    options: dict[str, Any] = {"include_usage": True}
    if target.continuous_usage if continuous_usage is None else continuous_usage:
        options["continuous_usage_stats"] = True
    body["stream_options"] = options
    if target.ignore_eos if ignore_eos is None else ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


async def stream_request(client: httpx.AsyncClient, target: Target, endpoint: str, body: dict[str, Any],
                         timeout_s: float) -> RequestRecord:
    """Send one streaming request and time its content chunks (never raises: failures are records
    with ``ok`` False)."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    record = RequestRecord(send_s=time.perf_counter(), target=target.name)
    cumulative: list[int | None] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", target.url + path, json=body, headers=target.headers(),
                                 timeout=timeout_s) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                record.ok, record.error = False, f"HTTP {resp.status_code}: {detail}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.ok, record.error = False, f"stream error: {json.dumps(chunk['error'])[:300]}"
                        break
                    chunk_usage = chunk.get("usage")
                    if chunk_usage:
                        usage = chunk_usage
                    text = ""
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
                        text += piece or ""
                    if text:
                        record.chunk_times_s.append(now)
                        texts.append(text)
                        cumulative.append(chunk_usage.get("completion_tokens") if chunk_usage else None)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.ok, record.error = False, f"{type(exc).__name__}: {exc}"[:300]
    record.end_s = time.perf_counter()
    record.text = "".join(texts)
    if usage:
        record.usage_reported = True
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    elif record.ok:
        record.output_tokens = len(record.chunk_times_s)  # no usage: one token per chunk, flagged
    exact = chunk_tokens_from_cumulative(cumulative) if record.usage_reported else None
    record.tokens_exact = exact is not None
    record.chunk_tokens = exact if exact is not None else estimate_chunk_tokens(
        len(record.chunk_times_s), record.output_tokens)
    if record.ok and not record.chunk_times_s and record.output_tokens > 0:
        record.ok, record.error = False, "no content chunk streamed"
    return record


_PROBE_PROMPT = "Answer with one word: is the sky blue?"


async def probe_target(target: Target, endpoint: str, want_ignore_eos: bool, timeout_s: float = 120.0,
                       probe_tokens: int = 16, client: httpx.AsyncClient | None = None) -> None:
    """Fill ``target.model`` (from /v1/models unless set), and find out once whether the server
    accepts ``ignore_eos`` and ``continuous_usage_stats`` (HTTP 200 rather than 400), whether it
    honours ``ignore_eos`` (``probe_tokens`` generated for a one-word answer) and whether it
    reports usage. Results go to ``target.probe``.

    Raises:
        RuntimeError: the server does not answer /v1/models or no variant of the request succeeds.
    """
    async with client or httpx.AsyncClient(timeout=timeout_s) as client:
        if not target.model:
            try:
                resp = await client.get(target.url + "/models", headers=target.headers())
                resp.raise_for_status()
                target.model = resp.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise RuntimeError(f"{target.name}: GET {target.url}/models failed: {exc!r}") from exc
        messages = [{"role": "user", "content": _PROBE_PROMPT}]
        variants = [(ie, cu) for ie in ((True, False) if want_ignore_eos else (False,)) for cu in (True, False)]
        rejected: list[str] = []
        for ie, cu in variants:
            body = request_body(target, endpoint, messages, probe_tokens, 0.0, ignore_eos=ie, continuous_usage=cu)
            record = await stream_request(client, target, endpoint, body, timeout_s)
            if record.ok:
                target.ignore_eos, target.continuous_usage = ie, cu
                target.probe = {
                    "ignore_eos_accepted": ie, "ignore_eos_honoured": ie and record.output_tokens == probe_tokens,
                    "continuous_usage_accepted": cu, "tokens_per_chunk_exact": record.tokens_exact,
                    "usage_reported": record.usage_reported, "rejected_variants": rejected,
                }
                return
            rejected.append(f"ignore_eos={ie} continuous_usage_stats={cu}: {record.error[:120]}")
        raise RuntimeError(f"{target.name}: every probe request failed: {rejected}")


def parse_prometheus(text: str, prefix: str = "sparkserve:") -> dict[tuple[str, tuple], float]:
    """Samples whose name starts with ``prefix``: {(name, sorted labels without model_name): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
    return out


async def scrape_metrics(client: httpx.AsyncClient, target: Target) -> dict[tuple[str, tuple], float] | None:
    """The server's sparkserve metrics, None when it has no /metrics (or none of ours)."""
    try:
        resp = await client.get(target.root + "/metrics", headers=target.headers(), timeout=30)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    samples = parse_prometheus(resp.text)
    return samples or None


def metrics_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Speculation and token counters accrued between two scrapes (see server/metrics.py):
    tau = 1 + accepted / drafts (tokens per request-step), acceptance per position k =
    accepted_k / verified_k, verify budget = drafts verified per engine step (mean)."""
    if before is None or after is None:
        return None

    def d(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    p = "sparkserve:"
    drafts = d(p + "spec_decode_num_drafts_total")
    draft_tokens = d(p + "spec_decode_num_draft_tokens_total")
    accepted = d(p + "spec_decode_num_accepted_tokens_total")
    positions = sorted({dict(lab)["position"] for (n, lab) in after
                        if n == p + "spec_decode_num_verified_tokens_per_pos_total"}, key=int)
    per_pos = []
    for k in positions:
        lab = (("position", k),)
        verified = d(p + "spec_decode_num_verified_tokens_per_pos_total", lab)
        per_pos.append(d(p + "spec_decode_num_accepted_tokens_per_pos_total", lab) / verified if verified else None)
    budget_steps = d(p + "spec_decode_verify_budget_tokens_count")
    queries = d(p + "prefix_cache_queries_total")
    return {
        "generation_tokens": d(p + "generation_tokens_total"),
        "prompt_tokens": d(p + "prompt_tokens_total"),
        "num_preemptions": d(p + "num_preemptions_total"),
        "prefix_cache_hit_rate": d(p + "prefix_cache_hits_total") / queries if queries else None,
        "spec_num_drafts": drafts,
        "spec_num_draft_tokens": draft_tokens,
        "spec_num_accepted_tokens": accepted,
        "spec_accepted_length": 1.0 + accepted / drafts if drafts else None,
        "spec_acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "spec_acceptance_per_position": per_pos,
        "spec_verify_budget_mean": d(p + "spec_decode_verify_budget_tokens_sum") / budget_steps if budget_steps else None,
        "spec_drafter_runs": d(p + "spec_decode_num_drafter_runs_total"),
        "spec_drafter_skips": d(p + "spec_decode_num_drafter_skips_total"),
    }


def launch_servers(specs: list[tuple[str, str]], ready_timeout_s: float = 900.0,
                   python: str = sys.executable, ports: list[int] | None = None,
                   parallel: bool = False, program: list[str] | None = None,
                   env: dict[str, str] | None = None) -> list[ServerProcess]:
    """Start ``python -m sparkserve serve --host 127.0.0.1 --port P FLAGS`` for every (name, FLAGS),
    each on a free port (or ``ports[i]``), and wait until every /ready answers 200. One after the
    other by default (a server's start-up, which may measure its throughput profile, then has the
    machine to itself); ``parallel`` starts them all at once (faster, e.g. in tests). All stay up
    together, so the bench can alternate between them. ``program`` replaces ``python -m sparkserve``
    (e.g. another install's ``sparkserve`` executable, run with this environment as it is: no checkout
    put first on ``PYTHONPATH``), ``env`` is added to the children's environment. Each child logs to a
    temporary file (``ServerProcess.log_path``). Started, waited for and stopped by
    :mod:`sparkserve.server.launch`, the one launcher.

    Raises:
        LaunchError: a server exited or did not become ready in time (all are stopped, the error
            carries its log's tail).
    """
    servers: list[ServerProcess] = []
    try:
        for i, (name, flags) in enumerate(specs):
            port = ports[i] if ports else free_port()
            with tempfile.NamedTemporaryFile(prefix=f"sparkserve-bench-{name}-", suffix=".log", delete=False) as log:
                log_path = Path(log.name)
            cmd = [*(program or [python, "-m", "sparkserve"]), "serve", "--host", LOCALHOST,
                   "--port", str(port), "--drain-timeout", "5", *shlex.split(flags)]
            child_env = {**(_child_env() if program is None else os.environ), **(env or {})}
            servers.append(spawn(name, cmd, f"http://{LOCALHOST}:{port}", env=child_env, log_path=log_path))
            if not parallel:
                wait_ready(servers[-1:], ready_timeout_s, interval_s=0.5)
        if parallel:
            wait_ready(servers, ready_timeout_s, interval_s=0.5)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def _child_env() -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH (so ``sparkserve`` is the code the
    bench came from, not another installed copy)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def stop_servers(servers: list[ServerProcess], timeout_s: float = 30.0) -> None:
    """Stop every launched server (SIGTERM to all first, SIGKILL to any alive after ``timeout_s``)."""
    stop_all(servers, timeout_s)


def run_sync(coro):
    """``asyncio.run`` (kept in one place for the CLI and the thin wrappers)."""
    return asyncio.run(coro)
