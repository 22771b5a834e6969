"""One engine-step benchmark on several git revisions, alternating, with paired ratios: a before / after
check of a change that must not slow the engine (issue 27: "within 3 %").

    python -m sparkserve.benchmarks.bench_revisions --rev before=c689a9b --rev after=HEAD \\
        --rounds 4 --batch 1 16 --configs none --out bench_results/layers2_step_before_after.json

    # the same in pieces (each under the bench lock), then pooled:
    ... --work-dir /tmp/revs --rounds 2 --out piece0.json
    ... --work-dir /tmp/revs --rounds 2 --first-round 2 --out piece1.json
    python -m sparkserve.benchmarks.bench_revisions --merge piece0.json piece1.json --out pooled.json

Each revision is exported with ``git archive`` into a temporary folder and run as its own process with
that folder as its working directory and first on ``PYTHONPATH`` (``python -m`` puts the working directory
ahead of ``PYTHONPATH``: elsewhere a checkout's own ``sparkserve/`` would win). Its ``sparkserve/__init__.py``
then maps ``sparkserve.engine`` to the folder's ``engine/``, which each child reports back. The same
virtual environment serves every revision; each has its own
``XDG_CACHE_HOME`` (revisions keep their own CPU plan and kernel caches). Each revision runs its own
copy of ``bench_step_breakdown`` (``benchmarks/`` or, in older trees, ``loadtests/``), whose timers wrap
seams every version has: engine step tok/s = batch / median ``EngineCore.step`` wall time over steady
decode steps (greedy, ``ignore_eos``).

Order: one unmeasured warm-up process per revision (fills its caches; skipped when ``--work-dir`` already
holds the revision), then ``--rounds`` rounds numbered from ``--first-round``, the revisions in order on
even rounds and reversed on odd ones (ABBA), so slow drift on a shared machine hits both sides alike. The summary per (config, batch): every revision's tok/s per round, the ratio of
each revision's median to the first revision's, and the per-round paired ratio (the two processes of a
round ran back to back) with its median, minimum and maximum: the spread says what the run can resolve.

Raises:
    SystemExit: a revision's child failed (its stderr's tail is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from sparkserve.benchmarks.bench_step_breakdown import machine

BENCH_PATHS = ("benchmarks/bench_step_breakdown.py", "loadtests/bench_step_breakdown.py")
"""Where a revision keeps the step bench (it moved to benchmarks/ in issue 27)."""


def export(commit: str, repo: Path, into: Path) -> Path:
    """``git archive`` of ``commit`` (a full hash) extracted into ``into / commit[:12]``."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True).stdout
    folder = into / commit[:12]
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def bench_module(tree: Path) -> str:
    """The step bench's module name in ``tree``."""
    for path in BENCH_PATHS:
        if (tree / path).is_file():
            return "sparkserve." + path.removesuffix(".py").replace("/", ".")
    raise FileNotFoundError(f"no step bench in {tree} (looked for {BENCH_PATHS})")


