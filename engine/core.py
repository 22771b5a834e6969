"""EngineCore: the synchronous step loop body, ``schedule -> execute -> update``.

No asyncio here: ``AsyncEngine`` calls ``step()`` from a worker thread and applies new requests and
aborts between steps, so the scheduler is never touched concurrently.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from torch import nn

from sparkserve.engine.config import EngineArgs, resolve_device
from sparkserve.engine.cpu_plan import CpuPlan
from sparkserve.engine.graph_memory import GraphReserve, engine_graph_shapes, graph_reserve, kv_cache_budget
from sparkserve.engine.loader import LoadedModel, load_model
from sparkserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from sparkserve.engine.outputs import EngineStats, StepStats
from sparkserve.engine.parallel.executor import start_tensor_parallel
from sparkserve.engine.parallel.rank_runner import ModelBuild, RunnerSettings, load_for_rank
from sparkserve.engine.parallel.shard import shard_config
from sparkserve.engine.quant import DEFAULT_GEMV_MAX_TOKENS, Routing, quantize_linears_
from sparkserve.engine.sampling.mask import LogitsMask
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.factory import (
    effective_draft_vocab,
    load_default_or_given_drafter,
    make_controller,
)
from sparkserve.engine.spec_decode.speculator import Speculator
from sparkserve.engine.step_faults import EngineBrokenError, StepFaultHandler
from sparkserve.engine.structured.logits_mask import GrammarLogitsMask
from sparkserve.engine.throughput_probe import load_or_measure_profile, make_step_fn, profile_key
from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.kv_events import KVEventPublisher
from sparkserve.scheduler.outputs import EngineCoreOutput
from sparkserve.scheduler.policy.controller import SpeculationController, StepObservation
from sparkserve.scheduler.policy.spec import parse_policy
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.request import Request
from sparkserve.scheduler.request_rules import check_admissible, check_sampling_params
from sparkserve.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN = 8192


def _dtype_name(args: EngineArgs, loaded: LoadedModel | None) -> str:
    """The compute dtype without a plan: ``--dtype``, or for ``auto`` the loaded model's (bf16 if none)."""
    if args.dtype != "auto":
        return args.dtype
    if loaded is not None and loaded.model.embed_tokens.weight.dtype == torch.float32:
        return "float32"
    return "bfloat16"


