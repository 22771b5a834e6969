"""``sparkserve bench``: serving benchmark against any OpenAI-compatible server(s).

    sparkserve bench --base-url http://127.0.0.1:8000 --dataset mtbench --max-concurrency 1 4 16 64
    sparkserve bench --target llama=http://127.0.0.1:8103 --launch nospec="--drafter none" \\
        --launch default="" --max-concurrency 1 4 16 64 --num-prompts 32 --max-tokens 128

One target measures it; several (``--target NAME=URL``, ``--launch NAME=FLAGS``) are compared in
alternation within one run, with a table of ratios to the first. Metrics and their definitions:
:mod:`sparkserve.loadtests.bench.metrics` and docs/benchmarks.md. Writes ``--result-json`` (full configuration,
machine, probe results, per-level metrics, /metrics deltas) and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_RESULT = "bench_results/bench.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sparkserve bench`` flags (cheap: imports nothing heavy)."""
    g = p.add_argument_group("targets")
    g.add_argument("--base-url", default=None, help="one server, e.g. http://127.0.0.1:8000 (/v1 optional)")
    g.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                   help="a server to compare (repeatable; the first is the ratios' baseline)")
    g.add_argument("--launch", action="append", default=[], metavar="NAME=FLAGS",
                   help="start `sparkserve serve FLAGS` on a free port for the run (repeatable; '' = defaults)")
    g.add_argument("--launch-args", default="", help="flags added to every --launch server")
    g.add_argument("--launch-timeout", type=float, default=900.0, help="seconds for a launched server to be ready")
    g.add_argument("--launch-parallel", action="store_true",
                   help="start the --launch servers at once (default: one after the other, so a start-up that "
                        "measures the throughput profile has the machine to itself)")
    g.add_argument("--model", default=None, help="model id (default: each server's first /v1/models entry)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions (default: %(default)s)")
    d = p.add_argument_group("workload")
    d.add_argument("--dataset", default="mtbench",
                   help="mtbench | specbench | gsm8k | humaneval | vicuna | random, or sets joined by '+' "
                        "(records interleaved, e.g. mtbench+gsm8k)")
    d.add_argument("--category", default=None, help="Spec-Bench / MT-bench category (e.g. translation, math_reasoning)")
    d.add_argument("--multi-turn", action="store_true",
                   help="send every turn of multi-turn records (turn 2 carries turn 1's answer); chat only")
    d.add_argument("--random-input-len", type=int, default=256, help="random set: prompt tokens (about)")
    d.add_argument("--random-output-len", type=int, default=128, help="random set: max_tokens")
    d.add_argument("--random-range-ratio", type=float, default=0.0, help="random set: lengths uniform in len*(1 +- r)")
    d.add_argument("--num-prompts", type=int, default=32, help="conversations per level and repetition")
    d.add_argument("--prompts-per-concurrency", type=int, default=0,
                   help="at least this many conversations per unit of concurrency (0: off)")
    d.add_argument("--max-tokens", type=int, default=128, help="output cap per request")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--ignore-eos", choices=("auto", "on", "off"), default="auto",
                   help="auto: send ignore_eos when every target accepts it (one setting for all)")
    d.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--skip-prompts", type=int, default=0,
                   help="pass over the shuffled set's first N conversations (a grid split over several runs "
                        "with one seed: each run skips what the earlier ones sent)")
    r = p.add_argument_group("load")
    r.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="conversations per second (inf = all at once; default inf)")
    r.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of inter-arrivals (1 = Poisson)")
    r.add_argument("--max-concurrency", type=int, nargs="+", default=[0],
                   help="conversations in flight (levels; 0 = no cap)")
    r.add_argument("--warmup", type=int, default=2, help="warm-up conversations per target (not measured)")
    r.add_argument("--repetitions", type=int, default=1, help="repetitions per level (fresh prompts each)")
    r.add_argument("--request-timeout", type=float, default=600.0)
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs: ttft:MS tpot:MS e2e:MS")
    o.add_argument("--result-json", default=DEFAULT_RESULT, help="where to write the JSON (default: %(default)s)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--save-requests", action="store_true", help="keep every request's timestamps in the JSON")
    o.add_argument("--no-scrape", action="store_true", help="do not read /metrics before and after each run")
    o.add_argument("--no-progress", action="store_true")


