"""Verification-policy benchmark: aggregate and per-user tokens/s for each policy at several
concurrencies and temperatures, all in one run, through the real HTTP server.

For each policy a fresh ``sparkserve serve`` is started (``none`` = ``--drafter none``, a plain
server; the others serve the shipped DSpark drafter with ``--verify-policy``), then every
(temperature, concurrency) cell sends the same prompts (MT-bench + GSM8K first turns) with a fixed
request count and ``max_tokens`` (``ignore_eos``), under a time limit per cell. Writes JSON with the
configuration and a PNG with both curves.

    python -m sparkserve.loadtests.bench_policies --out bench_results/policies.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import httpx

from sparkserve.loadtests.bench_serving import launch_server, run_level
from sparkserve.loadtests.prompts import load_prompts

POLICIES = ["none", "fixed:1", "fixed:3", "fixed:7", "dspark", "dspark-async"]
NO_GATE = "/no-gate"  # suffix: the same policy with the drafting gate off (``--no-draft-gate``)


def _start(policy: str, port: int, extra: list[str]):
    """A server for ``policy``; ``POLICY/no-gate`` adds ``--no-draft-gate`` (drafter runs every step)."""
    name = policy.removesuffix(NO_GATE)
    flags = ["--drafter", "none"] if name == "none" else ["--verify-policy", name]
    if policy.endswith(NO_GATE):
        flags.append("--no-draft-gate")
    return launch_server(port, ["--log-level", "warning", *flags, *extra])


async def _cell(url: str, model: str, prompts: list[str], concurrency: int, args, temperature: float) -> dict:
    ns = argparse.Namespace(**{**vars(args), "temperature": temperature, "warmup": min(2, concurrency),
                               "num_requests": max(args.min_requests, args.requests_per_slot * concurrency)})
    try:
        return await asyncio.wait_for(run_level(url, model, prompts, concurrency, ns), args.cell_timeout)
    except asyncio.TimeoutError:
        return {"concurrency": concurrency, "timed_out": True}


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in results})
    fig, axes = plt.subplots(len(temps), 2, figsize=(11, 4 * len(temps)), squeeze=False)
    for row, temp in enumerate(temps):
        for policy in dict.fromkeys(r["policy"] for r in results):
            cells = [r for r in results if r["policy"] == policy and r["temperature"] == temp and not r.get("timed_out")]
            xs = [c["concurrency"] for c in cells]
            axes[row][0].plot(xs, [c["output_tokens_per_s"] for c in cells], marker="o", label=policy)
            axes[row][1].plot(xs, [c["per_request_tokens_per_s_mean"] for c in cells], marker="o", label=policy)
        for col, title in enumerate(("aggregate output tokens/s", "per-user tokens/s")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_title(f"{title}, T={temp}")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=POLICIES,
                    help=f"policies to compare; POLICY{NO_GATE} runs it with the drafting gate off")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests per cell = this x concurrency")
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--cell-timeout", type=float, default=240.0)
    ap.add_argument("--port", type=int, default=8021)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    ap.add_argument("--out", default="bench_results/policies.json")
    args = ap.parse_args(argv)
    args.api_key, args.request_timeout, args.ignore_eos = None, 600.0, True
    prompts = [p for pair in zip(load_prompts("mt_bench"), load_prompts("gsm8k"), strict=False) for p in pair]
    results = []
    for policy in args.policies:
        proc = _start(policy, args.port, args.server_args)
        url = f"http://127.0.0.1:{args.port}/v1"
        try:
            model = httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
            for temp in args.temperatures:
                for c in args.concurrency:
                    cell = asyncio.run(_cell(url, model, prompts, c, args, temp))
                    cell.update(policy=policy, temperature=temp)
                    results.append(cell)
                    print(json.dumps({k: cell.get(k) for k in ("policy", "temperature", "concurrency",
                                      "output_tokens_per_s", "per_request_tokens_per_s_mean", "timed_out")}),
                          flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    _plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