class EngineCore:
    """Owns the scheduler and the model runner; one ``step()`` at a time.

    Args:
        args: engine arguments.
        loaded: an already loaded model (tests share one load), or None to load ``args.model``.
        drafter: a ``Drafter`` to use instead of the one ``args`` names.
        profile: the throughput profile (None: ``--profile`` or measured / cached at start-up).
        logits_mask: the logits-mask hook (constrained decoding), or None.
        build: a picklable ``() -> (LoadedModel, Drafter | None)`` used instead of ``loaded`` / ``drafter``;
            under tensor parallelism every worker calls it too (default: load ``args.model``).
    """

    def __init__(
        self, args: EngineArgs, loaded: LoadedModel | None = None, drafter: Drafter | None = None,
        profile: ThroughputProfile | None = None, logits_mask: LogitsMask | None = None,
        build: ModelBuild | None = None,
    ) -> None:
        self.args = args
        if build is not None:
            loaded, drafter = build()
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.plan = None  # the CPU plan (engine/cpu_plan.py): measured at first start on the CPU
        if loaded is None:
            self.device = torch.device(resolve_device(args.device))
            self.plan = self._cpu_plan()
        self.dtype_name = self.plan.dtype if self.plan is not None else _dtype_name(args, loaded)
        # which path serves each quantised linear call, per row count (engine/quant.py: asked per call)
        self.routing = (Routing.up_to(args.quant_gemv_max_tokens) if args.quant_gemv_max_tokens is not None
                        else self.plan.routing() if self.plan is not None else Routing.up_to(DEFAULT_GEMV_MAX_TOKENS))
        dtype = torch.bfloat16 if self.dtype_name == "bfloat16" else torch.float32
        if loaded is None:  # the LM head by the plan's own entry for it, if any
            head = self.plan.lm_head_routing() if self.plan is not None and args.quant_gemv_max_tokens is None else None
            loaded = load_model(args.model, dtype=dtype, device=self.device, quantization=args.quantization,
                                gemv_max_tokens=self.routing, lm_head_routing=head)
        else:  # a shared, already loaded model decides the device
            self.device = loaded.model.embed_tokens.weight.device
        self.loaded = loaded
        config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_name = args.served_model_name or self.loaded.name
        self.max_model_len = min(args.max_model_len or _DEFAULT_MAX_MODEL_LEN, config.max_position_embeddings)
        if drafter is None:
            drafter = load_default_or_given_drafter(args, self.loaded, dtype)
            if args.quantization == "int4" and self.device.type == "cpu":  # its decoder layers, by the same routing
                quantize_linears_(getattr(getattr(drafter, "dspark", drafter), "layers", nn.ModuleList()), self.routing)
        self.drafter = drafter
        self.graph_reserve: GraphReserve | None = None  # the step graphs' reserve when it sized the KV cache
        num_blocks = args.num_kv_blocks
        if num_blocks is None:
            per_block = kv_cache_bytes_per_block(shard_config(config, args.tensor_parallel_size), args.block_size,
                                                 dtype)  # one rank's KV heads
            if drafter is not None:
                per_block += drafter.context_bytes_per_block(args.block_size, dtype)
            num_blocks = max(1, self._kv_cache_bytes(dtype) // per_block)
        self.num_blocks = num_blocks
        if logits_mask is None:  # structured outputs: SamplingParams.grammar
            logits_mask = GrammarLogitsMask(lambda: self.tokenizer.grammar_compiler, config.vocab_size)
        if args.tensor_parallel_size > 1:
            self.runner = start_tensor_parallel(
                args.tensor_parallel_size, self.loaded, drafter,
                build or functools.partial(load_for_rank, args, self.dtype_name, self.routing, self.device.type),
                RunnerSettings(num_blocks, args.block_size, self.dtype_name, args.max_num_seqs, self.max_model_len,
                               args.seed, args.unseeded_coupling, args.attention_backend),
                self.device, logits_mask, args.num_threads)
        else:
            speculator = None
            if drafter is not None:
                speculator = Speculator(drafter, num_blocks, args.block_size, dtype, args.max_num_seqs,
                                        args.lazy_drafter_context)
            self.runner = ModelRunner(
                self.loaded.model, config, num_blocks, args.block_size, dtype, device=self.device,
                speculator=speculator, attention_backend=args.attention_backend, max_num_seqs=args.max_num_seqs,
                max_model_len=self.max_model_len, engine_seed=args.seed, mask=logits_mask,
                unseeded_coupling=args.unseeded_coupling, compile=args.compile,
                step_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                batch_invariant=args.batch_invariant_on(self.device.type))
            if args.warm_up_kernels:  # CUDA with the Triton kernels: compile_check's list, then the step graphs
                self.runner.warm_up_kernels()
                _log_graph_memory(self.graph_reserve, self.runner.graph_memory_bytes)
        if self.runner.compiled:
            self.runner.warm_up_compile(make_step_fn(self.runner, num_blocks))
        try:  # the start-up probe steps every tensor-parallel rank: a failure must stop the workers
            self.controller = self._make_controller(profile)
        except BaseException:
            self.close()
            raise
        gamma = drafter.num_speculative_tokens if drafter is not None else 0
        self.kv_events = (KVEventPublisher(args.kv_events_endpoint, args.kv_events_topic,
                                           replay_endpoint=args.kv_events_replay_endpoint)
                          if args.kv_events_endpoint else None)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=args.block_size,
                num_kv_blocks=num_blocks,
                num_lookahead_tokens=gamma,
                shuffle_blocks=args.shuffle_blocks,
                seed=args.seed,
                long_prefill_token_threshold=args.long_prefill_token_threshold,
                max_num_partial_prefills=args.max_num_partial_prefills,
                max_long_partial_prefills=args.max_long_partial_prefills,
                enable_prefix_caching=args.enable_prefix_caching,
                cache_extra_key=f"{drafter.name}@{effective_draft_vocab(args)}" if drafter is not None else "",
            ),
            speculation=self.controller,
            kv_event_listener=self.kv_events.listener if self.kv_events is not None else None,
        )
        self.faults = StepFaultHandler(self.scheduler)
        self.last_step: StepStats | None = None
        logger.info(
            "engine ready: model=%s dtype=%s kv_blocks=%d (block_size=%d) max_model_len=%d",
            self.model_name, self.dtype_name, num_blocks, args.block_size, self.max_model_len,
        )

    def _make_controller(self, profile: ThroughputProfile | None) -> SpeculationController | None:
        """The scheduler's speculation collaborator for ``--verify-policy`` (None without a drafter),
        measuring (or loading the cached) throughput profile when the policy needs one."""
        args = self.args
        if self.drafter is None:
            return None
        policy = parse_policy(args.verify_policy or "dspark")
        if policy.needs_profile and profile is None:
            profile = load_or_measure_profile(self.runner, self.num_blocks, self.profile_key(),
                                              args.max_num_batched_tokens, args.max_num_seqs, path=args.profile_path)
        if policy.needs_profile and args.draft_gate and not profile.has_draft_time:
            logger.warning("drafting gate off: the throughput profile has no drafter times (measured before "
                           "they were recorded); re-measure it with `sparkserve profile --out PATH`")
        return make_controller(args, self.drafter, profile)

    def close(self) -> None:
        """Stop the tensor-parallel workers (no-op without tensor parallelism). Idempotent."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def _kv_cache_bytes(self, dtype: torch.dtype) -> int:
        """The KV cache's memory: ``kv_cache_memory_gb`` if given; else 1 GiB on the CPU and on CUDA
        ``gpu_memory_utilization`` of the device minus what is in use (weights) and the peak of a
        profiling forward at the largest step (vLLM's rule)."""
        args = self.args
        if args.kv_cache_memory_gb is not None:
            return int(args.kv_cache_memory_gb * (1 << 30))
        if self.device.type != "cuda":
            return 1 << 30
        from sparkserve.engine.throughput_probe import activation_peak_bytes

        free, total = torch.cuda.mem_get_info(self.device)
        peak = activation_peak_bytes(self.loaded.model, args.max_num_batched_tokens, dtype, self.device)
        if _step_graphs_on(args):  # what the step graphs will hold (engine/graph_memory.py)
            shapes = engine_graph_shapes(self.loaded.config, args.block_size, args.max_num_seqs, self.max_model_len,
                                         dtype, self.drafter)
            self.graph_reserve = graph_reserve(shapes, peak, args.max_num_batched_tokens)
        return kv_cache_budget(total, total - free, args.gpu_memory_utilization, peak,
                               _split_scratch_reserve(self.loaded.config, args, self.drafter), self.graph_reserve)

    def _cpu_plan(self) -> CpuPlan | None:
        """The CPU plan (cached, else measured; logged as a table) on the CPU with ``--cpu-plan``; None
        elsewhere. ``--dtype auto`` lets it choose the dtype; an explicit ``--quant-gemv-max-tokens``
        overrides its row cap (the plan is still logged)."""
        args = self.args
        if self.device.type != "cpu" or not args.cpu_plan:
            return None
        from sparkserve.engine.cpu_plan import PLAN_FORMAT_VERSION, cpu_signature, lossy_paths_allowed
        from sparkserve.engine.cpu_plan_measure import (
            available_memory_bytes,
            lm_head_planes,
            load_or_measure_plan,
            read_model_config,
        )
        from sparkserve.kernels import int4_cpu

        config, gguf = read_model_config(args.model)
        dtypes = ("float32", "bfloat16") if args.dtype == "auto" else (args.dtype,)
        key = {"kind": "cpu_plan", "model": args.model or "default", "dtypes": ",".join(dtypes),
               "quantization": args.quantization, "max_rows": args.max_num_batched_tokens,
               "num_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": cpu_signature().key(),
               "lossy_paths": lossy_paths_allowed(),
               "int4_kernel": int4_cpu.build_dir().name if int4_cpu.load() else "none",  # new kernel: re-measure
               "plan_format": PLAN_FORMAT_VERSION}  # its own cache file: older code never reads a newer plan
        invariant = args.batch_invariant_on("cpu")
        if invariant:  # one batch-invariant path serves every bucket (engine/batch_invariant.py)
            key["batch_invariant"] = 1
        plan = load_or_measure_plan(config, key, dtypes, args.quantization, gguf, args.max_num_batched_tokens,
                                    memory_budget_bytes=available_memory_bytes(), batch_invariant=invariant,
                                    lm_head_planes=lm_head_planes(args.model, args.quantization))
        if args.dtype == "auto":
            logger.info("compute dtype %s chosen by measurement (text differs between dtypes)", plan.dtype)
        return plan

    def profile_key(self) -> dict[str, str | int]:
        """What a cached throughput profile of this engine is valid for (model, dtype, device and tensor-parallel
        size, drafter and its draft vocabulary, step budgets, threads)."""
        args = self.args
        drafter = f"{args.drafter or 'default'}@{effective_draft_vocab(args)}"
        if args.speculative_method != "dspark":
            drafter = f"{args.speculative_method}{'+global' if args.suffix_global else ''}:{drafter}"
        device = "cpu" if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        if self.runner.graphs is not None:  # graph-served steps follow the bucket staircase
            device += "+graphs"
        if args.tensor_parallel_size > 1:  # every rank's step, measured together (per-rank threads below)
            device += f"+tp{args.tensor_parallel_size}"
        return profile_key(self.model_name, self.dtype_name, drafter, args.max_num_batched_tokens,
                           args.max_num_seqs, torch.get_num_threads(), device, quantization=self.quantization_key(),
                           compiled=self.runner.compiled, plan=self.plan.summary() if self.plan is not None else "")

    def quantization_key(self) -> str:
        """What the loaded weights run on: ``none`` or the kept kinds (``gguf``, ``int8``, ``int4``) with
        the routing of their calls, e.g. ``gguf@int4_gemv<=4`` (engine/quant.py)."""
        kind = getattr(self.loaded.model, "quantization", "none")
        return kind if kind == "none" else f"{kind}@{self.routing.summary()}"

    @property
    def num_speculative_tokens(self) -> int:
        """gamma of the drafter, 0 without one."""
        return self.scheduler.config.num_lookahead_tokens

    def stats(self, step: StepStats | None = None) -> EngineStats:
        """A typed snapshot for metrics (no tensors; read on the event loop after a step): the live
        gauges and totals, with ``step`` (the step just run, ``last_step``) or None (no step ran)."""
        scheduler = self.scheduler
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.kv_cache_usage,
            step=step,
            num_speculative_tokens=self.num_speculative_tokens,
            controller=self.controller.stats() if self.controller is not None else None,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
        )

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

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """One engine step: schedule -> execute -> update. Returns per-request deltas; the step's stats
        record is ``last_step`` afterwards (None for an empty or failed step).

        An exception anywhere in the step fails (or retries) the requests of the step, not the
        engine (``sparkserve.engine.step_faults``); it raises only ``EngineBrokenError`` (steps keep failing).
        With ``--kv-events-endpoint``, what the step did to the prefix cache is published afterwards.
        """
        try:
            return self._step()
        finally:
            if self.kv_events is not None:
                self.kv_events.flush()

    def _step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        self.last_step = None
        plan = None
        num_delivered: dict[str, int] = {}
        try:
            plan = self.scheduler.schedule()
            scheduled = time.perf_counter()
            num_delivered = self._num_outputs(plan)
            runner_output = self.runner.execute(plan)
            executed = time.perf_counter()
            outputs, scheduler_stats = self.scheduler.update_from_output(plan, runner_output)
        except EngineBrokenError:  # tensor parallelism: the ranks are out of step, no retry can help
            raise
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the engine
            return self.faults.recover(exc, plan, num_delivered)
        self.faults.on_success(plan)
        if plan.is_empty:
            return outputs
        end = time.perf_counter()
        step = self.last_step = StepStats(scheduler_stats, duration_s=end - start, schedule_s=scheduled - start,
                                          execute_s=executed - scheduled, update_s=end - executed)
        if self.controller is not None:
            spec = scheduler_stats.spec_decoding
            try:
                self.controller.observe_step(StepObservation(
                    scheduler_stats.num_batched_tokens, scheduler_stats.num_decode_requests,
                    scheduler_stats.num_drafting, step.duration_s, spec.num_draft_tokens if spec else 0,
                    spec.num_accepted_tokens if spec else 0))
            except Exception:  # noqa: BLE001 - statistics must not lose the step's tokens
                logger.exception("recording step statistics failed")
        return outputs

    def _num_outputs(self, plan) -> dict[str, int]:
        """Output tokens of each planned request before the step (what a rollback keeps)."""
        requests = (self.scheduler.get_request(s.request_id) for s in plan.seqs)
        return {r.request_id: r.num_output_tokens for r in requests if r is not None}

    def generate_batch(self, prompts: list[list[int]], params, request_prefix: str = "batch",
                       steps: list[StepStats] | None = None) -> list[list[int]]:
        """Run prompts to completion (offline batch job; all submitted at once). Returns token ids.

        ``params`` is one SamplingParams for all or a list with one per prompt; ``steps``, when given,
        receives the stats record of every non-empty step (``SpecDecodingStats.merge`` sums them).
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
            if steps is not None and self.last_step is not None:
                steps.append(self.last_step)
        return [tokens[rid] for rid in ids]


def _step_graphs_on(args: EngineArgs) -> bool:
    """Whether the runner on CUDA will serve steps through graphs (``ModelRunner``'s ``step_graphs`` rule)."""
    return args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and args.attention_backend in ("auto", "triton"))