def _parse_named(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
        out.append((name.strip(), value))
    return out


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, core count, load average, Python, and the git commit of this checkout
    (client side, without torch: :func:`sparkserve.benchmarks.bench_step_breakdown.machine` imports the engine)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0], "git_commit": commit, "hostname": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def validate(ns: argparse.Namespace) -> None:
    """Check flag combinations (ValueError with the reason)."""
    from sparkserve.loadtests.bench.metrics import parse_slos

    if not (ns.base_url or ns.target or ns.launch):
        raise ValueError("give --base-url, --target NAME=URL or --launch NAME=FLAGS")
    if ns.base_url and (ns.target or ns.launch):
        raise ValueError("--base-url is for one server; use --target NAME=URL for each when comparing")
    if ns.multi_turn and ns.endpoint != "chat":
        raise ValueError("--multi-turn needs --endpoint chat")
    if min(ns.num_prompts, ns.max_tokens, ns.repetitions) < 1 or min(ns.warmup, ns.skip_prompts) < 0:
        raise ValueError("--num-prompts, --max-tokens and --repetitions must be >= 1, --warmup and --skip-prompts >= 0")
    if any(c < 0 for c in ns.max_concurrency) or any(not r > 0 for r in ns.request_rate) or not ns.burstiness > 0:
        raise ValueError("--max-concurrency must be >= 0, --request-rate and --burstiness > 0")
    ns.slos = parse_slos(ns.goodput)
    names = [n for n, _ in _parse_named(ns.target, "--target") + _parse_named(ns.launch, "--launch")]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique: {names}")
    ns.extra = json.loads(ns.extra_body) if ns.extra_body else None


