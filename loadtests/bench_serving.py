"""Serving benchmark: TTFT, TPOT, ITL, output tokens/s and per-request tokens/s at several concurrencies.

Runs against a live OpenAI-compatible server (``--url``) or starts ``sparkserve serve`` itself
(``--launch``), sends MT-bench first turns (../shared/data/prompts) as chat requests with
``max_tokens`` and ``ignore_eos`` so every request generates the same number of tokens, and writes
one JSON file with the full configuration and per-level results (all levels measured in one run).

Example:
    python -m loadtests.bench_serving --launch --concurrency 1 4 16 64 --num-requests 32 \
        --max-tokens 128 --out bench_results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from loadtests.prompts import load_prompts


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _one(client: AsyncOpenAI, model: str, prompt: str, args: argparse.Namespace) -> RequestResult:
    start = time.perf_counter()
    last = start
    first = None
    itl: list[float] = []
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
            temperature=args.temperature, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": args.ignore_eos},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point
        return RequestResult(ok=False, error=repr(exc))
    end = time.perf_counter()
    return RequestResult(True, (first or end) - start, end - start, tokens, itl)


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> dict:
    client = AsyncOpenAI(base_url=url, api_key=args.api_key or "none", timeout=args.request_timeout,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8)))
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p: str) -> RequestResult:
        async with sem:
            return await _one(client, model, p, args)

    warm = [guarded(prompts[i % len(prompts)]) for i in range(min(concurrency, args.warmup))]
    await asyncio.gather(*warm)
    batch = [prompts[i % len(prompts)] for i in range(args.num_requests)]
    start = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in batch))
    duration = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    per_req = [r.output_tokens / (r.e2e_s - r.ttft_s) for r in ok if r.output_tokens > 1 and r.e2e_s > r.ttft_s]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "per_request_tokens_per_s_mean": statistics.fmean(per_req) if per_req else 0.0,
        "ttft_s": {"mean": statistics.fmean([r.ttft_s for r in ok]) if ok else float("nan"),
                   "p50": _pct([r.ttft_s for r in ok], 0.5), "p99": _pct([r.ttft_s for r in ok], 0.99)},
        "tpot_s": {"mean": statistics.fmean(tpot) if tpot else float("nan"), "p50": _pct(tpot, 0.5),
                   "p99": _pct(tpot, 0.99)},
        "itl_s": {"mean": statistics.fmean(itl) if itl else float("nan"), "p50": _pct(itl, 0.5),
                  "p99": _pct(itl, 0.99)},
    }


def launch_server(port: int, server_args: list[str], timeout_s: float = 900.0) -> subprocess.Popen:
    """Start ``sparkserve serve`` on 127.0.0.1:``port`` and wait for /health (the first start with
    the load-aware policy measures the throughput profile, hence the long default timeout)."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *server_args]
    proc = subprocess.Popen(cmd, env={**os.environ})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server {server_args} exited during start-up")
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server {server_args} did not become healthy")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--launch", action="store_true", help="start `sparkserve serve` on --port")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags passed to `sparkserve serve` (must come last)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--dataset", default="mt_bench")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="bench_results/serving.json")
    args = ap.parse_args(argv)
    proc = launch_server(args.port, args.server_args) if args.launch else None
    url = args.url or f"http://127.0.0.1:{args.port}/v1"
    try:
        model = args.model or httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
        prompts = load_prompts(args.dataset)
        levels = []
        for c in args.concurrency:
            result = asyncio.run(run_level(url, model, prompts, c, args))
            print(json.dumps({k: result[k] for k in ("concurrency", "output_tokens_per_s",
                                                     "per_request_tokens_per_s_mean", "num_failed")}))
            levels.append(result)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": config, "model": model, "levels": levels}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
