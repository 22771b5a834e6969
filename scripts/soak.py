"""Soak test: a mixed load on a real engine for a long time, then check nothing leaked.

Serves the embedded SmolLM2-135M (speculation on by default: the shipped DSpark drafter) on
127.0.0.1 in this process (uvicorn in a thread, so the KV block manager can be inspected), and runs
``--concurrency`` clients for ``--duration`` seconds: chat and completions, streaming and not,
sampled and greedy, some with n = 2, stop strings or logprobs; ``--disconnect-rate`` of them leave
mid-request; a few send bad requests (invalid fields: 400; an oversized body: 413). Afterwards:

* no 5xx and no request without an answer (a client timeout that was not a planned disconnect);
* within 10 s of the end: 0 running, 0 waiting (the Prometheus gauges), KV usage 0, and the block
  manager's free + used blocks == total, used == 0, its integrity check passing;
* RSS growth from the end of the warm-up (``--warmup`` s) to the end below 10% (the KV caches are
  written once before the run, so first use of a block late in the run does not count as growth).

Writes a JSON result (``--out``); exits 1 when a check fails. Not part of the test suite
(minutes of CPU); its last result is recorded in docs/hardening.md.

    python -m scripts.soak --duration 600 --concurrency 32 --out soak.json   (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import psutil

from sparkserve.testing.results import emit
from sparkserve.testing.server_harness import run_server, wait_for

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain photosynthesis in one sentence.", "Give me a tip for learning to code.", "Why is the sky blue?",
    "Translate 'good morning' into Spanish.", "Name three emoji you like: 🎉 😀 🚀", "What is 12 times 7?",
]
BAD_BODIES = [
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
    {"messages": [{"role": "user", "content": "hi"}], "target_tpot_ms": 5e-324},
    {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"²": 1}},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
    {"messages": []},
]


@dataclass
class SoakResult:
    """What the soak saw (counts by outcome, memory, the end state) and whether every check passed."""

    duration_s: float
    concurrency: int
    drafter: str
    verify_policy: str
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0
    end_state: dict[str, float] = field(default_factory=dict)
    ok: bool = False


class Client:
    """One simulated user: a loop of randomly chosen requests until the deadline."""

    def __init__(self, url: str, model: str, rng: random.Random, disconnect_rate: float, counts: Counter,
                 problems: list[str]) -> None:
        self.url, self.model, self.rng, self.disconnect_rate = url, model, rng, disconnect_rate
        self.counts, self.problems = counts, problems

    def _body(self) -> tuple[str, dict]:
        rng = self.rng
        fields: dict = {"model": self.model, "max_tokens": rng.randint(4, 48),
                        "temperature": rng.choice([0.0, 0.7, 1.0])}
        if rng.random() < 0.15:
            fields["n"] = 2
        if rng.random() < 0.2:
            fields["stop"] = [rng.choice([".", " the", "\n"])]
        if rng.random() < 0.5:
            fields["stream"] = True
            fields["stream_options"] = {"include_usage": rng.random() < 0.5}
        if rng.random() < 0.3:
            return "/v1/completions", {**fields, "prompt": rng.choice(QUESTIONS)}
        if rng.random() < 0.1:
            fields["logprobs"], fields["top_logprobs"] = True, 2
        return "/v1/chat/completions", {**fields, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}

    async def run(self, http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            roll = self.rng.random()
            try:
                if roll < 0.03:
                    await self._bad(http)
                elif roll < 0.03 + self.disconnect_rate:
                    await self._disconnect(http)
                else:
                    await self._normal(http)
            except httpx.HTTPError as exc:
                self._problem(f"no answer: {type(exc).__name__}: {exc}")

    async def _normal(self, http: httpx.AsyncClient) -> None:
        path, body = self._body()
        if body.get("stream"):
            async with http.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode()
            ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            detail = f"{json.dumps(body)[:200]} -> ...{text[-300:]}"  # the end tells how it ended
        else:
            r = await http.post(path, json=body)
            ok = r.status_code == 200 and all(c["finish_reason"] for c in r.json()["choices"])
            detail = f"{json.dumps(body)[:200]} -> {r.text[:300]}"
        self._count(r.status_code, "ok" if ok else "bad_answer", detail=None if ok else detail)

    async def _disconnect(self, http: httpx.AsyncClient) -> None:
        path, body = self._body()
        body = {**body, "stream": True, "max_tokens": 64}
        body.pop("stream_options", None)
        async with http.stream("POST", path, json=body) as r:
            lines = r.aiter_lines()
            for _ in range(self.rng.randint(1, 6)):
                if await anext(lines, None) is None:
                    break
        self.counts["disconnect"] += 1

    async def _bad(self, http: httpx.AsyncClient) -> None:
        if self.rng.random() < 0.2:
            status = await self._oversized()
            self._count(status, "rejected" if status == 413 else "bad_rejection", detail="17 MiB body")
            return
        r = await http.post("/v1/chat/completions", json={"model": self.model, **self.rng.choice(BAD_BODIES)})
        self._count(r.status_code, "rejected" if r.status_code == 400 else "bad_rejection", detail=r.text[:200])

    async def _oversized(self) -> int:
        """Announce a 17 MiB body, send 64 KiB of it, read the status line (a client library would
        fail on the early close while still uploading the rest)."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % (17 * 1024 * 1024) + b"x" * 65536)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 60)
            return int(line.split()[1])
        finally:
            writer.close()

    def _count(self, status: int, outcome: str, detail: str | None = None) -> None:
        self.counts[f"http_{status}"] += 1
        self.counts[outcome] += 1
        if status >= 500 or outcome.startswith("bad"):
            self._problem(f"{outcome} ({status}): {detail}")

    def _problem(self, message: str) -> None:
        self.counts["problem"] += 1
        if len(self.problems) < 30:
            self.problems.append(message)


