"""Tensor parallelism (engine/parallel) on gloo with real worker processes: the tiny random target at
TP = 2 against TP = 1 through the real EngineCore, speculation off and on: fp32 greedy outputs identical
or parting at a near-tie (DESIGN.md section 7; the all-reduce sums in another order), seeded sampling the
same tokens; the default verify policy measures its throughput profile with every rank stepping; head
counts that do not divide fail at start-up before any process is spawned. SmolLM2 at TP = 3:
test_tensor_parallel_smollm2.py; the server's teardown: test_tensor_parallel_teardown.py."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.profile import ThroughputProfile, profile_cache_path
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.tensor_parallel import tiny_build

PROMPTS = [[2 + (7 * i + j) % 50 for j in range(5 + 3 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12, ignore_eos=True) for i in range(3)]


def _args(tp: int, speculate: bool) -> EngineArgs:
    return EngineArgs(dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=4,
                      drafter=None if speculate else "none", verify_policy="fixed:3" if speculate else None,
                      tensor_parallel_size=tp, num_threads=1)


def _generate(tp: int, speculate: bool) -> tuple[list[list[int]], list[list[int]], EngineCore]:
    core = EngineCore(_args(tp, speculate), build=functools.partial(tiny_build, speculate))
    try:
        greedy = core.generate_batch(PROMPTS, GREEDY, request_prefix="greedy")
        seeded = core.generate_batch(PROMPTS, SEEDED, request_prefix="seeded")
    finally:
        core.close()
    return greedy, seeded, core


@pytest.mark.parametrize("speculate", [False, True], ids=["spec-off", "spec-on"])
def test_tp2_matches_tp1(speculate: bool) -> None:
    reference_greedy, reference_seeded, _ = _generate(1, speculate)
    greedy, seeded, core = _generate(2, speculate)
    assert core.runner.pool.processes[0].exitcode == 0  # the worker followed every step and stopped cleanly
    model = tiny_build(False)[0].model
    for i, (out, ref) in enumerate(zip(greedy, reference_greedy, strict=True)):
        assert_same_or_near_tie(out, ref, top2_gap_fn(model, PROMPTS[i], ref), label=f"greedy prompt {i}")
    assert seeded == reference_seeded


def test_tp2_default_policy_profiles_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default verify policy (dspark) with a drafter measures SPS(B, R) at start-up: under TP = 2 the
    probe's synthetic steps run on both ranks (rank 0 alone would wait in its first all-reduce), the profile
    is cached under a key naming the TP size, the worker stays in step through the probe and the serving
    after it, and greedy output equals TP = 1's by the near-tie rule."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: the probe must run
    args = dataclasses.replace(_args(2, True), verify_policy=None)
    reference = EngineCore(_args(1, False), build=functools.partial(tiny_build, False)).generate_batch(PROMPTS, GREEDY)
    core = EngineCore(args, build=functools.partial(tiny_build, True))
    try:
        key = core.profile_key()
        greedy = core.generate_batch(PROMPTS, GREEDY, request_prefix="greedy")
    finally:
        core.close()
    assert key["device"] == "cpu+tp2"
    profile = ThroughputProfile.load(profile_cache_path(key))
    assert profile.has_draft_time and len(profile.batch_tokens) > 1  # steps and drafter forwards both timed
    assert core.runner.pool.processes[0].exitcode == 0  # followed every probe and serving step, then stopped
    model = tiny_build(False)[0].model
    for i, (out, ref) in enumerate(zip(greedy, reference, strict=True)):
        assert_same_or_near_tie(out, ref, top2_gap_fn(model, PROMPTS[i], ref), label=f"greedy prompt {i}")


def test_tp_size_must_divide_heads() -> None:
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads"):
        EngineCore(_args(3, False), build=functools.partial(tiny_build, False))


def test_cli_flag_and_refused_combinations() -> None:
    from sparkserve.cli import build_parser, engine_args_from

    parser = build_parser(include_train=False)
    assert engine_args_from(parser.parse_args(["serve", "-tp", "3", "--drafter", "none"])).tensor_parallel_size == 3
    assert engine_args_from(parser.parse_args(["serve"])).tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineArgs(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--compile"):
        EngineArgs(tensor_parallel_size=2, compile=True, drafter="none")
    assert EngineArgs(tensor_parallel_size=2).verify_policy is None  # the default policy, profiled on every rank
