"""Continuous-batching scheduler (after vLLM v1): no prefill/decode phases.

A request's progress is one number: ``num_computed_tokens`` (positions whose KV is cached) chases
``num_tokens`` (prompt + generated) plus the drafts being verified. Each step, under one token budget
(``max_num_batched_tokens``) and at most ``max_num_seqs`` running requests:

1. Running requests, in FCFS order of arrival, get their *known* tokens
   ``all_token_ids[num_computed_tokens:num_tokens]``: one base token (the last generated token) for a
   decode request, the next prefill chunk for a request still prefilling.
2. Decode requests with drafts get ``l_r`` drafts to verify, chosen by the verification policy
   ``verify_lengths(requests, budget_left)`` and then clipped (see ``_schedule_drafts``).
3. With a drafting gate (``select_drafting``), decode requests whose next drafts are not worth
   their drafter cost are marked ``draft=False`` (the runner skips their drafter forward).
4. If nobody was preempted, waiting requests (preempted ones first, then new ones, FCFS) are admitted
   with a prefill chunk from what is left of the budget; the last chunk of a prompt samples.

KV blocks cover ``[0, start_pos + num_new_tokens)`` before a request's tokens are scheduled. When a
running request's known tokens do not fit, the most recently arrived running request is preempted
(recompute: blocks freed, ``num_computed_tokens = 0``, outputs kept, drafts dropped, front of the
waiting queue); the request itself is preempted only when it is the youngest. So the oldest request is
never preempted for a younger one and always progresses. Drafts never preempt anyone: they are clipped
to the free blocks. After a step every running request holds exactly the blocks covering
``[0, num_computed_tokens)``: the slots of rejected drafts are trimmed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.errors import RequestRejectedError
from scheduler.outputs import (
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from scheduler.request import Request, RequestStatus
from scheduler.request_rules import append_with_stop_checks, check_admissible, draft_cap, may_draft


@dataclass(frozen=True)
class VerifyContext:
    """What the verification policy knows about the step being planned.

    Attributes:
        num_scheduled_tokens: tokens already in the step (every decode base token + prefill chunks).
        num_decode_requests: running decode requests this step (with or without drafts).
        token_budget: the step's whole token budget (``max_num_batched_tokens``).
    """

    num_scheduled_tokens: int
    num_decode_requests: int
    token_budget: int


VerifyLengthsFn = Callable[[Sequence[Request], int, VerifyContext], Sequence[int]]
"""``(decode requests with drafts in FCFS order, token budget left, context) -> l_r per request``."""


DraftSelectFn = Callable[[Sequence[Request], VerifyContext], Sequence[bool]]
"""``(decode requests in FCFS order, context of the step) -> draft after this step?`` per request."""


def verify_all_drafts(requests: Sequence[Request], budget_left: int, context: VerifyContext | None = None) -> list[int]:
    """Fixed-length policy: verify every draft; the scheduler clips to the budget in FCFS order."""
    return [len(request.spec_token_ids) for request in requests]


@dataclass
class _StepPlan:
    """Working state of one ``schedule`` call: remaining budget and what each request got."""

    budget: int
    decode: list[Request] = field(default_factory=list)
    chunks: list[tuple[Request, int]] = field(default_factory=list)
    admitted: list[tuple[Request, int]] = field(default_factory=list)
    num_spec: dict[str, int] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    no_draft: set[str] = field(default_factory=set)


class Scheduler:
    """Owns the request queues and the KV block manager; the only writer of request state."""

    def __init__(
        self, config: SchedulerConfig, verify_lengths: VerifyLengthsFn | None = None,
        select_drafting: DraftSelectFn | None = None,
    ) -> None:
        self.config = config
        self.verify_lengths: VerifyLengthsFn = verify_lengths or verify_all_drafts
        self.select_drafting: DraftSelectFn | None = select_drafting
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, shuffle=config.shuffle_blocks, seed=config.seed
        )
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests return to the front
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions_total = 0
        self._requests: dict[str, Request] = {}  # unfinished requests only
        self._needs_request_data: set[str] = set()  # runner must (re)create per-request state
        self._runner_blocks: dict[str, int] = {}  # block-table entries the runner holds (after trims)
        self._finished_ids: set[str] = set()  # reported in the next SchedulerOutput
        self.drafts_verified: Callable[[Request, tuple[float, ...], int, int], None] | None = None
        """Called after every verify step with drafts: ``(request, stated confidences of the verified
        drafts, l_r, accepted drafts)`` (online calibration of confidences)."""
        self.request_finished: Callable[[str], None] | None = None
        """Called with the id of every request that ends (stop, length, abort, error): owners of
        per-request state outside the scheduler (the speculation controller) release it."""

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def running_requests(self) -> tuple[Request, ...]:
        """Running requests in arrival order (for the verification policy and metrics)."""
        return tuple(self.running)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request (finished ones are forgotten once their output is returned)."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def has_finished_requests(self) -> bool:
        """True while finished ids wait to be reported to the runner by the next ``schedule``."""
        return bool(self._finished_ids)

    # ---- request lifecycle -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request (FCFS) or raise ``RequestRejectedError`` if it can never fit."""
        if request.request_id in self._requests:
            raise RequestRejectedError(
                f"duplicate request id {request.request_id!r}", None, "duplicate_request_id"
            )
        check_admissible(request, self.config)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._needs_request_data.add(request.request_id)
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        """Abort (e.g. client disconnect); a no-op for unknown or already finished ids."""
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request from outside (abort, error): free its blocks, report it next step."""
        if not status.is_finished:
            raise ValueError(f"{status!r} is not a final status")
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, status)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan one engine step (rules in the module docstring)."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        self._schedule_drafts(plan)
        self._select_drafting(plan)
        if not plan.preempted:  # blocks are short: admitting now would only thrash
            self._schedule_waiting(plan)
        seqs = [self._make_seq(r, 1, plan.num_spec.get(r.request_id, 0), r.request_id not in plan.no_draft)
                for r in plan.decode]
        seqs += [self._make_seq(r, n, 0) for r, n in plan.chunks + plan.admitted]
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(
            seqs=tuple(seqs),
            finished_request_ids=finished,
            preempted_request_ids=tuple(plan.preempted),
            num_batched_tokens=sum(seq.num_new_tokens for seq in seqs),
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance every scheduled request by the runner's result; returns one output per request
        that got new tokens or finished. Requests aborted while the step ran are skipped."""
        outputs: list[EngineCoreOutput] = []
        for seq in scheduler_output.seqs:
            request = self._requests.get(seq.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += seq.num_new_tokens
            if seq.sample:
                outputs.append(self._apply_sampled(request, seq, runner_output))
        return outputs

    # ---- schedule() parts --------------------------------------------------------------------
    def _schedule_running(self, plan: _StepPlan) -> None:
        """Known tokens of running requests, FCFS; preempts the youngest when blocks run out.

        FCFS admission admits a younger request only in a step where the older ones' prompts fit
        completely, so at most one running request is mid-prefill and it is the youngest: the decode
        base tokens (one each, and the budget is >= ``max_num_seqs``) are always scheduled.
        """
        index = 0
        while index < len(self.running) and plan.budget > 0:
            request = self.running[index]
            num_known = request.num_tokens - request.num_computed_tokens
            num_new = min(num_known, plan.budget)
            if not self._allocate_or_preempt(request, request.num_computed_tokens + num_new, plan):
                return  # it was the youngest and preempted itself
            plan.budget -= num_new
            if num_known == 1:
                plan.decode.append(request)
            else:
                plan.chunks.append((request, num_new))
            index += 1

    def _allocate_or_preempt(self, request: Request, num_tokens_total: int, plan: _StepPlan) -> bool:
        """Grow ``request``'s blocks, preempting the youngest running request until they fit.

        The victims come from the tail of ``running`` (arrival order), which holds only requests not
        yet scheduled this step or ``request`` itself. Returns False if ``request`` was the victim.
        """
        while not self.block_manager.allocate(request.request_id, num_tokens_total):
            victim = self.running.pop()
            self._preempt(victim, plan)
            if victim is request:
                return False
        return True

    def _schedule_drafts(self, plan: _StepPlan) -> None:
        """Pick ``l_r`` per decode request with drafts.

        Drafts that can never be verified are dropped first (``request_rules.draft_cap``: at most
        ``num_lookahead_tokens``, and the up to ``l_r + 1`` emitted tokens stay within ``max_tokens``
        and ``max_model_len``), so the policy sees only verifiable drafts. The policy gets those
        requests in FCFS order and ``budget_left`` (the step budget minus the known tokens already
        scheduled); its choice is clipped to the drafts held, then in FCFS order to the budget left
        and to the room in the request's blocks plus the free blocks (drafts never preempt).
        """
        candidates: list[Request] = []
        for request in plan.decode:
            cap = draft_cap(request, self.config.num_lookahead_tokens, self.config.max_model_len)
            del request.spec_token_ids[cap:], request.spec_confidences[cap:]
            if not request.spec_token_ids:
                request.spec_draft_id = None
            if request.spec_token_ids:
                candidates.append(request)
        if not candidates:
            return
        context = VerifyContext(
            num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget,
            num_decode_requests=len(plan.decode),
            token_budget=self.config.max_num_batched_tokens,
        )
        lengths = list(self.verify_lengths(candidates, plan.budget, context))
        if len(lengths) != len(candidates) or any(length < 0 for length in lengths):
            raise ValueError(f"verify_lengths returned {lengths} for {len(candidates)} requests")
        for request, wanted in zip(candidates, lengths, strict=True):
            room = self.block_manager.max_coverable_tokens(request.request_id) - request.num_tokens
            num_spec = min(wanted, len(request.spec_token_ids), plan.budget, room)
            if num_spec > 0:
                self.block_manager.allocate(request.request_id, request.num_tokens + num_spec)
                plan.budget -= num_spec
                plan.num_spec[request.request_id] = num_spec

    def _select_drafting(self, plan: _StepPlan) -> None:
        """Ask the drafting gate which decode requests draft after this step (requests finishing a
        prefill chunk always draft: nothing is known about their drafts yet). The decision comes
        before any of the drafts it concerns exist, so it cannot bias verification."""
        if self.select_drafting is None or not plan.decode:
            return
        # The gate plans the next step: this step's known tokens (base tokens + prefill chunks), not
        # the verify tokens it spends now.
        context = VerifyContext(
            num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget - sum(plan.num_spec.values()),
            num_decode_requests=len(plan.decode),
            token_budget=self.config.max_num_batched_tokens,
        )
        flags = list(self.select_drafting(plan.decode, context))
        if len(flags) != len(plan.decode):
            raise ValueError(f"select_drafting returned {len(flags)} flags for {len(plan.decode)} requests")
        plan.no_draft = {r.request_id for r, keep in zip(plan.decode, flags, strict=True) if not keep}

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests FCFS with a prefill chunk. The head of the queue is never
        skipped: a younger request may not overtake one that does not fit (no starvation)."""
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, plan.budget)
            if not self.block_manager.allocate(request.request_id, request.num_computed_tokens + num_new):
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)  # admission order is arrival order (FCFS)
            plan.admitted.append((request, num_new))
            plan.budget -= num_new

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Recompute preemption of a request just taken off ``running``: drop its KV, keep its
        outputs (re-prefilled as prompt + outputs), drop its drafts, put it first in line."""
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.clear_drafts()
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._needs_request_data.add(request.request_id)
        self.waiting.appendleft(request)
        plan.preempted.append(request.request_id)

    def _make_seq(self, request: Request, num_known: int, num_spec: int, draft: bool = True) -> ScheduledSeq:
        """The step's diff for ``request``: its new blocks, the drafts it verifies, whether it drafts."""
        start = request.num_computed_tokens
        end = start + num_known
        new_request = None
        if request.request_id in self._needs_request_data:
            self._needs_request_data.discard(request.request_id)
            self._runner_blocks[request.request_id] = 0
            new_request = NewRequestData(
                prompt_token_ids=tuple(request.prompt_token_ids),
                sampling_params=request.sampling_params,
                output_token_ids=tuple(request.output_token_ids),
            )
        table = self.block_manager.block_table(request.request_id)
        held = self._runner_blocks.get(request.request_id, 0)
        self._runner_blocks[request.request_id] = len(table)
        sample = end == request.num_tokens
        return ScheduledSeq(
            request_id=request.request_id,
            start_pos=start,
            num_known_tokens=num_known,
            spec_token_ids=tuple(request.spec_token_ids[:num_spec]),
            spec_draft_id=request.spec_draft_id if num_spec else None,
            new_block_ids=table[held:],
            num_blocks=len(table),
            sample=sample,
            draft=sample and draft and may_draft(request, self.config.num_lookahead_tokens),
            new_request=new_request,
        )

    # ---- update_from_output() parts -------------------------------------------------------
    def _apply_sampled(self, request: Request, seq: ScheduledSeq, out: RunnerOutput) -> EngineCoreOutput:
        """Append accepted drafts + bonus/recovered token with stop checks; rewind rejected slots."""
        sampled = out.sampled_token_ids.get(request.request_id)
        if not sampled or len(sampled) > seq.num_spec_tokens + 1:
            raise ValueError(
                f"request {request.request_id!r}: expected 1..{seq.num_spec_tokens + 1} sampled tokens, "
                f"got {sampled!r}"
            )
        num_accepted = len(sampled) - 1
        if self.drafts_verified is not None and seq.num_spec_tokens and request.spec_confidences:
            self.drafts_verified(request, tuple(request.spec_confidences[: seq.num_spec_tokens]), seq.num_spec_tokens,
                                 num_accepted)
        request.num_computed_tokens -= seq.num_spec_tokens - num_accepted  # rejected draft slots
        num_kept, status = append_with_stop_checks(request, sampled, self.config.max_model_len)
        # Drafts at or before the stop position count; nothing past a stop does.
        num_drafts = seq.num_spec_tokens if num_kept == len(sampled) else min(seq.num_spec_tokens, num_kept)
        logprobs = out.logprobs.get(request.request_id)
        result = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=tuple(sampled[:num_kept]),
            new_logprobs=tuple(logprobs[:num_kept]) if logprobs is not None else None,
            finish_reason=status.finish_reason if status is not None else None,
            stop_reason=request.stop_reason if status is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_draft_tokens=num_drafts,
            num_accepted_tokens=min(num_accepted, num_kept),
            first_scheduled_time=request.first_scheduled_time,
        )
        if status is not None:
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            self._finish(request, status)
        else:
            self.block_manager.trim(request.request_id, request.num_computed_tokens)
            self._runner_blocks[request.request_id] = min(
                self._runner_blocks.get(request.request_id, 0), self.block_manager.num_blocks_of(request.request_id))
            drafts = out.drafts.get(request.request_id)
            request.spec_token_ids = list(drafts.token_ids) if drafts else []
            request.spec_confidences = list(drafts.confidences) if drafts else []
            request.spec_draft_id = drafts.draft_id if drafts else None
            request.spec_drafter = drafts.drafter if drafts else ""
            if drafts and drafts.confidences:
                request.last_draft_confidences = tuple(drafts.confidences)
                request.last_draft_num_tokens = request.num_tokens
                request.last_draft_drafter = drafts.drafter
        return result

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request.request_id)
        request.clear_drafts()
        del self._requests[request.request_id]
        self._needs_request_data.discard(request.request_id)
        self._runner_blocks.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)
        if self.request_finished is not None:
            self.request_finished(request.request_id)
