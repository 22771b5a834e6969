"""``sparkserve bench`` and the locust scenarios against live sparkserve processes (real model).

Two light servers are started once for the module through the bench's own launcher (the code behind
``--launch``): ``plain`` without speculation and ``spec`` with the shipped drafter and ``fixed:3``
verification (no throughput profile to measure), so the /metrics scrape sees speculation counters
and chunks carry several tokens. About 60 s on 2 cores, most of it the two start-ups.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkserve.loadtests.bench.cli import add_arguments, run
from sparkserve.loadtests.bench.client import launch_servers, stop_servers
from sparkserve.loadtests.prompts import shared_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.live_server]

_COMMON = "--num-threads 1 --max-num-seqs 8 --kv-cache-memory-gb 0.25 --log-level warning"


@pytest.fixture(scope="module")
def servers():
    from sparkserve.engine.loader import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs the model (as tests/conftest.py)
        pytest.skip(str(exc))
    if not (shared_data_dir() / "prompts").is_dir():
        pytest.skip("shared prompt data not found (SPARKSERVE_DATA)")
    launched = launch_servers([("plain", f"--drafter none {_COMMON}"), ("spec", f"--verify-policy fixed:3 {_COMMON}")],
                              ready_timeout_s=300, parallel=True)
    try:
        yield {s.name: s for s in launched}
    finally:
        stop_servers(launched)


def _bench(tmp_path: Path, *argv: str) -> tuple[dict, argparse.Namespace]:
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args([*argv, "--no-progress", "--save-requests", "--result-json", str(tmp_path / "b.json")])
    doc = run(ns)
    assert json.loads((tmp_path / "b.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    return doc, ns


def test_bench_single_target_metrics_consistent(servers, tmp_path: Path) -> None:
    max_tokens = 12
    doc, _ = _bench(tmp_path, "--base-url", servers["spec"].url, "--num-prompts", "3", "--max-concurrency", "2",
                    "--max-tokens", str(max_tokens), "--warmup", "1", "--goodput", "ttft:100000", "tpot:0.000001")
    assert doc["ignore_eos"] is True and doc["targets"][0]["probe"]["ignore_eos_honoured"]
    assert doc["targets"][0]["continuous_usage_stats"] is True
    assert doc["machine"]["cpu_count"] >= 1 and doc["config"]["max_tokens"] == max_tokens
    (run_,) = doc["runs"]
    m = run_["metrics"]
    assert (m["completed"], m["failed"]) == (3, 0)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "itl_per_token_ms", "e2e_ms", "tokens_per_chunk"):
        assert set(m[key]) >= {"mean", "median", "p90", "p99"} and m[key]["count"] > 0, key
    requests = run_["requests"]
    for r in requests:
        assert r["output_tokens"] == max_tokens  # ignore_eos: usage says max_tokens
        assert sum(r["chunk_tokens"]) == r["output_tokens"]  # per-chunk counts add up to usage
        ttft, e2e = r["chunk_times_s"][0] - r["send_s"], r["end_s"] - r["send_s"]
        assert 0 < ttft <= e2e
    assert m["total_output_tokens"] == sum(r["output_tokens"] for r in requests) == 3 * max_tokens
    assert m["tokens_per_chunk_exact"] is True
    # goodput <= throughput; a 1 ns TPOT bound is unmeetable, so no request is good
    assert m["goodput"]["request_goodput"] <= m["request_throughput"]
    assert m["goodput"]["good_requests"] == 0
    sm = run_["server_metrics"]
    assert sm["generation_tokens"] == m["total_output_tokens"]  # the server counted the same tokens
    assert sm["spec_num_drafts"] > 0 and sm["spec_accepted_length"] >= 1.0
    assert len(sm["spec_acceptance_per_position"]) > 0 and sm["spec_verify_budget_mean"] is not None
    assert (tmp_path / "b_cdf.png").stat().st_size > 0


def test_comparison_alternates_with_fresh_prompts(servers, tmp_path: Path) -> None:
    doc, _ = _bench(tmp_path, "--target", f"plain={servers['plain'].url}", "--target", f"spec={servers['spec'].url}",
                    "--num-prompts", "2", "--max-concurrency", "1", "2", "--repetitions", "2", "--max-tokens", "6",
                    "--warmup", "1", "--dataset", "gsm8k")
    order = [(r["level"]["max_concurrency"], r["repetition"], r["target"]) for r in doc["runs"]]
    # every level runs on every target before the next; the order of targets alternates
    assert order == [(1, 0, "plain"), (1, 0, "spec"), (1, 1, "spec"), (1, 1, "plain"),
                     (2, 0, "spec"), (2, 0, "plain"), (2, 1, "plain"), (2, 1, "spec")]
    assert doc["prompts_handed_out"] == 1 + 2 * 2 * 2 and doc["prompts_reused"] == 0
    assert all(t["ignore_eos"] for t in doc["targets"])  # one setting for all
    assert all(r["metrics"]["failed"] == 0 and r["metrics"]["total_output_tokens"] == 12 for r in doc["runs"])
    assert [(x["level"], x["target"]) for x in doc["ratios"]] == [("c=1,rate=inf", "spec"), ("c=2,rate=inf", "spec")]
    assert all(x["output_throughput"] > 0 for x in doc["ratios"])
    assert (tmp_path / "b_concurrency.png").stat().st_size > 0


def test_locust_headless_run(servers, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    env = {**os.environ, "SPARKSERVE_WEIGHTS": "chat=1,completions=1,disconnect=1,bad=1", "SPARKSERVE_MAX_TOKENS": "8",
           "SPARKSERVE_SHAPE": "steady", "SPARKSERVE_USERS": "4", "SPARKSERVE_DURATION": "5"}
    locustfile = Path(__file__).resolve().parents[3] / "loadtests" / "locustfile.py"
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(locustfile), "--host", servers["plain"].url,
                           "--headless", "--csv", str(prefix), "--only-summary", "--stop-timeout", "10"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for key in (("TTFT", "chat"), ("ITL", "chat"), ("POST", "chat (stream)"), ("POST", "bad request (expected 400)"),
                ("POST", "chat (disconnect after 3 chunks)")):
        assert key in rows and int(rows[key]["Request Count"]) > 0, (key, sorted(rows))
    failures = {k: int(r["Failure Count"]) for k, r in rows.items() if k[0] and int(r["Failure Count"])}
    assert failures == {}, failures