def run(ns: argparse.Namespace) -> dict:
    """Run the benchmark ``ns`` describes; returns the JSON document it writes.

    Raises:
        ValueError: bad flags; RuntimeError: a target failed its probe or a launch failed.
    """
    from sparkserve.loadtests.bench.client import (
        Target,
        launch_servers,
        normalize_url,
        probe_target,
        run_sync,
        stop_servers,
    )
    from sparkserve.loadtests.bench.runner import Level, RunSettings, run_comparison
    from sparkserve.loadtests.bench.workload import PromptPool

    validate(ns)
    targets = [Target("server", normalize_url(ns.base_url))] if ns.base_url else []
    targets += [Target(n, normalize_url(u)) for n, u in _parse_named(ns.target, "--target")]
    launch_specs = [(n, f"{flags} {ns.launch_args}".strip()) for n, flags in _parse_named(ns.launch, "--launch")]
    launched = launch_servers(launch_specs, ns.launch_timeout, parallel=ns.launch_parallel) if launch_specs else []
    try:
        flags = dict(launch_specs)
        for s in launched:
            targets.append(Target(s.name, normalize_url(s.url), launch_flags=flags[s.name]))
        for t in targets:
            t.model, t.api_key = ns.model or "", ns.api_key
        want = ns.ignore_eos != "off"
        for t in targets:
            run_sync(probe_target(t, ns.endpoint, want))
        # one setting for all: only when every server accepted ignore_eos and ran past the end of the answer
        use_ie = want and all(t.ignore_eos and t.probe.get("ignore_eos_honoured") for t in targets)
        if ns.ignore_eos == "on" and not use_ie:
            raise RuntimeError(f"--ignore-eos on, but a server rejects or ignores it: {[(t.name, t.probe) for t in targets]}")
        for t in targets:
            t.ignore_eos = use_ie
        pool = PromptPool(ns.dataset, max_tokens=ns.max_tokens, seed=ns.seed, multi_turn=ns.multi_turn,
                          category=ns.category, random_input_len=ns.random_input_len,
                          random_output_len=ns.random_output_len, random_range_ratio=ns.random_range_ratio,
                          skip=ns.skip_prompts)
        levels = [Level(rate, c or None) for rate in ns.request_rate for c in ns.max_concurrency]
        settings = RunSettings(ns.endpoint, ns.temperature, ns.request_timeout, ns.burstiness, ns.seed,
                               ns.extra, not ns.no_scrape)

        def n_for(level: Level) -> int:
            return max(ns.num_prompts, ns.prompts_per_concurrency * (level.max_concurrency or 0))

        result = run_sync(run_comparison(targets, pool, levels, n_for, ns.repetitions, ns.warmup, settings,
                                         ns.slos, progress=not ns.no_progress))
    finally:
        stop_servers(launched)
    doc = _document(ns, targets, result, pool)
    out = Path(ns.result_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default))
    print(format_report(doc))
    if not ns.no_plots:
        from sparkserve.loadtests.bench.plots import plot_all

        for path in plot_all(doc, result, out.with_suffix("")):
            print(f"wrote {path}")
    print(f"wrote {out}")
    return doc


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _clean(value: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _level_dict(level) -> dict:
    return {"request_rate": level.request_rate if math.isfinite(level.request_rate) else "inf",
            "max_concurrency": level.max_concurrency, "label": level.label()}


def ratios(levels: list[dict], baseline: str) -> list[dict]:
    """Per level, every other target's metric / the baseline's: output throughput, median per-user
    speed, median TTFT, median TPOT, p99 ITL per token (> 1 = larger than the baseline)."""
    keys = {"output_throughput": lambda m: m["output_throughput"],
            "per_user_tokens_per_s_median": lambda m: m["per_user_tokens_per_s"]["median"],
            "ttft_median": lambda m: m["ttft_ms"]["median"], "tpot_median": lambda m: m["tpot_ms"]["median"],
            "itl_per_token_p99": lambda m: m["itl_per_token_ms"]["p99"]}
    out = []
    labels = list(dict.fromkeys(x["level"]["label"] for x in levels))
    for label in labels:
        row = {x["target"]: x["metrics"] for x in levels if x["level"]["label"] == label}
        base = row.get(baseline)
        for name, m in row.items():
            if name == baseline or base is None:
                continue
            entry = {"level": label, "target": name, "baseline": baseline}
            for key, get in keys.items():
                b, v = get(base), get(m)
                entry[key] = v / b if b and math.isfinite(b) and v is not None and math.isfinite(v) else None
            out.append(entry)
    return out


def _document(ns, targets, result, pool) -> dict:
    config = {k: v for k, v in vars(ns).items() if k not in ("api_key", "func", "slos", "extra")}
    config["request_rate"] = [r if math.isfinite(r) else "inf" for r in ns.request_rate]
    runs = []
    for r in result["runs"]:
        entry = {"target": r["target"], "level": _level_dict(r["level"]), "repetition": r["repetition"],
                 "reused_prompts": r["reused_prompts"], "metrics": r["metrics"], "server_metrics": r["server_metrics"]}
        if ns.save_requests:
            entry["requests"] = [{"send_s": x.send_s, "chunk_times_s": x.chunk_times_s, "chunk_tokens": x.chunk_tokens,
                                  "end_s": x.end_s, "output_tokens": x.output_tokens, "prompt_tokens": x.prompt_tokens,
                                  "ok": x.ok, "error": x.error, "turn": x.turn} for x in r["records"]]
        runs.append(entry)
    levels = [{"target": x["target"], "level": _level_dict(x["level"]), "metrics": x["metrics"]} for x in result["levels"]]
    doc = {
        "tool": "sparkserve bench",
        "config": config,
        "machine": machine_info(),
        "targets": [{"name": t.name, "url": t.url, "model": t.model, "launch_flags": t.launch_flags,
                     "ignore_eos": t.ignore_eos, "continuous_usage_stats": t.continuous_usage, "probe": t.probe}
                    for t in targets],
        "ignore_eos": bool(targets and targets[0].ignore_eos),
        "prompts_handed_out": pool.handed_out,
        "prompts_reused": pool.reused,
        "runs": runs,
        "levels": levels,
        "ratios": ratios(levels, targets[0].name) if len(targets) > 1 else [],
    }
    return _clean(doc)


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(doc: dict) -> str:
    """Plain-text tables: one row per (level, target), then the ratios."""
    lines = [f"ignore_eos={doc['ignore_eos']}  dataset={doc['config']['dataset']}  "
             f"max_tokens={doc['config']['max_tokens']}  prompts reused={doc['prompts_reused']}",
             f"{'level':<18} {'target':<12} {'ok':>4} {'fail':>4} {'req/s':>7} {'out tok/s':>9} {'user tok/s':>10} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'ITL/tok p99':>11} {'tok/chunk':>9} {'goodput':>8}"]
    for x in doc["levels"]:
        m = x["metrics"]
        good = m.get("goodput", {}).get("request_goodput")
        lines.append(
            f"{x['level']['label']:<18} {x['target']:<12} {m['completed']:>4} {m['failed']:>4} "
            f"{_f(m['request_throughput'], 2):>7} {_f(m['output_throughput']):>9} "
            f"{_f(m['per_user_tokens_per_s']['median']):>10} {_f(m['ttft_ms']['median']):>9} "
            f"{_f(m['ttft_ms']['p99']):>9} {_f(m['tpot_ms']['median']):>9} {_f(m['itl_per_token_ms']['p99']):>11} "
            f"{_f(m['tokens_per_chunk']['mean'], 2):>9} {_f(good, 2):>8}")
    if doc["ratios"]:
        lines.append(f"ratios to {doc['ratios'][0]['baseline']} (x):")
        lines.append(f"{'level':<18} {'target':<12} {'out tok/s':>9} {'user tok/s':>10} {'TTFT p50':>9} "
                     f"{'TPOT p50':>9} {'ITL/tok p99':>11}")
        for r in doc["ratios"]:
            lines.append(f"{r['level']:<18} {r['target']:<12} {_f(r['output_throughput'], 2):>9} "
                         f"{_f(r['per_user_tokens_per_s_median'], 2):>10} {_f(r['ttft_median'], 2):>9} "
                         f"{_f(r['tpot_median'], 2):>9} {_f(r['itl_per_token_p99'], 2):>11}")
    for run_ in doc["runs"]:
        sm = run_.get("server_metrics")
        if sm and sm.get("spec_num_drafts"):
            pos = " ".join(_f(p, 2) for p in sm["spec_acceptance_per_position"])
            lines.append(f"{run_['level']['label']} {run_['target']} rep {run_['repetition']}: accepted length "
                         f"{_f(sm['spec_accepted_length'], 2)}, acceptance per position {pos}, "
                         f"verify budget/step {_f(sm['spec_verify_budget_mean'], 1)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m sparkserve.loadtests.bench`` (same flags as ``sparkserve bench``)."""
    p = argparse.ArgumentParser(prog="sparkserve bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    ns = p.parse_args(argv)
    try:
        run(ns)
    except ValueError as exc:
        p.error(str(exc))
