"""Scheduling of ``sparkserve bench``: arrivals, concurrency caps, levels, repetitions and the
alternation between targets.

Arrivals (as ``vllm bench serve``): with ``request_rate`` = inf every conversation is released at
once; otherwise inter-arrival gaps are Gamma(shape = burstiness, scale = 1 / (rate * burstiness)),
mean 1 / rate; burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular. ``max_concurrency``
caps conversations in flight (a semaphore), whatever the arrivals.

Comparison: for each level, each repetition takes fresh conversations from the pool and runs them on
every target, the order of targets alternating between repetitions (A B, B A, ...), before the next
level starts; so slow drift of the machine hits every target alike.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from sparkserve.loadtests.bench.client import (
    Target,
    metrics_delta,
    request_body,
    scrape_metrics,
    stream_request,
)
from sparkserve.loadtests.bench.metrics import RequestRecord, aggregate
from sparkserve.loadtests.bench.workload import Conversation, PromptPool


@dataclass(frozen=True)
class Level:
    """One load level: a request rate (conversations/s, inf = all at once) and a concurrency cap
    (None = no cap)."""

    request_rate: float
    max_concurrency: int | None

    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"c={self.max_concurrency if self.max_concurrency else 'inf'},rate={rate}"


def arrival_offsets(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Release times (s from the start) of ``n`` conversations (module docstring).

    Raises:
        ValueError: ``rate`` <= 0 or ``burstiness`` <= 0.
    """
    if not rate > 0 or not burstiness > 0:
        raise ValueError("request rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out


@dataclass
class RunSettings:
    """What every request of a run shares (one setting for all targets)."""

    endpoint: str = "chat"
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    burstiness: float = 1.0
    seed: int = 0
    extra_body: dict | None = None
    scrape: bool = True


async def run_conversation(client: httpx.AsyncClient, target: Target, conv: Conversation,
                           s: RunSettings) -> list[RequestRecord]:
    """Send the turns of ``conv`` one after the other; turn i + 1 carries the answers so far."""
    messages: list[dict[str, str]] = []
    records = []
    for turn, text in enumerate(conv.turns):
        messages.append({"role": "user", "content": text})
        body = request_body(target, s.endpoint, messages, conv.max_tokens, s.temperature, s.extra_body)
        record = await stream_request(client, target, s.endpoint, body, s.request_timeout_s)
        record.turn = turn
        records.append(record)
        if not record.ok:
            break
        messages.append({"role": "assistant", "content": record.text})
    return records


async def run_level(target: Target, conversations: list[Conversation], level: Level, s: RunSettings,
                    on_done: Callable[[], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Run ``conversations`` against ``target`` at ``level``; returns the request records and the
    duration (first release to last end, seconds)."""
    offsets = arrival_offsets(len(conversations), level.request_rate, s.burstiness, random.Random(s.seed))
    cap = level.max_concurrency or len(conversations) or 1
    limits = httpx.Limits(max_connections=cap + 4, max_keepalive_connections=cap + 4)
    sem = asyncio.Semaphore(cap)
    async with httpx.AsyncClient(limits=limits, timeout=s.request_timeout_s) as client:
        start = time.perf_counter()

        async def one(conv: Conversation, offset: float) -> list[RequestRecord]:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                records = await run_conversation(client, target, conv, s)
            if on_done is not None:
                on_done()
            return records

        groups = await asyncio.gather(*(one(c, o) for c, o in zip(conversations, offsets, strict=True)))
        records = [r for g in groups for r in g]
        end = max((r.end_s for r in records), default=start)
    return records, end - start


async def run_comparison(targets: list[Target], pool: PromptPool, levels: list[Level], num_prompts: Callable[[Level], int],
                         repetitions: int, warmup: int, s: RunSettings, slos: dict[str, float],
                         progress: bool = True) -> dict:
    """Warm every target up, then measure every level on every target in alternation (module
    docstring). Returns {"runs": [...], "levels": [...]}: one entry per (level, repetition, target)
    with its metrics and /metrics deltas, and per (level, target) the metrics of all repetitions
    pooled (durations summed)."""
    total = sum(num_prompts(lv) for lv in levels) * repetitions * len(targets)
    bar = _progress(total, progress)
    try:
        if warmup > 0:
            warm = pool.take(warmup)
            for t in targets:
                await run_level(t, warm, Level(math.inf, min(warmup, levels[0].max_concurrency or warmup)), s)
        runs = []
        async with httpx.AsyncClient() as scraper:
            for li, level in enumerate(levels):
                for rep in range(repetitions):
                    convs = pool.take(num_prompts(level))
                    order = targets if (rep + li) % 2 == 0 else targets[::-1]
                    for t in order:
                        before = await scrape_metrics(scraper, t) if s.scrape else None
                        records, duration = await run_level(t, convs, level, s, bar.update1)
                        after = await scrape_metrics(scraper, t) if s.scrape else None
                        runs.append({
                            "target": t.name, "level": level, "repetition": rep, "records": records,
                            "duration_s": duration, "reused_prompts": sum(c.reused for c in convs),
                            "metrics": aggregate(records, duration, slos),
                            "server_metrics": metrics_delta(before, after),
                        })
    finally:
        bar.close()
    pooled = []
    for level in levels:
        for t in targets:
            mine = [r for r in runs if r["level"] == level and r["target"] == t.name]
            records = [x for r in mine for x in r["records"]]
            pooled.append({"target": t.name, "level": level,
                           "metrics": aggregate(records, sum(r["duration_s"] for r in mine), slos)})
    return {"runs": runs, "levels": pooled}


class _Bar:
    def __init__(self, bar) -> None:
        self._bar = bar

    def update1(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(total: int, enabled: bool) -> _Bar:
    if not enabled:
        return _Bar(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Bar(None)
    return _Bar(tqdm(total=total, unit="conv", desc="bench"))
