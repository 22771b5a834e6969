"""The served comparison with the peers (issue 22), one concurrency cell per invocation.

sparkserve (default and ``--drafter none``), llama.cpp's ``llama-server`` and vLLM's CPU build serve
the same model and stay up for the whole grid (../shared/peer/README.md starts the peers); each cell
is one ``sparkserve bench`` run over all of them in alternation, short enough for one turn of the
shared bench lock:

    flock /tmp/sparkserve-bench.lock .venv/bin/python -m sparkserve.loadtests.bench_peers cell 64 \\
        --target default=http://127.0.0.1:8201 --target none=http://127.0.0.1:8202 \\
        --target llama=http://127.0.0.1:8203 --target vllm=http://127.0.0.1:8204 \\
        --pid default=PID --pid none=PID --pid llama=PID --pid vllm=PID --out-dir bench_results/peers_stop24
    .venv/bin/python -m sparkserve.loadtests.bench_peers summary bench_results/peers_stop24/c*.json \\
        --out bench_results/peers_stop24.json

A cell writes the bench's JSON plus the load average before the run and each server's resident
memory (its process tree, MiB) after it. Every cell of a round skips the prompts the earlier cells
sent (one seed, ``--skip-prompts``), so no server's prefix cache sees a prompt twice within a round;
round r > 0 (a repeat) draws with seed r and runs the targets in reverse order. ``summary`` pools
the cells into the ratios the issue's goals name (:func:`goal_ratios`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sparkserve.loadtests.bench.cli import add_arguments, run


@dataclass(frozen=True)
class Cell:
    """One point of the grid: ``concurrency`` conversations in flight, ``num_prompts`` per target
    split over ``repetitions`` (each repetition alternates the targets' order: A B, then B A)."""

    concurrency: int
    num_prompts: int
    repetitions: int


# The grid: 4 / 8 / 32 / 64 prompts at c = 1 / 4 / 16 / 64. c = 64 keeps one repetition (two of 32
# prompts would never have 64 in flight); its order alternates between rounds instead.
GRID = (Cell(1, 4, 2), Cell(4, 8, 2), Cell(16, 32, 2), Cell(64, 64, 1))
WARMUP = 2  # conversations per target before a cell (not measured)
SPARKSERVE = ("default", "none")  # target names of the sparkserve servers
PEERS = ("llama", "vllm")


def cell_for(concurrency: int) -> Cell:
    """The grid's cell at ``concurrency`` (KeyError for one the grid lacks)."""
    for cell in GRID:
        if cell.concurrency == concurrency:
            return cell
    raise KeyError(f"no cell at c = {concurrency}; the grid has {[c.concurrency for c in GRID]}")


def prompts_before(concurrency: int) -> int:
    """Conversations the round's earlier cells take from the pool (their warm-up and measured prompts)."""
    total = 0
    for cell in GRID:
        if cell.concurrency == concurrency:
            return total
        total += WARMUP + cell.num_prompts
    raise KeyError(f"no cell at c = {concurrency}")


def tree_rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` and all its descendants (MiB, from /proc), None when it is gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total_kib, stack, seen = 0, [pid], False
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        seen = True
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        stack.extend(children.get(p, []))
    return total_kib / 1024 if seen else None


def bench_argv(cell: Cell, round_: int, targets: list[str], out: Path, *, dataset: str = "mtbench+gsm8k",
               max_tokens: int = 128) -> list[str]:
    """``sparkserve bench`` flags for ``cell`` in round ``round_`` over ``targets`` (NAME=URL): fresh
    prompts after the round's earlier cells, seed ``round_``, the targets' order reversed in odd rounds."""
    order = targets if round_ % 2 == 0 else targets[::-1]
    argv = [x for t in order for x in ("--target", t)]
    return argv + ["--dataset", dataset, "--max-concurrency", str(cell.concurrency),
                   "--num-prompts", str(cell.num_prompts // cell.repetitions), "--repetitions", str(cell.repetitions),
                   "--max-tokens", str(max_tokens), "--temperature", "0", "--warmup", str(WARMUP),
                   "--seed", str(round_), "--skip-prompts", str(prompts_before(cell.concurrency)),
                   "--result-json", str(out), "--no-progress", "--no-plots"]


def run_cell(ns: argparse.Namespace) -> dict:
    """Run one cell (``ns.concurrency``, ``ns.round``) over ``ns.target`` and write ``c{C}_r{R}.json``."""
    cell = cell_for(ns.concurrency)
    out = Path(ns.out_dir) / f"c{cell.concurrency}_r{ns.round}{'_' + ns.part if ns.part else ''}.json"
    targets = [t for t in ns.target if not ns.only or t.split("=", 1)[0] in ns.only]
    argv = bench_argv(cell, ns.round, targets, out, dataset=ns.dataset, max_tokens=ns.max_tokens)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    load_before, started = list(os.getloadavg()), time.time()
    doc = run(parser.parse_args(argv))
    pids = dict(item.split("=", 1) for item in ns.pid)
    doc["peers_cell"] = {"concurrency": cell.concurrency, "round": ns.round, "part": ns.part,
                         "load_avg_before": load_before,
                         "wall_s": time.time() - started,
                         "rss_mib_after": {name: tree_rss_mib(int(pid)) for name, pid in pids.items()}}
    out.write_text(json.dumps(doc, indent=2))
    print(f"c = {cell.concurrency} round {ns.round}: load {load_before[0]:.1f} -> "
          f"{doc['machine']['load_avg_1_5_15'][0]:.1f}, {doc['peers_cell']['wall_s']:.0f} s, wrote {out}")
    return doc


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Figures = dict[str, dict[str, float]]  # target name -> {"output_throughput": ..., "per_user_median": ...}


def goal_ratios(parts: dict[int, list[Figures]]) -> dict:
    """The issue's goals from one round's figures.

    Args:
        parts: concurrency -> the cell's runs (one, or several when a long cell was split into parts
            that share a sparkserve target), each target name -> {"output_throughput": aggregate output
            tok/s, "per_user_median": median per-user tok/s}; a target or cell that did not run is absent.

    Returns:
        ``c1_per_user``: none and default over llama at c = 1 (goal >= 0.8); ``c64_aggregate``: default
        and none over llama and over vLLM at c = 64 (goal >= 3); each ratio from one run that served
        both (alternated), None when no run did. ``aggregate_by_c``: each target's aggregate over the
        concurrencies (its first run at each) and whether it never falls (``non_decreasing``).
    """
    def pair(c: int, a: str, b: str, key: str) -> float | None:
        both = next((f for f in parts.get(c, []) if a in f and b in f), None)
        return None if both is None else _ratio(both[a].get(key), both[b].get(key))

    def first(c: int, name: str) -> float | None:
        return next((f[name]["output_throughput"] for f in parts.get(c, []) if name in f), None)

    by_c = {}
    for name in (*SPARKSERVE, *PEERS):
        series = {c: first(c, name) for c in sorted(parts)}
        values = [v for v in series.values() if v is not None]
        by_c[name] = {"values": series, "non_decreasing": all(b >= a for a, b in zip(values, values[1:], strict=False))}
    return {"c1_per_user": {f"{s}/llama": pair(1, s, "llama", "per_user_median") for s in SPARKSERVE} | {"goal": 0.8},
            "c64_aggregate": {f"{s}/{p}": pair(64, s, p, "output_throughput") for s in SPARKSERVE for p in PEERS}
            | {"goal": 3.0},
            "aggregate_by_c": by_c}


def summarize_cells(docs: list[dict]) -> dict:
    """Pool cell documents (``run_cell``'s JSON) into per-round tables and the goal ratios."""
    rounds: dict[int, dict] = {}
    for doc in docs:
        info = doc["peers_cell"]
        rnd = rounds.setdefault(info["round"], {"cells": [], "parts": {}})
        figures = {}
        for level in doc["levels"]:
            m = level["metrics"]
            figures[level["target"]] = {
                "output_throughput": m["output_throughput"], "per_user_median": m["per_user_tokens_per_s"]["median"],
                "ttft_p50_ms": m["ttft_ms"]["median"], "tpot_p50_ms": m["tpot_ms"]["median"],
                "completed": m["completed"], "failed": m["failed"]}
        rnd["parts"].setdefault(info["concurrency"], []).append((info.get("part", ""), figures))
        rnd["cells"].append({"concurrency": info["concurrency"], "part": info.get("part", ""),
                             "max_tokens": doc["config"]["max_tokens"],
                             "targets": list(figures), "load_avg_before": info["load_avg_before"],
                             "load_avg_after": doc["machine"]["load_avg_1_5_15"], "wall_s": info["wall_s"],
                             "rss_mib_after": info["rss_mib_after"], "time_utc": doc["machine"]["time_utc"],
                             "git_commit": doc["machine"]["git_commit"]})
    out = {"machine": docs[0]["machine"] if docs else None, "rounds": {}}
    for r, rnd in sorted(rounds.items()):
        parts = {c: [f for _, f in sorted(runs, key=lambda x: x[0])] for c, runs in sorted(rnd["parts"].items())}
        out["rounds"][r] = {"cells": sorted(rnd["cells"], key=lambda x: (x["concurrency"], x["part"])),
                            "per_target": {c: [f for f in runs] for c, runs in parts.items()},
                            "goals": goal_ratios(parts)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench_peers", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cell", help="run one cell of the grid over the targets, in alternation")
    c.add_argument("concurrency", type=int, choices=[x.concurrency for x in GRID])
    c.add_argument("--target", action="append", required=True, metavar="NAME=URL")
    c.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="a server's pid (memory)")
    c.add_argument("--round", type=int, default=0, help="0 first; a repeat draws with another seed, order reversed")
    c.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run these targets only (a long cell split into parts that share a sparkserve target)")
    c.add_argument("--part", default="", help="label of this part (file name suffix)")
    c.add_argument("--dataset", default="mtbench+gsm8k")
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--out-dir", default="bench_results/peers_stop24")
    s = sub.add_parser("summary", help="pool cell JSONs into the goal ratios")
    s.add_argument("cells", nargs="+")
    s.add_argument("--out", default="bench_results/peers_stop24.json")
    ns = p.parse_args(argv)
    if ns.command == "cell":
        Path(ns.out_dir).mkdir(parents=True, exist_ok=True)
        run_cell(ns)
    else:
        summary = summarize_cells([json.loads(Path(x).read_text()) for x in ns.cells])
        Path(ns.out).write_text(json.dumps(summary, indent=2))
        print(json.dumps({r: v["goals"] for r, v in summary["rounds"].items()}, indent=1))
        print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
