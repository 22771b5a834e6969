"""A simulated serving run of the real scheduler and speculation controller on a modelled machine (no model).

The scheduler, the controller (policy, drafting gate, online profile, calibration, guard) and the step
record are the product's; only the runner is replaced: a step's wall time comes from ``SimMachine``
(true costs of plain rows, verify rows and drafter runs), a verified draft at position k is accepted with
the *true* conditional probability the draft model gives it, and the drafter states its own confidences
(possibly miscalibrated). Used by the policy tests (wrong profile, guard back-off) to compare tokens per
simulated second with speculation against plain decoding.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from sparkserve.scheduler.outputs import DraftProposal, RunnerOutput
from sparkserve.scheduler.policy.controller import SpeculationController, StepObservation
from sparkserve.scheduler.profile.grid import ThroughputProfile, smooth_monotone
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.testing.scheduler_helpers import make_config, make_request


@dataclass(frozen=True)
class SimMachine:
    """True wall time of a step, seconds: ``fixed_s + row_s * R + verify_row_s * (B - R) + draft_s * D``
    (B batch tokens, R decode requests, D requests drafted for); prefill rows are priced as verify rows."""

    fixed_s: float = 0.02
    row_s: float = 0.001
    verify_row_s: float = 0.001
    draft_s: float = 0.002

    def step_time(self, num_tokens: int, num_requests: int, num_drafting: int) -> float:
        return self.fixed_s + self.row_s * num_requests + self.verify_row_s * max(0, num_tokens - num_requests) \
            + self.draft_s * num_drafting


def machine_profile(machine: SimMachine, optimism: float = 1.0, max_tokens: int = 256,
                    max_requests: int = 64) -> ThroughputProfile:
    """The SPS(B, R) profile of ``machine`` with drafter times, its verify rows priced ``optimism`` times
    too cheap (1.0: exact). Step times include drafting for all R, as the measured profile's do."""
    batch = tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, max_tokens}))
    reqs = tuple(r for r in (1, 2, 4, 8, 16, 32, 64) if r <= max_requests)
    wrong = SimMachine(machine.fixed_s, machine.row_s, machine.verify_row_s / optimism, machine.draft_s)
    grid = [[wrong.step_time(max(b, r), r, r) for r in reqs] for b in batch]
    return ThroughputProfile(batch, reqs, smooth_monotone(grid, isotonic=False), {"sim": True},
                             tuple(machine.draft_s * r for r in reqs))


@dataclass(frozen=True)
class SimResult:
    """Totals of a simulated run: tokens emitted, simulated seconds, draft tokens verified, and the index of
    the first step that verified at least two drafts (None if none did)."""

    tokens: int
    seconds: float
    verify_tokens: int
    first_multi_verify_step: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def simulate(
    controller: SpeculationController | None,
    machine: SimMachine,
    propose: Callable[[random.Random], tuple[tuple[float, ...], tuple[float, ...]]],
    num_requests: int,
    concurrency: int,
    max_tokens: int = 64,
    gamma: int = 4,
    seed: int = 0,
) -> SimResult:
    """Serve ``num_requests`` greedy requests, ``concurrency`` at a time; ``controller`` None = plain
    decoding (no drafter). ``propose(rng) -> (stated, true)`` gives a fresh block's stated confidences
    and true conditional acceptance probabilities (gamma each)."""
    rng, clock = random.Random(seed), [0.0]
    if controller is not None:
        controller.clock = lambda: clock[0]
    config = make_config(max_num_seqs=concurrency, max_num_batched_tokens=max(256, concurrency * (gamma + 1) + 64),
                         max_model_len=max_tokens + 64, num_kv_blocks=concurrency * (max_tokens + 80) // 4 + 64,
                         num_lookahead_tokens=gamma if controller is not None else 0)
    sched = Scheduler(config, controller)
    for i in range(num_requests):
        sched.add_request(make_request(f"r{i}", prompt_len=8, max_tokens=max_tokens, temperature=0.0,
                                       ignore_eos=True))
    true_p: dict[str, tuple[float, ...]] = {}
    tokens = verify = draft_id = num_steps = 0
    first_multi: int | None = None
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sampled, drafts = {}, {}
        for seq in out.seqs:
            if not seq.sample:
                continue
            accepted = 0
            for p in true_p.get(seq.request_id, ())[: len(seq.spec_token_ids)]:
                if rng.random() >= p:
                    break
                accepted += 1
            sampled[seq.request_id] = [7] * (accepted + 1)
            if seq.draft and controller is not None:
                stated, true = propose(rng)
                draft_id += 1
                true_p[seq.request_id] = true
                drafts[seq.request_id] = DraftProposal((7,) * gamma, stated, draft_id, "dspark")
        update = sched.update_from_output(out, RunnerOutput(sampled_token_ids=sampled, drafts=drafts))
        stats = update.stats
        tokens += sum(len(o.new_token_ids) for o in update.outputs)
        spec = stats.spec_decoding
        duration = machine.step_time(stats.num_batched_tokens, stats.num_decode_requests, stats.num_drafting)
        clock[0] += duration
        if spec is not None and first_multi is None and any(d.num_draft_tokens >= 2 for d in spec.drafts):
            first_multi = num_steps
        num_steps += 1
        if controller is not None:
            verify += spec.num_draft_tokens if spec else 0
            controller.observe_step(StepObservation(
                stats.num_batched_tokens, stats.num_decode_requests, stats.num_drafting, duration,
                spec.num_draft_tokens if spec else 0, spec.num_accepted_tokens if spec else 0))
    return SimResult(tokens, clock[0], verify, first_multi)