def _log_graph_memory(reserve: GraphReserve | None, measured: int) -> None:
    """The step graphs' reserve against what their capture took (``torch.cuda.memory_reserved`` growth);
    a warning when the capture took more (the KV cache then eats the activations' room)."""
    if reserve is None or not measured:
        return
    log = logger.warning if measured > reserve.total else logger.info
    log("step graphs: %.1f MiB reserved before sizing the KV cache, their capture took %.1f MiB",
        reserve.total / 2**20, measured / 2**20)


def _split_scratch_reserve(config, args: EngineArgs, drafter: Drafter | None) -> int:  # noqa: ANN001
    """Bytes of the Triton attention's split-KV scratch at its largest, kept out of the KV cache (issue 26):
    every running request in the short tile group with its most rows (``SHORT_ROWS_MAX / G`` queries, at
    least ``1 + gamma``) at ``MAX_SPLITS`` (an upper bound: the heuristic splits only small groups)."""
    from sparkserve.kernels.attention_metadata import SHORT_ROWS_MAX, split_scratch_bytes

    group = config.num_attention_heads // config.num_key_value_heads
    gamma = drafter.num_speculative_tokens if drafter is not None else 0
    rows = args.max_num_seqs * max(1 + gamma, SHORT_ROWS_MAX // group)
    return split_scratch_bytes(rows, config.num_attention_heads, config.head_dim)
