"""bench_revisions: which step bench a tree holds, the paired before / after ratios of its summary, per-revision env."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkserve.benchmarks.bench_revisions import bench_module, child_env, parse_env, summarize


def test_bench_module_finds_the_bench_where_the_revision_keeps_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bench_module(tmp_path)
    (tmp_path / "loadtests").mkdir()
    (tmp_path / "loadtests/bench_step_breakdown.py").write_text("")
    assert bench_module(tmp_path) == "sparkserve.loadtests.bench_step_breakdown"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks/bench_step_breakdown.py").write_text("")
    assert bench_module(tmp_path) == "sparkserve.benchmarks.bench_step_breakdown"


def _process(k: int | None, label: str, total_ms: float) -> dict:
    return {"round": k, "label": label, "rows": [{"config": "none", "batch": 4, "total": total_ms}]}


def test_summary_pairs_each_round_and_leaves_the_warm_up_out() -> None:
    processes = [_process(None, "before", 1.0), _process(None, "after", 1.0),  # warm-up: ignored
                 _process(0, "before", 10.0), _process(0, "after", 8.0),
                 _process(1, "after", 20.0), _process(1, "before", 20.0),
                 _process(2, "before", 10.0)]  # a round with one side only: no pair
    (cell,) = summarize(processes, ["before", "after"])
    assert cell["tok_per_s"] == {"before": [400.0, 200.0, 400.0], "after": [500.0, 200.0]}
    ratio = cell["after_over_before"]
    assert ratio["paired"] == [1.25, 1.0]
    assert (ratio["paired_min"], ratio["paired_max"], ratio["paired_median"]) == (1.0, 1.25, 1.125)
    assert ratio["ratio_of_medians"] == pytest.approx(350.0 / 400.0)


def test_summary_without_a_pair_has_no_ratio() -> None:
    (cell,) = summarize([_process(None, "before", 1.0), _process(0, "before", 10.0)], ["before", "after"])
    assert cell["after_over_before"] is None and cell["tok_per_s"] == {"before": [400.0], "after": []}


def test_merge_pools_pieces_and_can_count_a_round_as_warm_up(tmp_path: Path) -> None:
    import json

    from sparkserve.benchmarks.bench_revisions import merge

    base = {"revisions": {"before": {}, "after": {}}, "bench_args": ["--batch", "4"], "command": "c", "machine": {},
            "load_avg_during": [], "seconds": 1.0}
    pieces = [[_process(0, "before", 1.0), _process(0, "after", 1.0)],  # e.g. cold caches
              [_process(1, "after", 8.0), _process(1, "before", 10.0)]]
    for i, processes in enumerate(pieces):
        (tmp_path / f"p{i}.json").write_text(json.dumps({**base, "processes": processes}))
    paths = [tmp_path / "p0.json", tmp_path / "p1.json"]
    assert merge(paths)["summary"][0]["after_over_before"]["paired"] == [1.0, 1.25]
    doc = merge(paths, frozenset({0}))
    assert doc["summary"][0]["after_over_before"]["paired"] == [1.25]
    assert [p.get("excluded_round") for p in doc["processes"]] == [0, 0, None, None]


def test_env_applies_to_its_label_only(tmp_path: Path) -> None:
    envs = parse_env(["eager:SPARKSERVE_FUSED_STEP=0", "eager:X=a=b"], ["main", "eager"])
    assert envs == {"main": {}, "eager": {"SPARKSERVE_FUSED_STEP": "0", "X": "a=b"}}
    child = child_env(tmp_path, tmp_path / "cache", envs["eager"])
    assert child["SPARKSERVE_FUSED_STEP"] == "0" and child["PYTHONPATH"] == str(tmp_path)
    assert "X" not in child_env(tmp_path, tmp_path / "cache", envs["main"])
    for bad in ("other:A=1", "eager:A", "eager:=1"):
        with pytest.raises(SystemExit):
            parse_env([bad], ["main", "eager"])