def child_env(tree: Path, cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one, the tree first on ``PYTHONPATH``, its cache, and ``extra`` (``--env``)."""
    return {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(cache), "PYTHONDONTWRITEBYTECODE": "1",
            **(extra or {})}


def parse_env(items: list[str], labels: list[str]) -> dict[str, dict[str, str]]:
    """``--env LABEL:NAME=VALUE`` items -> {label: {name: value}}; SystemExit on an unknown label or bad item."""
    env: dict[str, dict[str, str]] = {label: {} for label in labels}
    for item in items:
        label, _, assignment = item.partition(":")
        name, eq, value = assignment.partition("=")
        if label not in env or not name or not eq:
            sys.exit(f"--env {item!r}: expected LABEL:NAME=VALUE with LABEL one of {labels}")
        env[label][name] = value
    return env


def engine_origin(tree: Path, cache: Path) -> str:
    """Where ``sparkserve.engine`` is imported from with ``tree`` on the path (must be inside ``tree``)."""
    code = "import sparkserve.engine as e; print(e.__file__)"
    return subprocess.run([sys.executable, "-c", code], env=child_env(tree, cache), cwd=tree, check=True,
                          capture_output=True, text=True).stdout.strip()


def run_once(tree: Path, cache: Path, bench_args: list[str], label: str, timeout_s: float,
             extra_env: dict[str, str] | None = None) -> list[dict]:
    """One process of the step bench in ``tree`` (with ``extra_env``); returns its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [sys.executable, "-m", bench_module(tree), *bench_args, "--label", label, "--out", str(out)]
        done = subprocess.run(argv, env=child_env(tree, cache, extra_env), cwd=tree, capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            sys.exit(f"{label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())["results"]


def summarize(processes: list[dict], labels: list[str]) -> list[dict]:
    """Per (config, batch): tok/s per label and round, median ratios to ``labels[0]``, paired ratios."""
    cells = sorted({(r["config"], r["batch"]) for p in processes for r in p["rows"]})
    summary = []
    for config, batch in cells:
        per_label: dict[str, dict[int, float]] = {label: {} for label in labels}
        for p in processes:
            if p["round"] is None:
                continue
            for r in p["rows"]:
                if (r["config"], r["batch"]) == (config, batch):
                    per_label[p["label"]][p["round"]] = batch * 1000.0 / r["total"]
        base = per_label[labels[0]]
        cell: dict = {"config": config, "batch": batch,
                      "tok_per_s": {label: [round(v, 2) for _, v in sorted(rounds.items())]
                                    for label, rounds in per_label.items()}}
        for label in labels[1:]:
            rounds = sorted(set(base) & set(per_label[label]))
            paired = [per_label[label][k] / base[k] for k in rounds]
            if not paired:  # no round with both sides yet (warm-up only, or a cut-off piece)
                cell[f"{label}_over_{labels[0]}"] = None
                continue
            cell[f"{label}_over_{labels[0]}"] = {
                "ratio_of_medians": round(statistics.median(per_label[label].values())
                                          / statistics.median(base.values()), 4),
                "paired_median": round(statistics.median(paired), 4),
                "paired_min": round(min(paired), 4), "paired_max": round(max(paired), 4),
                "paired": [round(x, 4) for x in paired]}
        summary.append(cell)
    return summary


def prepare(revs: list[tuple[str, str]], repo: Path, work: Path) -> tuple[dict, dict, dict, list[str]]:
    """Export every revision under ``work`` (kept when already there) with its cache folder; returns the
    trees, full commits and engine origins by label, and the labels whose tree is new (to warm up)."""
    trees, commits, origins, fresh = {}, {}, {}, []
    for label, rev in revs:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", rev], check=True, capture_output=True,
                                text=True).stdout.strip()
        if not (work / commit[:12]).is_dir():
            export(commit, repo, work)
            fresh.append(label)
        trees[label], commits[label] = work / commit[:12], commit
        cache = work / f"cache-{commit[:12]}"
        cache.mkdir(exist_ok=True)
        origins[label] = engine_origin(trees[label], cache)
        if not origins[label].startswith(str(trees[label])):
            sys.exit(f"{label}: sparkserve.engine came from {origins[label]}, not {trees[label]}")
    return trees, commits, origins, fresh


def merge(paths: list[Path], exclude_rounds: frozenset[int] = frozenset()) -> dict:
    """Pool the processes of several runs (pieces of one comparison: same revisions and bench arguments);
    the rounds in ``exclude_rounds`` count as warm-up (kept in the processes with ``round`` None and
    ``excluded_round`` set, left out of the summary)."""
    docs = [json.loads(p.read_text()) for p in paths]
    labels = list(docs[0]["revisions"])
    if any(list(d["revisions"]) != labels or d["bench_args"] != docs[0]["bench_args"] for d in docs):
        sys.exit("the pieces compare different revisions or bench arguments")
    processes = [p for d in docs for p in d["processes"]]
    for p in processes:
        if p["round"] in exclude_rounds:
            p["excluded_round"], p["round"] = p["round"], None
    return {**docs[0], "command": [d["command"] for d in docs], "pieces": [str(p) for p in paths],
            "excluded_rounds": sorted(exclude_rounds),
            "machine": [d["machine"] for d in docs], "load_avg_during": [d["load_avg_during"] for d in docs],
            "seconds": sum(d["seconds"] for d in docs), "summary": summarize(processes, labels),
            "processes": processes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", default=[], metavar="LABEL=REV",
                        help="a labelled git revision (repeat; the first is the baseline of the ratios)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--first-round", type=int, default=0, help="number of this piece's first round")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the exported trees and their caches here between pieces (default: a temporary one)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="pool these runs' JSON into --out")
    parser.add_argument("--exclude-round", type=int, action="append", default=[],
                        help="with --merge: a round to count as warm-up (e.g. one that ran with cold caches)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=["none"])
    parser.add_argument("--env", action="append", default=[], metavar="LABEL:NAME=VALUE",
                        help="an environment variable for one revision's processes (repeat; e.g. the same commit "
                             "twice, once with SPARKSERVE_FUSED_STEP=0)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per child process")
    parser.add_argument("--repo", type=Path, default=Path.cwd())
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)
    if ns.merge:
        doc = merge(ns.merge, frozenset(ns.exclude_round))
        ns.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc["summary"], indent=1))
        return
    if len(ns.rev) < 2:
        parser.error("two --rev at least")
    revs = [tuple(item.split("=", 1)) for item in ns.rev]
    labels = [label for label, _ in revs]
    envs = parse_env(ns.env, labels)
    bench_args = ["--batch", *map(str, ns.batch), "--configs", *ns.configs, "--max-tokens", str(ns.max_tokens)]
    started, load = time.time(), [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        work = ns.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trees, commits, origins, fresh = prepare(revs, ns.repo, work)
        processes = []
        schedule = [(None, label) for label in fresh]  # warm-up, unmeasured
        for k in range(ns.first_round, ns.first_round + ns.rounds):
            schedule += [(k, label) for label in (labels if k % 2 == 0 else labels[::-1])]
        for k, label in schedule:
            cache = work / f"cache-{commits[label][:12]}"
            rows = run_once(trees[label], cache, bench_args, label, ns.timeout_s, envs[label])
            processes.append({"round": k, "label": label, "rows": rows, "load_avg": os.getloadavg()})
            load.append(os.getloadavg())
            print(json.dumps({"round": k, "label": label,
                              "tok_per_s": {f"{r['config']}@{r['batch']}": round(r['batch'] * 1000 / r['total'], 2)
                                            for r in rows}}), flush=True)
            doc = {"benchmark": "engine step tok/s on several revisions, alternating (bench_revisions)",
                   "command": " ".join([sys.executable, "-m", "sparkserve.benchmarks.bench_revisions",
                                        *(argv or sys.argv[1:])]),
                   "revisions": {label: {"rev": rev, "commit": commits[label], "engine_from": origins[label],
                                         "env": envs[label]} for label, rev in revs},
                   "bench_args": bench_args, "machine": machine(), "load_avg_during": load,
                   "seconds": round(time.time() - started, 1), "summary": summarize(processes, labels),
                   "processes": processes}
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            ns.out.write_text(json.dumps(doc, indent=1) + "\n")  # after every process: a cut-off run keeps its rows
    print(json.dumps(doc["summary"], indent=1))

if __name__ == "__main__":
    main()
