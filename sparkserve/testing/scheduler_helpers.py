"""Builders and a fake step loop shared by the scheduler tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.outputs import (
    DraftProposal,
    EngineCoreOutput,
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from sparkserve.scheduler.request import Request
from sparkserve.scheduler.request_rules import token_slice
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.scheduler.speculation import VerifyContext

EOS = 2


def make_config(**overrides: object) -> SchedulerConfig:
    values: dict[str, object] = dict(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4, num_kv_blocks=64
    )
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def make_request(rid: str, prompt_len: int = 4, max_tokens: int = 16, **params: object) -> Request:
    """A request whose prompt is ``100, 101, ...`` and whose EOS is ``EOS``."""
    prompt = [100 + i for i in range(prompt_len)]
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(rid, prompt, sampling_params, eos_token_id=EOS)


def run_step(
    sched: Scheduler,
    sampled: dict[str, list[int]] | None = None,
    drafts: dict[str, DraftProposal] | None = None,
    default_token: int = 7,
    on_schedule=None,
) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """schedule -> fake runner (one ``default_token`` per sampling seq unless given) -> update.
    ``on_schedule(out)`` runs between schedule and update (to look at the plan's requests)."""
    out = sched.schedule()
    if on_schedule is not None:
        on_schedule(out)
    sampled = dict(sampled or {})
    for seq in out.seqs:
        if seq.sample:
            sampled.setdefault(seq.request_id, [default_token])
    runner = RunnerOutput(sampled_token_ids=sampled, drafts=dict(drafts or {}))
    return out, sched.update_from_output(out, runner).outputs


def seq_of(out: SchedulerOutput, rid: str) -> ScheduledSeq:
    return next(seq for seq in out.seqs if seq.request_id == rid)


def prefill_with_drafts(sched: Scheduler, rid: str, drafts: tuple[int, ...]) -> None:
    """One step in which ``rid`` samples token 10 and receives ``drafts`` for the next step."""
    run_step(sched, sampled={rid: [10]}, drafts={rid: DraftProposal(drafts, (0.5,) * len(drafts))})


def seq_tokens(request: Request, seq: ScheduledSeq) -> tuple[int, ...]:
    """The tokens ``seq`` feeds the target: known tokens from the request, then the drafts."""
    return token_slice(request, seq.start_pos, seq.start_pos + seq.num_known_tokens) + seq.spec_token_ids


class TableMirror:
    """Block tables as the runner rebuilds them from the schedule's diffs (``new_block_ids``)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for rid in (*out.finished_request_ids, *out.preempted_request_ids):
            self.tables.pop(rid, None)
        for seq in out.seqs:
            if seq.new_request is not None:
                self.tables[seq.request_id] = []
            table = self.tables[seq.request_id]
            kept = seq.num_blocks - len(seq.new_block_ids)
            assert 0 <= kept <= len(table), (seq, table)
            self.tables[seq.request_id] = table[:kept] + list(seq.new_block_ids)


@dataclass
class ScriptedSpeculation:
    """A ``Speculation`` collaborator from plain functions, recording what the scheduler tells it.

    Attributes:
        lengths: ``(requests, budget_left, context) -> l_r per request``; None verifies every draft.
        gate: ``(requests, context) -> draft?`` per request; None lets everyone draft.
        verified: every ``on_verified`` call as ``(request_id, confidences, l_r, accepted)``.
        finished: every ``on_finished`` request id, in order.
    """

    lengths: Callable[[Sequence[Request], int, VerifyContext], Sequence[int]] | None = None
    gate: Callable[[Sequence[Request], VerifyContext], Sequence[bool]] | None = None
    verified: list[tuple[str, tuple[float, ...], int, int]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def verify_lengths(self, requests: Sequence[Request], budget_left: int, context: VerifyContext) -> Sequence[int]:
        if self.lengths is None:
            return [len(r.drafts.token_ids) for r in requests]
        return self.lengths(requests, budget_left, context)

    def select_drafting(self, requests: Sequence[Request], context: VerifyContext) -> Sequence[bool]:
        return [True] * len(requests) if self.gate is None else self.gate(requests, context)

    def drafts_after_prefill(self, num_requests: int) -> Sequence[bool]:
        return [True] * num_requests

    def on_verified(self, request: Request, confidences: tuple[float, ...], num_verified: int,
                    num_accepted: int) -> None:
        self.verified.append((request.request_id, confidences, num_verified, num_accepted))

    def on_finished(self, request_id: str) -> None:
        self.finished.append(request_id)