async def load(url: str, model: str, concurrency: int, duration_s: float, disconnect_rate: float, seed: int,
               counts: Counter, problems: list[str]) -> None:
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        clients = [Client(url, model, random.Random(seed * 1000 + i), disconnect_rate, counts, problems)
                   for i in range(concurrency)]
        await asyncio.gather(*(c.run(http, deadline) for c in clients))


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    found = {}
    for line in text.splitlines():
        for name in wanted:
            if line.startswith(f"sparkserve:{name}{{"):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found


def _prefault_kv_caches(engine: object) -> None:
    """Write every KV cache page once, so RSS holds the whole cache from the start (the OS maps the
    zero pages of a fresh allocation lazily: blocks used for the first time late in the run would
    otherwise look like growth)."""
    runner = engine.core.runner  # type: ignore[attr-defined]
    speculator = getattr(runner, "speculator", None)
    pending = [runner.kv_caches, getattr(speculator, "kv_caches", None) or []]
    while pending:
        item = pending.pop()
        if isinstance(item, (tuple, list)):
            pending.extend(item)
        elif hasattr(item, "zero_"):
            item.zero_()


def soak(ns: argparse.Namespace) -> SoakResult:
    from sparkserve.engine.async_engine import AsyncEngine
    from sparkserve.engine.config import EngineArgs
    from sparkserve.server.metrics_glue import build_metrics

    args = EngineArgs(drafter=None if ns.drafter == "default" else ns.drafter, max_num_seqs=ns.concurrency,
                      verify_policy=None if ns.drafter == "none" else ns.verify_policy)
    engine = AsyncEngine.from_args(args)
    _prefault_kv_caches(engine)
    metrics = build_metrics(engine, args.max_num_batched_tokens)
    result = SoakResult(ns.duration, ns.concurrency, ns.drafter, ns.verify_policy)
    counts: Counter = Counter()
    process = psutil.Process()
    with run_server(engine, metrics=metrics) as server:
        model = engine.model_name
        asyncio.run(load(server.url, model, ns.concurrency, ns.warmup, ns.disconnect_rate, ns.seed, counts,
                         result.problems))
        result.rss_after_warmup_mb = process.memory_info().rss / 2**20
        asyncio.run(load(server.url, model, ns.concurrency, ns.duration - ns.warmup, ns.disconnect_rate,
                         ns.seed + 1, counts, result.problems))
        blocks = engine.core.scheduler.block_manager
        idle = wait_for(lambda: _gauges(server.url) == {"num_requests_running": 0.0, "num_requests_waiting": 0.0,
                                                        "kv_cache_usage_perc": 0.0}
                        and blocks.num_used_blocks == 0, timeout_s=10)
        blocks.check_integrity()
        result.end_state = {**_gauges(server.url), "free_blocks": blocks.num_free_blocks,
                            "used_blocks": blocks.num_used_blocks, "total_blocks": blocks.num_total_blocks}
        result.rss_end_mb = process.memory_info().rss / 2**20
    result.outcomes = dict(sorted(counts.items()))
    result.rss_growth = round(result.rss_end_mb / result.rss_after_warmup_mb - 1.0, 4)
    accounted = blocks.num_free_blocks + blocks.num_used_blocks == blocks.num_total_blocks
    result.ok = idle and accounted and counts["problem"] == 0 and result.rss_growth < 0.10
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load in all")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.10)
    parser.add_argument("--drafter", default="default", help="'default' (shipped DSpark) or 'none'")
    parser.add_argument("--verify-policy", default="dspark",
                        help="with a drafter: dspark (measures a throughput profile at start unless cached) | fixed:K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args(argv)
    if not 0 < ns.warmup < ns.duration:
        parser.error("need 0 < --warmup < --duration")
    result = soak(ns)
    emit(asdict(result), ns.out)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
