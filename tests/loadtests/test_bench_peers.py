"""The peer comparison's cell driver (``loadtests/bench_peers.py``) and the pool's ``skip``: pure
functions on injected figures, no server."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sparkserve.loadtests.bench.cli import add_arguments
from sparkserve.loadtests.bench.workload import PromptPool
from sparkserve.loadtests.bench_peers import (
    GRID,
    WARMUP,
    bench_argv,
    cell_for,
    goal_ratios,
    prompts_before,
    summarize_cells,
    tree_rss_mib,
)

TARGETS = ["default=http://a", "none=http://b", "llama=http://c", "vllm=http://d"]


def _figures(agg: float, user: float) -> dict:
    return {"output_throughput": agg, "per_user_median": user}


def test_pool_skip_passes_over_the_first_conversations() -> None:
    full = PromptPool("random", max_tokens=8, seed=3, random_input_len=20).take(7)
    pool = PromptPool("random", max_tokens=8, seed=3, random_input_len=20, skip=4)
    rest = pool.take(3)
    assert [c.turns for c in rest] == [c.turns for c in full[4:]]
    assert pool.handed_out == 3 and pool.reused == 0
    with pytest.raises(ValueError):
        PromptPool("random", max_tokens=8, skip=-1)


def test_cells_of_a_round_take_disjoint_prompts() -> None:
    spans, start = [], 0
    for cell in GRID:
        assert prompts_before(cell.concurrency) == start
        spans.append(range(start, start + WARMUP + cell.num_prompts))
        start = spans[-1].stop
    assert all(a.stop <= b.start for a, b in zip(spans, spans[1:], strict=False))
    with pytest.raises(KeyError):
        cell_for(2)


@pytest.mark.parametrize("round_", [0, 1])
def test_bench_argv_parses_and_alternates_order(round_: int, tmp_path: Path) -> None:
    cell = cell_for(16)
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(bench_argv(cell, round_, TARGETS, tmp_path / "x.json"))
    assert ns.target == (TARGETS if round_ == 0 else TARGETS[::-1])
    assert ns.max_concurrency == [16] and ns.num_prompts * ns.repetitions == cell.num_prompts
    assert ns.skip_prompts == prompts_before(16) and ns.seed == round_ and ns.temperature == 0.0
    assert ns.max_tokens == 128 and ns.warmup == WARMUP and ns.no_plots


def test_goal_ratios_from_injected_figures() -> None:
    per_target = {
        1: {"default": _figures(90, 95), "none": _figures(80, 84), "llama": _figures(100, 105), "vllm": _figures(30, 31)},
        64: {"default": _figures(300, 5), "none": _figures(330, 5), "llama": _figures(100, 1.5), "vllm": _figures(120, 2)},
    }
    goals = goal_ratios({c: [f] for c, f in per_target.items()})
    assert goals["c1_per_user"]["none/llama"] == pytest.approx(0.8)
    assert goals["c1_per_user"]["default/llama"] == pytest.approx(95 / 105)
    assert goals["c64_aggregate"]["none/llama"] == pytest.approx(3.3)
    assert goals["c64_aggregate"]["default/vllm"] == pytest.approx(2.5)
    assert goals["aggregate_by_c"]["none"]["non_decreasing"]
    per_target[64]["none"] = _figures(79, 1)  # falls from c = 1 to 64
    per_target[64].pop("vllm")  # a peer that did not serve
    goals = goal_ratios({c: [f] for c, f in per_target.items()})
    assert not goals["aggregate_by_c"]["none"]["non_decreasing"]
    assert goals["c64_aggregate"]["none/vllm"] is None and goals["c64_aggregate"]["default/vllm"] is None


def test_goal_ratios_take_each_pair_from_one_run() -> None:
    # c = 64 split into two parts that share "none": each ratio comes from the part that served both
    parts = {64: [{"default": _figures(300, 5), "none": _figures(330, 5), "llama": _figures(100, 1.5)},
                  {"none": _figures(200, 3), "vllm": _figures(50, 1)}]}
    c64 = goal_ratios(parts)["c64_aggregate"]
    assert c64["none/llama"] == pytest.approx(3.3) and c64["none/vllm"] == pytest.approx(4.0)
    assert c64["default/vllm"] is None  # never served beside vLLM
    assert goal_ratios(parts)["aggregate_by_c"]["none"]["values"] == {64: 330}


def _doc(c: int, round_: int, agg: dict[str, float]) -> dict:
    metrics = {name: {"output_throughput": v, "per_user_tokens_per_s": {"median": v / c}, "ttft_ms": {"median": 1.0},
                      "tpot_ms": {"median": 2.0}, "completed": c, "failed": 0} for name, v in agg.items()}
    return {"machine": {"load_avg_1_5_15": [1.0, 1.0, 1.0], "time_utc": "t", "git_commit": "g"},
            "config": {"max_tokens": 128},
            "levels": [{"target": n, "metrics": m} for n, m in metrics.items()],
            "peers_cell": {"concurrency": c, "round": round_, "load_avg_before": [2.0, 2.0, 2.0], "wall_s": 9.0,
                           "rss_mib_after": {"none": 500.0}}}


def test_summary_pools_cells_by_round() -> None:
    docs = [_doc(64, 0, {"none": 300.0, "llama": 100.0}), _doc(1, 0, {"none": 80.0, "llama": 100.0}),
            _doc(1, 1, {"none": 70.0, "llama": 100.0})]
    out = summarize_cells(docs)
    assert sorted(out["rounds"]) == [0, 1]
    r0 = out["rounds"][0]
    assert [c["concurrency"] for c in r0["cells"]] == [1, 64]
    assert r0["goals"]["c1_per_user"]["none/llama"] == pytest.approx(0.8)
    assert r0["goals"]["c64_aggregate"]["none/llama"] == pytest.approx(3.0)
    assert out["rounds"][1]["goals"]["c1_per_user"]["none/llama"] == pytest.approx(0.7)
    assert out["rounds"][1]["goals"]["c64_aggregate"]["none/llama"] is None


def test_tree_rss_counts_this_process() -> None:
    import os

    rss = tree_rss_mib(os.getpid())
    assert rss is not None and rss > 10
    assert tree_rss_mib(2**22 + 12345) is None
