"""Continuous-batching scheduler (after vLLM v1): no prefill/decode phases.

A request's progress is one number: ``num_computed_tokens`` (positions whose KV is cached) chases
``num_tokens`` (prompt + generated) plus the drafts being verified. Each step, under one token budget
(``max_num_batched_tokens``) and at most ``max_num_seqs`` running requests:

1. Running decode requests, in admission order, get their base token (the last generated token);
   then running requests still prefilling get their next chunk, FCFS, each capped at
   ``prefill_chunk_cap`` tokens (the long-prefill threshold).
2. Decode requests with drafts get ``l_r`` drafts to verify, chosen by the speculation collaborator's
   ``verify_lengths(requests, budget_left, context)`` and then clipped (see ``_schedule_drafts``).
3. The collaborator's drafting gate (``select_drafting``) marks decode requests whose next drafts are
   not worth their drafter cost ``draft=False`` (the runner skips their drafter forward).
4. If nobody was preempted, waiting requests (preempted ones first, then new ones, FCFS) are admitted
   with a capped prefill chunk from what is left of the budget; the last chunk of a prompt samples.
   A long prompt (more than the threshold left to prefill) waits while ``max_long_partial_prefills``
   long prompts are mid-prefill, and shorter requests behind it are admitted meanwhile; any request
   whose chunk would leave it mid-prefill waits while ``max_num_partial_prefills`` are.
5. Budget still left tops up the step's prefill chunks, FCFS (work-conserving: a lone long prompt
   still gets the whole budget).

So a long prefill takes at most its share of a step while decode rows and short prompts keep
flowing (vLLM's partial-prefill limits), yet uses everything nobody else needs.

KV blocks cover ``[0, start_pos + num_new_tokens)`` before a request's tokens are scheduled. When a
running request's known tokens do not fit, the most recently admitted running request is preempted
(recompute: blocks freed, ``num_computed_tokens = 0``, outputs kept, drafts dropped, front of the
waiting queue); the request itself is preempted only when it is the youngest. So the oldest request is
never preempted for a younger one and always progresses. Drafts never preempt anyone: they are clipped
to the free blocks. After a step every running request holds exactly the blocks covering
``[0, num_computed_tokens)``: the slots of rejected drafts are trimmed.

Fault isolation (``rollback_request``, used by ``sparkserve.engine.step_faults``): a request rolled back after a
failed step runs in steps of its own until it has proven itself (``sparkserve.scheduler.isolation``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

from sparkserve.scheduler.block_manager import BlockManager, block_keys
from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.isolation import Isolation
from sparkserve.scheduler.outputs import (
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from sparkserve.scheduler.request import Request, RequestStatus
from sparkserve.scheduler.request_rules import (
    append_with_stop_checks,
    check_admissible,
    draft_cap,
    held_by_prefill_limits,
    may_draft,
    prefill_slots_in_use,
)
from sparkserve.scheduler.speculation import Speculation, VerifyContext, verify_all_drafts
from sparkserve.scheduler.stats import DraftOutcome, SchedulerStats, SpecDecodingStats

if TYPE_CHECKING:
    from sparkserve.scheduler.kv_events import KVCacheEventListener


class StepUpdate(NamedTuple):
    """What ``Scheduler.update_from_output`` returns: the per-request deltas and the step's stats record."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


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
    """Owns the request queues and the KV block manager; the only writer of request state.

    Args:
        config: limits and cache geometry.
        speculation: the speculation collaborator (``sparkserve.scheduler.speculation.Speculation``): verify
            lengths, drafting gate, verify outcomes, finished requests; None without one (every pending
            draft is verified, clipped to the budget; everyone allowed by ``may_draft`` drafts).
        kv_event_listener: told of every block the prefix cache stores or evicts
            (``sparkserve.scheduler.kv_events``, the KV events a KV-aware router reads); None: nobody.
    """

    def __init__(self, config: SchedulerConfig, speculation: Speculation | None = None,
                 kv_event_listener: KVCacheEventListener | None = None) -> None:
        self.config = config
        self.speculation = speculation
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, shuffle=config.shuffle_blocks, seed=config.seed,
            enable_caching=config.enable_prefix_caching, listener=kv_event_listener,
        )
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache (admissions)
        self.prefix_cache_hits = 0  # of them, tokens found cached
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests return to the front
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions_total = 0
        self._requests: dict[str, Request] = {}  # unfinished requests only
        self._needs_request_data: set[str] = set()  # runner must (re)create per-request state
        self._runner_blocks: dict[str, int] = {}  # block-table entries the runner holds (after trims)
        self._finished_ids: set[str] = set()  # reported in the next SchedulerOutput
        self._last_reported: frozenset[str] = frozenset()  # finished ids of the last SchedulerOutput
        self._isolated = Isolation()  # rolled-back requests running in solo steps
        self.solo_request_id: str | None = None  # the request of the step being planned, if solo

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

    @property
    def isolated_request_ids(self) -> tuple[str, ...]:
        """Requests running in steps of their own after a failed step (oldest failure first)."""
        return self._isolated.request_ids

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

    def rollback_request(self, request_id: str, num_output_tokens: int) -> bool:
        """Undo a failed step for one request and isolate it (see the module docstring).

        Its blocks are freed and its outputs cut back to the first ``num_output_tokens`` (what was
        delivered before the step); ``num_computed_tokens = 0``, drafts dropped, first in the waiting
        queue. Its id is reported in the next ``finished_request_ids``, so the runner drops all its
        state, and the request is sent as new (``new_request`` data) when it runs again. Returns
        False for an unknown (finished) id.
        """
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request_id)
        del request.output_token_ids[num_output_tokens:]
        del request.block_keys[request.num_tokens // self.config.block_size:]  # keys of cut tokens
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.stop_reason = None
        request.clear_drafts()
        request.num_preemptions += 1
        self._needs_request_data.add(request_id)
        self._finished_ids.add(request_id)
        self._isolated.add(request_id)
        self.waiting.appendleft(request)
        return True

    def resync_runner(self, lost: frozenset[str] = frozenset()) -> None:
        """After a failed step, make the next ``finished_request_ids`` drop every runner state that may
        be stale: ``lost`` (the failed plan's finished ids), the last reported ones (when the plan itself
        was lost) and every request that will be sent as new anyway (rolled back or preempted; its row
        may survive a failure that came before the runner saw the preemption). Only ids of finished
        requests or of requests that will be re-sent are reported, so no live runner state is dropped.
        """
        candidates = set(lost) | set(self._last_reported) | self._needs_request_data
        self._finished_ids |= {rid for rid in candidates if rid not in self._requests or rid in self._needs_request_data}

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan one engine step (rules in the module docstring)."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        solo = self._solo_turn()
        alone = solo is not None and self._schedule_solo(solo, plan)
        self.solo_request_id = solo.request_id if alone and solo is not None else None
        if not alone:
            self._schedule_running(plan)
        self._schedule_drafts(plan)
        self._select_drafting(plan)
        if not alone and not plan.preempted:  # blocks are short: admitting now would only thrash
            for _ in range(2):  # again once a top-up finished a prefill and freed its slot
                self._schedule_waiting(plan)
                self._top_up_prefills(plan)
        seqs = [self._make_seq(r, 1, plan.num_spec.get(r.request_id, 0), r.request_id not in plan.no_draft)
                for r in plan.decode]
        chunks = plan.chunks + plan.admitted
        finishing = [r.num_computed_tokens + n == r.num_tokens for r, n in chunks]
        drafts = iter(self.speculation.drafts_after_prefill(sum(finishing)) if self.speculation is not None
                      else [True] * sum(finishing))
        seqs += [self._make_seq(r, n, 0, f and next(drafts)) for (r, n), f in zip(chunks, finishing, strict=True)]
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        self._last_reported = finished
        return SchedulerOutput(
            seqs=tuple(seqs),
            finished_request_ids=finished,
            preempted_request_ids=tuple(plan.preempted),
            num_batched_tokens=sum(seq.num_new_tokens for seq in seqs),
        )

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> StepUpdate:
        """Advance every scheduled request by the runner's result. Returns one output per request that
        got new tokens or finished (requests aborted while the step ran are skipped) and the step's
        stats record (``sparkserve.scheduler.stats``), counted here, once."""
        outputs: list[EngineCoreOutput] = []
        gamma = self.config.num_lookahead_tokens
        drafts: list[DraftOutcome] = []
        for seq in scheduler_output.seqs:
            request = self._requests.get(seq.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += seq.num_new_tokens
            if seq.sample:
                output, outcome = self._apply_sampled(request, seq, runner_output)
                outputs.append(output)
                # A decode step (not the first token after a prefill or a recompute) is a draft.
                if gamma and seq.new_request is None and seq.num_known_tokens == 1 and output.new_token_ids:
                    drafts.append(outcome)
                self._isolated.on_sampled(seq.request_id)
            if request.status == RequestStatus.RUNNING:
                self._cache_computed_blocks(request)
        stats = SchedulerStats(
            num_batched_tokens=scheduler_output.num_batched_tokens,
            num_decode_requests=sum(1 for s in scheduler_output.seqs if s.sample),
            num_preemptions=len(scheduler_output.preempted_request_ids),
            num_drafting=len(runner_output.drafts),
            spec_decoding=SpecDecodingStats.of(gamma, drafts) if gamma else None,
        )
        return StepUpdate(outputs, stats)

    # ---- schedule() parts --------------------------------------------------------------------
    def _schedule_running(self, plan: _StepPlan) -> None:
        """Decode base tokens of running requests, then their prefill chunks (module docstring, 1).

        Decode rows come first so prefill chunks can never starve them of budget (the budget is
        >= ``max_num_seqs``, one token each). Both passes go in admission order and grow blocks by
        preempting the youngest running request; a victim already given its decode token is taken
        out of the plan again. Isolated requests are left out (they run in solo steps).
        """
        for decode in (True, False):
            index = 0
            while index < len(self.running):
                request = self.running[index]
                index += 1
                num_known = request.num_tokens - request.num_computed_tokens
                if (num_known == 1) != decode or request.request_id in self._isolated:
                    continue
                num_new = min(num_known, plan.budget, self.config.prefill_chunk_cap)
                if num_new == 0:
                    continue
                if not self._allocate_or_preempt(request, request.num_computed_tokens + num_new, plan):
                    break  # it was the youngest and preempted itself: nobody younger is left
                index = min(index, len(self.running))
                plan.budget -= num_new
                if decode:
                    plan.decode.append(request)
                else:
                    plan.chunks.append((request, num_new))

    def _allocate_or_preempt(self, request: Request, num_tokens_total: int, plan: _StepPlan) -> bool:
        """Grow ``request``'s blocks, preempting the youngest running request until they fit.

        The victims come from the tail of ``running`` (admission order): requests younger than
        ``request``, or ``request`` itself. A victim already scheduled for its decode token is
        removed from the plan (its token returned to the budget). Returns False if ``request`` was
        the victim.
        """
        while not self.block_manager.allocate(request.request_id, num_tokens_total):
            victim = self.running.pop()
            if any(r is victim for r in plan.decode):
                plan.decode = [r for r in plan.decode if r is not victim]
                plan.budget += 1
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
            held = request.drafts
            if len(held.token_ids) > cap or len(held.confidences) > cap:
                request.drafts = replace(held, token_ids=held.token_ids[:cap], confidences=held.confidences[:cap],
                                         draft_id=held.draft_id if cap else None)
            if request.drafts.token_ids:
                candidates.append(request)
        if not candidates:
            return
        context = VerifyContext(
            num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget,
            num_decode_requests=len(plan.decode),
            token_budget=self.config.max_num_batched_tokens,
        )
        if self.speculation is None:
            lengths = verify_all_drafts(candidates)
        else:
            lengths = list(self.speculation.verify_lengths(candidates, plan.budget, context))
        if len(lengths) != len(candidates) or any(length < 0 for length in lengths):
            raise ValueError(f"verify_lengths returned {lengths} for {len(candidates)} requests")
        for request, wanted in zip(candidates, lengths, strict=True):
            room = self.block_manager.max_coverable_tokens(request.request_id) - request.num_tokens
            num_spec = min(wanted, len(request.drafts.token_ids), plan.budget, room)
            if num_spec > 0:
                self.block_manager.allocate(request.request_id, request.num_tokens + num_spec)
                plan.budget -= num_spec
                plan.num_spec[request.request_id] = num_spec

    def _select_drafting(self, plan: _StepPlan) -> None:
        """Ask the drafting gate which decode requests draft after this step (requests finishing a
        prefill chunk always draft: nothing is known about their drafts yet). The decision comes
        before any of the drafts it concerns exist, so it cannot bias verification."""
        if self.speculation is None or not plan.decode:
            return
        # The gate plans the next step: this step's known tokens (base tokens + prefill chunks), not
        # the verify tokens it spends now.
        context = VerifyContext(
            num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget - sum(plan.num_spec.values()),
            num_decode_requests=len(plan.decode),
            token_budget=self.config.max_num_batched_tokens,
        )
        flags = list(self.speculation.select_drafting(plan.decode, context))
        if len(flags) != len(plan.decode):
            raise ValueError(f"select_drafting returned {len(flags)} flags for {len(plan.decode)} requests")
        plan.no_draft = {r.request_id for r, keep in zip(plan.decode, flags, strict=True) if not keep}

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests FCFS with a capped prefill chunk (module docstring, 4).

        The head of the queue is skipped only for the partial-prefill limits (a long prompt while
        the long slots are taken, or a prompt that would stay mid-prefill while the partial slots
        are): it keeps its place and goes first once a slot frees. A request that does not fit the
        free blocks stops admission (no younger request overtakes it: no starvation); so does an
        isolated request waiting for its solo step.
        """
        config = self.config
        cap = config.prefill_chunk_cap
        if any(self._requests[rid].status != RequestStatus.RUNNING for rid in self._isolated.request_ids):
            return  # an isolated request waits for a slot and blocks: admit nobody before it
        planned = {r.request_id: n for r, n in (*plan.chunks, *plan.admitted)}
        slots = prefill_slots_in_use(self.running, planned, cap)
        for request in list(self.waiting):
            if plan.budget <= 0 or len(self.running) >= config.max_num_seqs:
                return
            self._take_cached_prefix(request)
            num_left = request.num_tokens - request.num_computed_tokens
            num_new = min(num_left, plan.budget, cap)
            if held_by_prefill_limits(num_left, num_new, slots, config):
                self._return_cached_prefix(request)
                continue
            if not self.block_manager.allocate(request.request_id, request.num_computed_tokens + num_new):
                self._return_cached_prefix(request)
                return
            self.waiting.remove(request)
            self._admit(request)
            plan.admitted.append((request, num_new))
            plan.budget -= num_new
            slots = slots.plus(num_left - num_new, cap)

    def _take_cached_prefix(self, request: Request) -> None:
        """A waiting request holding no KV starts with the cached blocks of its longest cached prefix
        (at least its last token is recomputed, so the step has logits to sample from). A request asking
        for prompt logprobs bypasses the cache: a cached prefix has no logits to score."""
        bm = self.block_manager
        if not bm.enable_caching or request.num_computed_tokens or bm.num_blocks_of(request.request_id):
            return
        if request.sampling_params.prompt_logprobs is not None:
            return
        request.block_keys = block_keys(request.all_token_ids, bm.block_size, self.config.cache_extra_key,
                                        request.block_keys)
        hits = bm.cached_prefix(request.block_keys, (request.num_tokens - 1) // bm.block_size)
        first = request.first_scheduled_time is None
        if first:
            self.prefix_cache_queries += request.num_prompt_tokens
        if hits:
            bm.allocate_prefix(request.request_id, hits)
            request.num_computed_tokens = len(hits) * bm.block_size
            if first:
                request.num_cached_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
                self.prefix_cache_hits += request.num_cached_tokens

    def _return_cached_prefix(self, request: Request) -> None:
        """Undo ``_take_cached_prefix`` for a request that stays waiting."""
        if request.num_computed_tokens:
            if request.first_scheduled_time is None:
                self.prefix_cache_hits -= request.num_cached_tokens
                self.prefix_cache_queries -= request.num_prompt_tokens
                request.num_cached_tokens = 0
            self.block_manager.free(request.request_id)
            request.num_computed_tokens = 0
        elif self.block_manager.enable_caching and request.first_scheduled_time is None:
            self.prefix_cache_queries -= request.num_prompt_tokens

    def _cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose tokens are all computed (shared from now on)."""
        bm = self.block_manager
        if not bm.enable_caching:
            return
        num_full = request.num_computed_tokens // bm.block_size
        if num_full > len(request.block_keys):
            request.block_keys = block_keys(request.all_token_ids[: num_full * bm.block_size], bm.block_size,
                                            self.config.cache_extra_key, request.block_keys)
        bm.cache_blocks(request.request_id, request.block_keys[:num_full])

    def _admit(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)  # admission order

    def _top_up_prefills(self, plan: _StepPlan) -> None:
        """Give budget nobody else used to this step's prefill chunks, FCFS (module docstring, 5).
        Never preempts: a chunk grows only as far as the free blocks allow."""
        for chunks in (plan.chunks, plan.admitted):
            for i, (request, num_new) in enumerate(chunks):
                if plan.budget <= 0:
                    return
                start = request.num_computed_tokens
                extra = min(request.num_tokens - start - num_new, plan.budget)
                room = self.block_manager.max_coverable_tokens(request.request_id) - start - num_new
                extra = min(extra, room)
                if extra > 0 and self.block_manager.allocate(request.request_id, start + num_new + extra):
                    chunks[i] = (request, num_new + extra)
                    plan.budget -= extra

    def _solo_turn(self) -> Request | None:
        """The isolated request to run alone this step, or None for a normal step."""
        isolated = self._isolated
        has_normal = bool(isolated) and any(r.request_id not in isolated for r in (*self.running, *self.waiting))
        request_id = isolated.next_solo(has_normal)
        return None if request_id is None else self._requests[request_id]

    def _schedule_solo(self, request: Request, plan: _StepPlan) -> bool:
        """Schedule ``request`` alone (uncapped chunk, no preemption); False if it does not fit now."""
        num_known = request.num_tokens - request.num_computed_tokens
        num_new = min(num_known, plan.budget)
        waiting = request.status != RequestStatus.RUNNING
        if waiting and len(self.running) >= self.config.max_num_seqs:
            return False
        if not self.block_manager.allocate(request.request_id, request.num_computed_tokens + num_new):
            return False  # (a solo step recomputes from scratch: no prefix hit for a suspect request)
        plan.budget -= num_new
        if waiting:
            self.waiting.remove(request)
            self._admit(request)
            plan.admitted.append((request, num_new))
        elif num_known == 1:
            plan.decode.append(request)
        else:
            plan.chunks.append((request, num_new))
        return True

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
            spec_token_ids=request.drafts.token_ids[:num_spec],
            spec_draft_id=request.drafts.draft_id if num_spec else None,
            new_block_ids=table[held:],
            num_blocks=len(table),
            sample=sample,
            draft=sample and draft and may_draft(request, self.config.num_lookahead_tokens),
            new_request=new_request,
        )

    # ---- update_from_output() parts -------------------------------------------------------
    def _apply_sampled(self, request: Request, seq: ScheduledSeq,
                       out: RunnerOutput) -> tuple[EngineCoreOutput, DraftOutcome]:
        """Append accepted drafts + bonus/recovered token with stop checks; rewind rejected slots.
        Returns the request's output and its verify step's outcome (counted up to a stop)."""
        sampled = out.sampled_token_ids.get(request.request_id)
        if not sampled or len(sampled) > seq.num_spec_tokens + 1:
            raise ValueError(
                f"request {request.request_id!r}: expected 1..{seq.num_spec_tokens + 1} sampled tokens, "
                f"got {sampled!r}"
            )
        num_accepted = len(sampled) - 1
        if self.speculation is not None and seq.num_spec_tokens and request.drafts.confidences:
            self.speculation.on_verified(request, request.drafts.confidences[: seq.num_spec_tokens],
                                         seq.num_spec_tokens, num_accepted)
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
            first_scheduled_time=request.first_scheduled_time,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=tuple(prompt) if (prompt := out.prompt_logprobs.get(request.request_id)) is not None else None,
        )
        outcome = DraftOutcome(request.request_id, request.drafts.drafter if seq.num_spec_tokens else "",
                               num_drafts, min(num_accepted, num_kept))
        if status is not None:
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            self._finish(request, status)
        else:
            self.block_manager.trim(request.request_id, request.num_computed_tokens)
            self._runner_blocks[request.request_id] = min(
                self._runner_blocks.get(request.request_id, 0), self.block_manager.num_blocks_of(request.request_id))
            request.drafts = request.drafts.proposed(out.drafts.get(request.request_id), request.num_tokens)
        return result, outcome

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED):
            self._cache_computed_blocks(request)  # a finished answer stays cached for the next turn
        request.status = status
        self.block_manager.free(request.request_id)
        request.clear_drafts()
        del self._requests[request.request_id]
        self._needs_request_data.discard(request.request_id)
        self._isolated.discard(request.request_id)
        self._runner_blocks.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)
        if self.speculation is not None:
            self.speculation.on_finished(request.request_id)
