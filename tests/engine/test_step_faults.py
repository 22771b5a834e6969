"""A step that raises fails its requests, never the engine (engine/step_faults.py), on a tiny random
target through the real EngineCore, speculation off and on (oracle drafter): a poisoned request is
retried once alone and then failed, the innocent ones batched with it keep their exact outputs,
whether the fault is in the runner, in planning or half-way through the update; an engine whose
steps keep failing is declared broken. The same through HTTP on SmolLM2: tests/server/test_hardening_engine.py."""

from __future__ import annotations

import pytest
import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.step_faults import EngineBrokenError
from sparkserve.scheduler.isolation import ISOLATION_SAMPLES
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.tiny import OracleDrafter, tiny_target

POISON = 60  # a token only the poisoned prompt holds
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return tiny_target()


def _core(target, spec: bool) -> EngineCore:
    args = EngineArgs(dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                      drafter=None if spec else "none", verify_policy="fixed:3" if spec else None)
    return EngineCore(args, loaded=target, drafter=OracleDrafter(target, block_size=3, seed=1) if spec else None)


PROMPTS = [[2 + (7 * i + j) % 50 for j in range(5 + 3 * i)] for i in range(4)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["spec-off", "spec-on"])
def reference(request, target) -> tuple[bool, list[list[int]]]:
    return request.param, _core(target, request.param).generate_batch(PROMPTS, PARAMS, request_prefix="ref")


def _run(core: EngineCore, prompts: list[list[int]]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Run prompts to the end; returns each request's tokens and finish reason."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        request = core.make_request(rid, prompt, PARAMS)
        core.validate(request)
        core.add_request(request)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    finish: dict[str, str] = {}
    steps = 0
    while core.has_unfinished_requests() and steps < 500:
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
        steps += 1
    return tokens, finish


class Fault:
    """Raise in ``where`` whenever the step holds the request whose prompt contains POISON."""

    def __init__(self, core: EngineCore, where: str) -> None:
        self.core, self.where, self.failures = core, where, 0
        scheduler, runner = core.scheduler, core.runner
        if where == "execute":
            original = runner.execute
            runner.execute = lambda plan: (self._check([s.request_id for s in plan.seqs]), original(plan))[1]
        elif where == "schedule":  # after planning changed the scheduler's state: the plan is lost
            original_schedule = scheduler.schedule
            scheduler.schedule = lambda: self._pass(original_schedule())
        else:  # half-way through update_from_output: requests before it already got their tokens
            original_apply = scheduler._apply_sampled

            def apply(request, seq, out):
                self._check([request.request_id])
                return original_apply(request, seq, out)

            scheduler._apply_sampled = apply

    def _poisoned(self, request_id: str) -> bool:
        request = self.core.scheduler.get_request(request_id)
        return request is not None and POISON in request.prompt_token_ids

    def _check(self, request_ids: list[str]) -> None:
        if any(self._poisoned(rid) for rid in request_ids):
            self.failures += 1
            raise RuntimeError(f"injected fault in {self.where}")

    def _pass(self, plan):
        self._check([s.request_id for s in plan.seqs])
        return plan


@pytest.mark.parametrize("where", ["execute", "schedule", "update"])
def test_poisoned_request_fails_alone_innocent_outputs_exact(target, reference, where: str) -> None:
    spec, expected = reference
    core = _core(target, spec)
    fault = Fault(core, where)
    poison = [POISON, 3, 4, 5]
    prompts = PROMPTS[:2] + [poison] + PROMPTS[2:]  # the poisoned request sits in the middle of the batch
    tokens, finish = _run(core, prompts)
    assert finish["r2"] == "error" and fault.failures == 2  # retried once, alone; then failed
    innocent = [f"r{i}" for i in (0, 1, 3, 4)]
    assert [tokens[rid] for rid in innocent] == expected and all(finish[rid] == "length" for rid in innocent)
    assert core.faults.num_failed_requests == 1 and core.faults.num_consecutive_failures == 0
    assert core.scheduler.block_manager.num_free_blocks == core.num_blocks and not core.scheduler.isolated_request_ids
    core.step()  # reports the last finished ids: the runner drops their rows
    assert len(core.runner.batch) == 0


def test_isolated_requests_alternate_with_normal_steps(target) -> None:
    core = _core(target, spec=False)
    fault = Fault(core, "execute")
    tokens, finish = _run(core, [[POISON, 9], *PROMPTS])
    assert fault.failures == 2 and finish == {"r0": "error", **{f"r{i}": "length" for i in range(1, 5)}}
    assert all(len(tokens[f"r{i}"]) == MAX_TOKENS for i in range(1, 5))
    assert ISOLATION_SAMPLES >= 2  # a solo step of prefill + sample, then a decode step


def test_steps_that_keep_failing_break_the_engine(target) -> None:
    core = _core(target, spec=False)
    core.faults.max_consecutive_failures = 4

    def broken(plan):
        raise RuntimeError("broken runner")

    core.runner.execute = broken
    for i, prompt in enumerate(PROMPTS):
        core.add_request(core.make_request(f"r{i}", prompt, PARAMS))
    finished: list[str] = []
    with pytest.raises(EngineBrokenError):
        for _ in range(10):
            finished += [out.request_id for out in core.step() if out.finish_reason == "error"]
    assert finished == ["r0", "r1"]  # each failed alone in its solo step until the 4th failure in a row
