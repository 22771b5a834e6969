"""Deprecated serving benchmark: a thin wrapper over ``sparkserve bench`` (:mod:`sparkserve.loadtests.bench`).

``main`` maps the old flags onto ``sparkserve bench`` (``--url`` -> ``--base-url``, ``--launch
--server-args FLAGS`` -> ``--launch server="FLAGS"``, ``--concurrency`` -> ``--max-concurrency``,
``--num-requests`` -> ``--num-prompts``, ``--out`` -> ``--result-json``); new work should call
``sparkserve bench`` directly. ``launch_server`` and ``run_level`` remain for
:mod:`sparkserve.loadtests.bench_policies`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess

from sparkserve.loadtests.bench.cli import add_arguments, run
from sparkserve.loadtests.bench.client import Target, launch_servers, normalize_url
from sparkserve.loadtests.bench.metrics import aggregate
from sparkserve.loadtests.bench.runner import Level, RunSettings
from sparkserve.loadtests.bench.runner import run_level as _run_level
from sparkserve.loadtests.bench.workload import Conversation


def launch_server(port: int, server_args: list[str], timeout_s: float = 900.0) -> subprocess.Popen:
    """Start ``sparkserve serve`` on 127.0.0.1:``port`` and wait for /ready (the process)."""
    return launch_servers([("server", shlex.join(server_args))], timeout_s, ports=[port])[0].proc


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> dict:
    """``args.num_requests`` chat requests (prompts cycled) at ``concurrency`` after
    ``min(concurrency, args.warmup)`` warm-up requests; the old result keys (seconds) plus
    ``metrics``, the full :func:`sparkserve.loadtests.bench.metrics.aggregate` result (ms)."""
    target = Target("server", normalize_url(url), model=model, api_key=args.api_key, ignore_eos=args.ignore_eos)
    settings = RunSettings("chat", args.temperature, args.request_timeout)
    convs = [Conversation([prompts[i % len(prompts)]], args.max_tokens) for i in range(args.num_requests)]
    warm = convs[: min(concurrency, args.warmup)]
    if warm:
        await _run_level(target, warm, Level(math.inf, concurrency), settings)
    records, duration = await _run_level(target, convs, Level(math.inf, concurrency), settings)
    m = aggregate(records, duration)

    def secs(key: str) -> dict:
        return {"mean": m[key]["mean"] / 1e3, "p50": m[key]["median"] / 1e3, "p99": m[key]["p99"] / 1e3}

    return {
        "concurrency": concurrency, "num_requests": len(records), "num_failed": m["failed"], "errors": m["errors"],
        "duration_s": duration, "output_tokens": m["total_output_tokens"], "output_tokens_per_s": m["output_throughput"],
        "per_request_tokens_per_s_mean": m["per_user_tokens_per_s"]["mean"],
        "ttft_s": secs("ttft_ms"), "tpot_s": secs("tpot_ms"), "itl_s": secs("itl_ms"), "metrics": m,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--launch", action="store_true")
    ap.add_argument("--port", type=int, default=8011, help="ignored: launched servers get a free port")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default="mt_bench")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="bench_results/serving.json")
    old = ap.parse_args(argv)
    new = ["--base-url", old.url or f"http://127.0.0.1:{old.port}"] if not old.launch else [
        "--launch", f"server={shlex.join(old.server_args)}"]
    new += ["--dataset", old.dataset.replace("_", ""), "--max-concurrency", *map(str, old.concurrency),
            "--num-prompts", str(old.num_requests), "--warmup", str(old.warmup), "--max-tokens", str(old.max_tokens),
            "--temperature", str(old.temperature), "--ignore-eos", "on" if old.ignore_eos else "off",
            "--request-timeout", str(old.request_timeout), "--result-json", old.out]
    if old.model:
        new += ["--model", old.model]
    p = argparse.ArgumentParser(prog="sparkserve bench")
    add_arguments(p)
    run(p.parse_args(new))


if __name__ == "__main__":
    main()
