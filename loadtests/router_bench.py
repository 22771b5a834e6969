"""Router policies against one replica at the same total CPU, on multi-turn traffic.

    python -m sparkserve.loadtests.router_bench --num-prompts 12 --request-rate 0.5 --max-tokens 32 \\
        --rounds 1 --first-round 0 --out bench_results/router_policies_r0.json
    ... --first-round 1 --out bench_results/router_policies_r1.json     # one piece per bench-lock slot
    python -m sparkserve.loadtests.router_bench --merge bench_results/router_policies_r*.json \\
        --out bench_results/router_policies.json

Starts two ``sparkserve serve`` replicas (``--threads-per-replica 1``) that publish their KV events, the
``kv_aware`` router subscribed to them (``sparkserve replicas`` wiring), one more ``vllm-router`` per
other policy in front of the same pair, and (``--targets`` with ``single_2_threads``) one replica with two
threads (the same total CPU, no router). Each (round, target) runs ``sparkserve bench --multi-turn``
(MT-bench, Poisson arrivals at ``--request-rate``) against one target, with a fresh seed (fresh
conversations, so no run reuses another's prefixes); targets alternate in order and reversed order over
rounds, because the machine may be shared. The prefix-hit rate is the change of
``prefix_cache_hits / prefix_cache_queries`` summed over the replicas behind the target, read from their
``/metrics`` around the run (warm-up included).

Writes ``--out``: the machine, the command, and per run TTFT p50 / p99 (ms), output tokens/s and the
prefix-hit rate; per target the medians over rounds, the TTFT p50 ratio of the medians to
``round_robin``'s, and the median over rounds of each round's own ratio (a round's targets ran
back to back, so that ratio is less exposed to a shared machine's drift). ``--merge`` pools the runs of
several such files (pieces run one at a time) into one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sparkserve.loadtests.bench.cli import machine_info
from sparkserve.server.launch import ServerProcess, free_port, free_port_run, spawn, stop_all, wait_ready
from sparkserve.server.replicas import ReplicaSetConfig, launch, router_argv

POLICIES = ("round_robin", "power_of_two", "cache_aware", "kv_aware")
SINGLE = "single_2_threads"
METRICS = ("ttft_p50_ms", "ttft_p99_ms", "output_tok_s", "prefix_hit_rate")
SERVE_ARGS = ("--drafter", "none")


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    """(queries, hits) of the prefix cache summed over ``urls``' ``/metrics``."""
    queries = hits = 0.0
    for url in urls:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            if family.name == "sparkserve:prefix_cache_queries":
                queries += total
            elif family.name == "sparkserve:prefix_cache_hits":
                hits += total
    return queries, hits


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that matter for the kernels (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def bench_once(name: str, url: str, seed: int, ns: argparse.Namespace, out: Path) -> dict:
    """One ``sparkserve bench`` run against ``url``; returns its pooled metrics."""
    argv = [sys.executable, "-m", "sparkserve", "bench", "--target", f"{name}={url}", "--dataset", "mtbench",
            "--multi-turn", "--num-prompts", str(ns.num_prompts), "--request-rate", str(ns.request_rate),
            "--max-tokens", str(ns.max_tokens), "--seed", str(seed), "--warmup", "1", "--no-plots",
            "--no-progress", "--no-scrape", "--result-json", str(out)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["levels"][0]["metrics"]


def summary(metrics: dict, queries: float, hits: float) -> dict:
    return {"ttft_p50_ms": metrics["ttft_ms"]["median"], "ttft_p99_ms": metrics["ttft_ms"]["p99"],
            "output_tok_s": metrics["output_throughput"], "prefix_hit_rate": hits / queries if queries else None}


def start_targets(stack: ExitStack, log_dir: Path, names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Start the replicas and routers ``names`` need; returns name -> (URL, replica URLs behind it)."""
    pair = ReplicaSetConfig(num_replicas=2, serve_args=SERVE_ARGS, policy="kv_aware", port=free_port(),
                            replica_base_port=free_port_run(2), threads_per_replica=1,
                            router_args=("--prometheus-port", str(free_port())), kv_events_base_port=free_port_run(4))
    stack.enter_context(launch(pair, log_dir))  # its router is the kv_aware target
    targets = {"kv_aware": (pair.router_url, pair.replica_urls)}
    routers: list[ServerProcess] = []
    stack.callback(stop_all, routers)
    for policy in POLICIES[:-1]:  # one more router per policy in front of the same pair
        config = ReplicaSetConfig(num_replicas=2, policy=policy, port=free_port(),
                                  replica_base_port=pair.replica_base_port,
                                  router_args=("--prometheus-port", str(free_port())))
        routers.append(spawn(f"router_{policy}", router_argv(config), config.router_url,
                             log_path=log_dir / f"router_{policy}.log"))
        targets[policy] = (config.router_url, pair.replica_urls)
    if SINGLE in names:
        single = ReplicaSetConfig(num_replicas=1, serve_args=SERVE_ARGS, policy="round_robin", port=free_port(),
                                  replica_base_port=free_port(), threads_per_replica=2,
                                  router_args=("--prometheus-port", str(free_port())))
        stack.enter_context(launch(single, log_dir))
        targets[SINGLE] = (single.replica_urls[0], single.replica_urls)
    wait_ready(routers, 60.0, path="/health")  # the policy routers: up once they see healthy workers
    return {name: targets[name] for name in names}


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the values that are not None (None when none is)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians_of(runs: list[dict]) -> dict:
    """Per target: the medians over rounds, the ratio of round_robin's median TTFT p50 to its own, and the
    median of the per-round ratios (rounds that ran round_robin)."""
    out = {name: {k: median_or_none([r[k] for r in runs if r["target"] == name]) for k in METRICS}
           for name in dict.fromkeys(r["target"] for r in runs)}
    baseline = {r["round"]: r["ttft_p50_ms"] for r in runs if r["target"] == "round_robin"}
    for name, values in out.items():
        if "round_robin" not in out:
            break
        values["ttft_p50_speedup_vs_round_robin"] = out["round_robin"]["ttft_p50_ms"] / values["ttft_p50_ms"]
        per_round = [baseline[r["round"]] / r["ttft_p50_ms"] for r in runs
                     if r["target"] == name and r["round"] in baseline]
        values["per_round_ttft_p50_speedup_median"] = statistics.median(per_round)
        values["per_round_ttft_p50_speedups"] = per_round
    return out


def merge(pieces: list[str], out: str) -> None:
    """Pool the runs of ``pieces`` (files this module wrote) into ``out``."""
    loaded = [json.loads(Path(p).read_text()) for p in pieces]
    runs = [run for piece in loaded for run in piece["runs"]]
    result = {**loaded[-1], "command": " ".join(sys.argv), "pieces": [
        {"file": p, "command": piece["command"], "machine": piece["machine"]} for p, piece in zip(pieces, loaded, strict=True)],
        "runs": runs, "medians": medians_of(runs)}
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["medians"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=12, help="conversations per run")
    parser.add_argument("--request-rate", type=float, default=0.5, help="conversations started per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--first-round", type=int, default=0,
                        help="index of the first round (its order parity and seeds), for pieces run apart")
    parser.add_argument("--targets", default=",".join(POLICIES),
                        help=f"comma-separated, of {', '.join((*POLICIES, SINGLE))} (default: the policies)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="pool these result files")
    parser.add_argument("--out", default="bench_results/router_policies.json")
    ns = parser.parse_args()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    if ns.merge:
        merge(ns.merge, ns.out)
        return
    names = ns.targets.split(",")
    runs: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        targets = start_targets(stack, Path(tmp), names)
        for round_index in range(ns.first_round, ns.first_round + ns.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for k, name in enumerate(order):
                url, replica_urls = targets[name]
                seed = 100 + 10 * round_index + k
                q0, h0 = prefix_counters(replica_urls)
                metrics = bench_once(name, url, seed, ns, Path(tmp) / "bench.json")
                q1, h1 = prefix_counters(replica_urls)
                runs.append({"target": name, "round": round_index, "seed": seed, **summary(metrics, q1 - q0, h1 - h0)})
                print(json.dumps(runs[-1]), flush=True)
                write_result(ns.out, runs)  # after every run: a piece cut short keeps what it measured
    print(json.dumps(medians_of(runs), indent=2))


def write_result(out: str, runs: list[dict]) -> None:
    result = {"machine": {**machine_info(), "cpu_flags": cpu_flags()}, "command": " ".join(sys.argv),
              "router": "vllm-router 0.1.17",
              "shared_machine_note": "2 cores shared with other jobs: timings are noisy; rounds alternate order",
              "runs": runs, "medians": medians_of(runs)}
    Path(out).write_text(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()
