"""EngineCore: the synchronous step loop body, ``schedule -> execute -> update``.

No asyncio here: ``AsyncEngine`` calls ``step()`` from a worker thread and applies new requests and
aborts between steps, so the scheduler is never touched concurrently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.config import EngineArgs
from engine.loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from engine.profiler import load_or_measure_profile, profile_key
from engine.spec.factory import drafter_bytes_per_block, load_default_or_given_drafter, make_verify_lengths
from engine.spec.speculator import Speculator
from engine.step_faults import StepFaultHandler
from scheduler.config import SchedulerConfig
from scheduler.errors import RequestRejectedError
from scheduler.outputs import EngineCoreOutput
from scheduler.policy.spec import parse_policy
from scheduler.profile import ThroughputProfile
from scheduler.request import Request
from scheduler.request_rules import check_admissible, check_sampling_params
from scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class StepStats:
    """What one step did (for metrics and the throughput profile).

    Attributes:
        num_batched_tokens: tokens fed to the target.
        num_decode_requests: requests that sampled this step.
        duration_s: wall time of schedule + execute + update, seconds.
        num_preemptions: requests preempted by this step's schedule.
        verified_per_request / accepted_per_request: l_r and accepted drafts of each decode request
            (drafter loaded only; nothing past a stop is counted).
        num_drafting: requests the runner drafted for after this step (the drafting gate's choice).
    """

    num_batched_tokens: int = 0
    num_decode_requests: int = 0
    duration_s: float = 0.0
    num_drafting: int = 0
    num_preemptions: int = 0
    verified_per_request: list[int] = field(default_factory=list)
    accepted_per_request: list[int] = field(default_factory=list)


@dataclass
class SpecStats:
    """Speculative decoding counters (DeepSpec section 3 definitions).

    Attributes:
        num_drafts: verify steps of requests with a drafter (steps with l_r = 0 included).
        num_draft_tokens: drafts verified (sum of l_r).
        num_accepted_tokens: drafts accepted (never past a stop).
        verified_per_pos[k] / accepted_per_pos[k]: drafts verified / accepted at position k;
            accepted/verified at k is unbiased even when l_r varies.
    """

    gamma: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    verified_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.verified_per_pos = [0] * self.gamma
        self.accepted_per_pos = [0] * self.gamma

    def record(self, num_draft_tokens: int, num_accepted: int, emitted: bool) -> None:
        if not self.gamma or not emitted:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for k in range(num_draft_tokens):
            self.verified_per_pos[k] += 1
        for k in range(num_accepted):
            self.accepted_per_pos[k] += 1

    @property
    def accepted_length(self) -> float:
        """tau: tokens emitted per verify step, bonus / recovered token included."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class EngineCore:
    """Owns the scheduler and the model runner; one ``step()`` at a time.

    Args:
        args: engine arguments.
        loaded: an already loaded model (tests share one load), or None to load ``args.model``.
    """

    def __init__(
        self, args: EngineArgs, loaded: LoadedModel | None = None, drafter=None,
        profile: ThroughputProfile | None = None,
    ) -> None:
        self.args = args
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.loaded = loaded if loaded is not None else load_model(args.model, dtype=dtype)
        config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_name = args.served_model_name or self.loaded.name
        self.max_model_len = min(args.max_model_len or _DEFAULT_MAX_MODEL_LEN, config.max_position_embeddings)
        if drafter is None:
            drafter = load_default_or_given_drafter(args, self.loaded, dtype)
        self.drafter = drafter
        num_blocks = args.num_kv_blocks
        if num_blocks is None:
            per_block = kv_cache_bytes_per_block(config, args.block_size, dtype)
            if drafter is not None:
                per_block += drafter_bytes_per_block(drafter, args.block_size, dtype)
            num_blocks = max(1, int(args.kv_cache_memory_gb * (1 << 30)) // per_block)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=args.block_size,
                num_kv_blocks=num_blocks,
                num_lookahead_tokens=int(drafter.config.block_size) if drafter is not None else 0,
                shuffle_blocks=args.shuffle_blocks,
                seed=args.seed,
                long_prefill_token_threshold=args.long_prefill_token_threshold,
                max_num_partial_prefills=args.max_num_partial_prefills,
                max_long_partial_prefills=args.max_long_partial_prefills,
            ),
        )
        speculator = None
        if drafter is not None:
            speculator = Speculator(drafter, num_blocks, args.block_size, dtype, args.max_num_seqs)
        self.runner = ModelRunner(self.loaded.model, config, num_blocks, args.block_size, dtype, speculator=speculator)
        self.verify_hook = None
        if drafter is not None:
            policy = parse_policy(args.verify_policy or "dspark")
            if policy.needs_profile and profile is None:
                profile = load_or_measure_profile(self.runner, num_blocks, self.profile_key(), args.max_num_batched_tokens,
                                                  args.max_num_seqs, path=args.profile_path)
            if policy.needs_profile and args.draft_gate and not profile.has_draft_time:
                logger.warning("drafting gate off: the throughput profile has no drafter times (measured before "
                               "they were recorded); re-measure it with `sparkserve profile --out PATH`")
            self.verify_hook = make_verify_lengths(args, drafter, profile)
            self.scheduler.verify_lengths = self.verify_hook
            self.scheduler.select_drafting = self.verify_hook.select_drafting
        self.faults = StepFaultHandler(self.scheduler)
        self.last_step = StepStats()
        self.spec_stats = SpecStats(int(drafter.config.block_size) if drafter is not None else 0)
        logger.info(
            "engine ready: model=%s dtype=%s kv_blocks=%d (block_size=%d) max_model_len=%d",
            self.model_name, args.dtype, num_blocks, args.block_size, self.max_model_len,
        )

    def profile_key(self) -> dict[str, str | int]:
        """What a cached throughput profile of this engine is valid for (model, dtype, device,
        drafter and its draft vocabulary, step budgets, threads)."""
        args = self.args
        drafter = f"{args.drafter or 'default'}@{getattr(self.drafter, 'draft_vocab_size', None)}"
        return profile_key(self.model_name, args.dtype, drafter, args.max_num_batched_tokens, args.max_num_seqs,
                           torch.get_num_threads())

    def make_request(self, request_id: str, prompt_token_ids: list[int], params) -> Request:
        """Build a scheduler request with the model's EOS."""
        return Request(request_id, list(prompt_token_ids), params, eos_token_id=self.tokenizer.eos_token_id)

    def validate(self, request: Request) -> None:
        """Raise RequestRejectedError for a request that can never fit (checked before queueing, with
        the scheduler's own admission rule) or whose parameters or token ids a step could not use."""
        check_admissible(request, self.scheduler.config)
        vocab_size = self.loaded.config.vocab_size
        check_sampling_params(request.sampling_params, vocab_size)
        if any(not 0 <= t < vocab_size for t in request.prompt_token_ids):
            raise RequestRejectedError(f"prompt token ids must be in [0, {vocab_size})", "prompt", "invalid_token_id")

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        if self.verify_hook is not None:
            self.verify_hook.forget(request_id)  # aborted requests produce no final output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """One engine step: schedule -> execute -> update. Returns per-request deltas.

        An exception anywhere in the step fails (or retries) the requests of the step, not the
        engine (``engine.step_faults``); it raises only ``EngineBrokenError`` (steps keep failing).
        """
        start = time.perf_counter()
        plan = None
        num_delivered: dict[str, int] = {}
        try:
            plan = self.scheduler.schedule()
            num_delivered = self._num_outputs(plan)
            runner_output = self.runner.execute(plan)
            outputs = self.scheduler.update_from_output(plan, runner_output)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the engine
            failed = self.faults.recover(exc, plan, num_delivered)
            if self.verify_hook is not None:
                for out in failed:
                    self.verify_hook.forget(out.request_id)
            return failed
        self.faults.on_success(plan)
        if plan.is_empty:
            return outputs
        self.last_step = StepStats(
            num_batched_tokens=plan.num_batched_tokens,
            num_decode_requests=sum(1 for s in plan.seqs if s.sample),
            duration_s=time.perf_counter() - start,
            num_preemptions=len(plan.preempted_request_ids),
            num_drafting=len(runner_output.drafts),
        )
        try:
            self._observe(plan, outputs)
        except Exception:  # noqa: BLE001 - statistics must not lose the step's tokens
            logger.exception("recording step statistics failed")
        return outputs

    def _num_outputs(self, plan) -> dict[str, int]:
        """Output tokens of each planned request before the step (what a rollback keeps)."""
        requests = (self.scheduler.get_request(s.request_id) for s in plan.seqs)
        return {r.request_id: r.num_output_tokens for r in requests if r is not None}

    def _observe(self, plan, outputs: list[EngineCoreOutput]) -> None:
        """Feed the online profile (drift correction) and the speculation counters."""
        hook = self.verify_hook
        step = self.last_step
        if hook is not None and hook.profile is not None and step.num_decode_requests:
            # The profile prices a step that drafts greedily for every request: convert the measured
            # step to that (add back what the gate saved, take off what sampled drafting cost extra).
            profile = hook.profile
            saved = profile.draft_time(step.num_decode_requests) - profile.draft_time(
                step.num_drafting, hook.last_sampled_fraction)
            profile.observe(plan.num_batched_tokens, step.num_decode_requests, max(step.duration_s + saved, 1e-6))
        decode = {s.request_id for s in plan.seqs if s.new_request is None and s.num_new_tokens - s.num_spec_tokens == 1}
        for out in outputs:
            if out.request_id in decode and self.drafter is not None and out.new_token_ids:
                self.spec_stats.record(out.num_draft_tokens, out.num_accepted_tokens, True)
                self.last_step.verified_per_request.append(out.num_draft_tokens)
                self.last_step.accepted_per_request.append(out.num_accepted_tokens)
            if out.finish_reason is not None and hook is not None:
                hook.forget(out.request_id)

    def generate_batch(self, prompts: list[list[int]], params, request_prefix: str = "batch") -> list[list[int]]:
        """Run prompts to completion (offline batch job; all submitted at once). Returns token ids.

        ``params`` is one SamplingParams for all or a list with one per prompt.
        """
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"{request_prefix}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, per_prompt, strict=False):
            request = self.make_request(rid, prompt, p)
            self.validate(request)
            self.add_request(request)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[rid] for rid in ids]
