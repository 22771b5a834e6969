"""The speculation guard cannot change what a request emits: it only sets verify lengths to 0 and turns
drafting off, deciding from steps already verified (``scheduler/policy/guard.py``). Tiny fp32 target."""

from __future__ import annotations

import pytest

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.spec_decode.draft_model import DraftModelDrafter
from sparkserve.scheduler.policy.guard import SpeculationGuard
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.spec_records import spec_totals
from sparkserve.testing.tiny import tiny_target

FLAT = ThroughputProfile((1, 64, 256), (1, 32), ((0.01, 0.01), (0.01, 0.01), (0.01, 0.01)), {"flat": True},
                         (0.0001, 0.0001))
"""Every draft pays on this profile: dspark verifies all of them whenever the guard lets it."""


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=0)


def _core(target, drafter=None, guard: SpeculationGuard | None = None) -> EngineCore:
    args = EngineArgs(dtype="float32", num_kv_blocks=512, block_size=4, max_num_batched_tokens=256, max_num_seqs=16,
                      drafter="none" if drafter is None else None, verify_policy="dspark")
    core = EngineCore(args, loaded=target, drafter=drafter, profile=FLAT if drafter is not None else None)
    if guard is not None:
        core.controller.guard = guard  # a guard that backs off after every short window (test only)
    return core


def _run(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams], steps: list) -> list[list[int]]:
    return core.generate_batch(prompts, params, steps=steps)


def test_guard_backing_off_and_probing_keeps_seeded_and_greedy_text(target) -> None:
    """A guard that backs off after every 2-step window (threshold 100x) flips speculation on and off
    many times in one run; seeded sampled and greedy requests still give the text of a plain engine."""
    prompts = [[2, 5, 3, 8], [4, 4, 9], [7, 1, 2, 6, 3]]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.1, seed=77, max_tokens=24, ignore_eos=True)]
    reference = _run(_core(target), prompts, params, [])
    guard = SpeculationGuard(min_window=2, max_window=2, z=0.0, threshold=100.0, backoff_steps=2,
                             max_backoff_steps=2, plain_probe_steps=1)
    core, steps = _core(target, DraftModelDrafter(target.model, 7), guard), []
    assert _run(core, prompts, params, steps) == reference
    assert guard.num_backoffs >= 3
    assert spec_totals(core, steps).num_accepted_tokens > 0  # speculation did run between back-offs
    plain_steps = [s for s in steps if s.scheduler.spec_decoding is None or not s.scheduler.spec_decoding.num_draft_tokens]
    assert any(s.scheduler.num_decode_requests and not s.scheduler.num_drafting for s in plain_steps)
