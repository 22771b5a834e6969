"""bench_verify_cost's part timers: each part's time excludes its nested parts, linears and fused ops called
inside the LM head or the drafter count as those, and disabled timers record nothing."""

from __future__ import annotations

import types

from sparkserve.benchmarks import bench_verify_cost as bench


def test_parts_are_exclusive_and_nested_names(monkeypatch) -> None:
    ticks = iter(range(100))
    monkeypatch.setattr(bench, "clock", lambda: float(next(ticks)))
    parts = bench.Parts()
    ops = types.SimpleNamespace(linear=lambda: None)
    parts.wrap(ops, "linear", bench._nested("linears"))
    ops.head = lambda: ops.linear()
    parts.wrap(ops, "head", "lm_head")
    ops.step = lambda: (ops.linear(), ops.head())
    parts.wrap(ops, "step", "step_other")
    ops.step()  # no timer: nothing recorded, no tick read
    assert parts.totals == {}
    parts.enabled = True
    ops.step()
    # ticks: step 0, linear 1-2, head 3, its linear 4-5, head ends 6, step ends 7
    assert dict(parts.totals) == {"linears": 1.0, "lm_head": 3.0, "step_other": 3.0}
    assert sum(parts.totals.values()) == 7.0 and parts.stack == []


def test_drafter_parts_claim_their_nested_ops() -> None:
    name = bench._nested("norms_silu")
    assert name(["step_other", "forward_other"]) == "norms_silu"
    assert name(["step_other", "drafter_forward", "drafter_backbone"]) == "drafter_backbone"
    assert name(["runner_other", "lm_head"]) == "lm_head"
