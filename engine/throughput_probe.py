"""Start-up throughput profiling: SPS(B, R) of whole steps on the actual model, dtype and device.

A synthetic step for (B, R) runs what a real verify step runs: the target over B batch tokens split
across R decode sequences with a fixed context (paged attention included), the LM head over every
row (a verify step needs logits for all ``1 + l_r`` rows), and, with a drafter, one drafter
forward for the R requests. With a drafter, the drafter forward alone is also timed per R
(``draft_time_s``: what a step saves for each request the scheduler does not draft for). The result
is cached on disk keyed by model / dtype / device / settings.

Under tensor parallelism every rank runs each synthetic step together (``TensorParallelRunner.probe_timers``
broadcasts it): the sharded forward's all-reduces need every rank, and a served step costs what all ranks
stepping together cost, so the profile is rank 0's time of the whole group's step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from sparkserve.engine.attention import build_attention_metadata, build_step_metadata
from sparkserve.engine.model_runner import ModelRunner
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode.speculator import Speculator
from sparkserve.engine.step_graph import StepGraph
from sparkserve.scheduler.profile import ThroughputProfile, default_grid, measure_profile, profile_cache_path
from sparkserve.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class ProbeTimers(NamedTuple):
    """What the start-up probe times on one engine.

    Attributes:
        step: ``step(B, R) -> seconds`` of one synthetic step (:func:`make_step_fn`).
        draft: ``draft(R, sampled) -> seconds`` of one drafter forward (:func:`make_draft_fn`); None without
            a drafter.
    """

    step: Callable[[int, int], float]
    draft: Callable[[int, bool], float] | None


@runtime_checkable
class ProbedRunner(Protocol):
    """A runner that times the probe's steps itself (``TensorParallelRunner``: on every rank together)."""

    graphs: StepGraph | None
    speculator: Speculator | None

    def probe_timers(self, num_blocks: int) -> ProbeTimers: ...


def probe_timers(runner: ModelRunner | ProbedRunner, num_blocks: int) -> ProbeTimers:
    """The probe's timers: :func:`make_step_fn` / :func:`make_draft_fn` on a single-process runner, the
    runner's own (``ProbedRunner.probe_timers``) otherwise."""
    if isinstance(runner, ProbedRunner):
        return runner.probe_timers(num_blocks)
    draft = make_draft_fn(runner, num_blocks) if runner.speculator is not None else None
    return ProbeTimers(make_step_fn(runner, num_blocks), draft)


def _synthetic_tables(
    num_requests: int, context_len: int, extra: int, num_blocks: int, block_size: int
) -> tuple[int, list[tuple[int, ...]]]:
    """(context length, block tables) for R synthetic sequences of ``ctx + extra`` positions each:
    ``context_len`` if that fits ``num_blocks``, else shortened; tables wrap around the pool."""
    per_seq = -(-(context_len + extra) // block_size)
    ctx = context_len if per_seq * num_requests <= num_blocks else max(1, num_blocks // num_requests * block_size - extra)
    per_seq = -(-(ctx + extra) // block_size)
    return ctx, [tuple((i * per_seq + j) % num_blocks for j in range(per_seq)) for i in range(num_requests)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches return before the kernels end); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step_fn(runner: ModelRunner, num_blocks: int, context_len: int = 128,
                 use_graphs: bool = True) -> Callable[[int, int], float]:
    """``step_fn(B, R) -> seconds`` for ``measure_profile``; writes only to scratch KV slots.

    Timed as served: the attention metadata of the path the runner serves with (the Triton kernels' alone
    when they serve), and on CUDA synchronised before the clock starts and before it stops (otherwise the
    time would be the launches', not the kernels'). A decode or uniform verify cell (B = R * q, q a length
    the runner's ``StepGraph`` serves) runs through it, padded to its bucket as served (``use_graphs=False``:
    eager, for the graph-vs-eager comparison of scripts/gpu_check.py)."""
    block_size = runner.block_size

    @torch.inference_mode()
    def step(num_tokens: int, num_requests: int) -> float:
        q_lens = [num_tokens // num_requests + (1 if i < num_tokens % num_requests else 0) for i in range(num_requests)]
        ctx, tables = _synthetic_tables(num_requests, context_len, max(q_lens) + 16, num_blocks, block_size)
        device = runner.device
        synchronize(device)
        start = time.perf_counter()
        table_t = torch.tensor([list(t) for t in tables], dtype=torch.int64)
        positions = torch.cat([torch.arange(ctx, ctx + q) for q in q_lens])
        graphs = runner.graphs if use_graphs else None
        key = graphs.key_for(q_lens) if graphs is not None else None
        spec = runner.speculator
        if key is not None:  # served through the static buffers (a CUDA graph replay on CUDA)
            static = graphs.stage(graphs.step(key), torch.zeros(num_tokens, dtype=torch.int64), positions, table_t,
                                  [ctx + q for q in q_lens])
            hidden, aux = graphs.run(static)
            positions, slots = static.positions[:num_tokens], static.meta.slot_mapping[:num_tokens]
        else:
            meta = build_step_metadata(q_lens, [ctx] * num_requests, [ctx + q for q in q_lens], table_t, block_size,
                                       device, runner.batch.kernel_heads)
            ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
            positions, slots = positions.to(device), meta.slot_mapping
            aux_ids = spec.target_layer_ids if spec is not None else ()
            hidden, aux = runner.model(ids, positions, runner.kv_caches, meta, aux_ids)
        if spec is not None:  # a step drafting for all stores every row's features in the drafter's context cache
            extra = num_tokens - num_requests if spec.feed is not None else num_tokens  # lazy: R rows go with the draft
            if extra:
                spec.add_context(aux[:extra], positions[:extra], slots[:extra])
        # logits only for verify rows (<= gamma + 1 per request); the rest of B is prefill
        gamma = spec.gamma if spec is not None else 0
        runner.model.compute_logits(hidden[: min(num_tokens, num_requests * (gamma + 1))])
        if spec is not None:
            _synthetic_draft(runner, [ctx + q for q in q_lens], tables, sampled=False, use_graphs=use_graphs)
        synchronize(device)
        return time.perf_counter() - start

    return step


def make_draft_fn(runner: ModelRunner, num_blocks: int, context_len: int = 128) -> Callable[[int, bool], float]:
    """``draft_fn(R, sampled) -> seconds`` of one drafter forward (``propose``) for R requests whose
    context is ``context_len`` rows, greedy or sampled at T = 1 (a sampled block also draws from q per
    slot); writes only scratch slots. Raises ValueError without ``runner.speculator``."""
    spec = runner.speculator
    if spec is None:
        raise ValueError("make_draft_fn needs a runner with a drafter")
    block_size = runner.block_size

    @torch.inference_mode()
    def draft(num_requests: int, sampled: bool = False) -> float:
        ctx, tables = _synthetic_tables(num_requests, context_len, 1, num_blocks, block_size)
        starts = [ctx] * num_requests
        synchronize(runner.device)
        start = time.perf_counter()
        _synthetic_draft(runner, starts, tables, sampled)
        synchronize(runner.device)
        return time.perf_counter() - start

    return draft


def _synthetic_draft(runner: ModelRunner, starts: list[int], tables: list[tuple[int, ...]], sampled: bool,
                     use_graphs: bool = True) -> None:
    """One drafter forward for synthetic requests (greedy, or sampled at T = 1 without a seed), through the
    drafter's step graphs when the runner has them (as served) and ``use_graphs``. With the lazy context
    feed (``Speculator.feed``) a request's context rows are stored when it drafts, so drafting also stores
    one row per request here (its anchor's predecessor): the profile's drafter time then holds what a plain
    step saves by not drafting."""
    spec = runner.speculator
    assert spec is not None
    num_requests = len(starts)
    if spec.feed is not None and spec.target_layer_ids:
        bs = runner.block_size
        slots = torch.tensor([t[(s - 1) // bs] * bs + (s - 1) % bs for s, t in zip(starts, tables, strict=True)],
                             dtype=torch.int64, device=runner.device)
        width = len(spec.target_layer_ids) * runner.config.hidden_size
        spec.add_context(torch.zeros(num_requests, width, dtype=runner.kv_caches[0][0].dtype, device=runner.device),
                         torch.tensor(starts, dtype=torch.int64, device=runner.device) - 1, slots)
    params = SamplingParams(temperature=1.0 if sampled else 0.0)
    sampling = SamplingMetadata.build([params] * num_requests, list(range(num_requests)), [[]] * num_requests,
                                      runner.config.vocab_size, runner.device)
    histories = [[0] * (s + 1) for s in starts] if spec.drafter.needs_token_history else None
    spec.propose(torch.zeros(num_requests, dtype=torch.int64, device=runner.device),
                 torch.tensor(starts, dtype=torch.int64, device=runner.device), starts, tables, sampling,
                 (False,) * num_requests, histories, graphs=runner.draft_graphs if use_graphs else None)


def activation_peak_bytes(model, num_tokens: int, dtype: torch.dtype, device: torch.device) -> int:
    """Peak CUDA memory of one prefill forward over ``num_tokens`` tokens beyond what is allocated now
    (a temporary KV cache for them included): the activation reserve of the KV-cache sizing."""
    from sparkserve.engine.attention import new_kv_cache

    cfg = model.config
    block_size = 16
    num_blocks = -(-num_tokens // block_size)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        caches = [new_kv_cache(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
        meta = build_attention_metadata([num_tokens], [0], [num_tokens], [list(range(num_blocks))], block_size,
                                        device=device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        hidden, _ = model(ids, torch.arange(num_tokens, device=device), caches, meta)
        model.compute_logits(hidden[-256:])
        del caches, hidden
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return peak


def profile_key(model_name: str, dtype: str, drafter: str, max_num_batched_tokens: int, max_num_seqs: int,
                num_threads: int, device: str = "cpu", quantization: str = "none",
                compiled: bool = False, plan: str = "", machine: str | None = None) -> dict[str, str | int]:
    """What a cached profile is valid for (quantisation: ``EngineCore.quantization_key``; ``plan``:
    ``CpuPlan.summary()``; ``machine``: the CPU's model and instruction-set flags, default this machine's
    ``cpu_signature()``, so a profile measured on another CPU kind is never reused)."""
    from sparkserve.engine.cpu_plan import cpu_signature

    return {
        "model": model_name, "dtype": dtype, "device": device, "quantization": quantization,
        "compile": int(compiled),
        "drafter": drafter, "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
        "num_threads": num_threads, "torch": torch.__version__, "draft_time": 2 if drafter != "none" else 0,
        "machine": machine if machine is not None else cpu_signature().key(), "plan": plan,
    }


def load_or_measure_profile(
    runner: ModelRunner | ProbedRunner, num_blocks: int, key: dict, max_num_batched_tokens: int, max_num_seqs: int,
    path: str | None = None, progress: bool = True, repeats: int = 2, cut: bool = True,
) -> ThroughputProfile:
    """``--profile PATH`` if given; else the on-disk cache for ``key``; else measure and cache: with ``cut`` (a
    first start) the cut grid (``default_grid`` / ``measure_profile`` with ``cut``: fewer, shorter cells, the
    online profile correcting the rest), else every cell (``sparkserve profile``)."""
    if path is not None:
        given = ThroughputProfile.load(path)
        if not _same_key(given.key, key):
            logger.warning("--profile %s was measured for another machine or settings (%s; this engine: %s)",
                           path, dict(given.key), dict(key))
        return given
    cache = profile_cache_path(key)
    if cache.exists():
        cached = ThroughputProfile.load(cache)
        if _same_key(cached.key, key):
            logger.info("throughput profile from cache %s", cache)
            return cached
        logger.warning("throughput profile %s was measured for %s, not %s: measuring again", cache,
                       dict(cached.key), dict(key))
    buckets = runner.graphs.buckets if runner.graphs is not None else ()
    batch_grid, request_grid = default_grid(max_num_batched_tokens, max_num_seqs, buckets, cut=cut)
    logger.info("profiling SPS(B, R) over %d x %d cells%s (cached afterwards)", len(batch_grid), len(request_grid),
                " (cut grid: the online profile corrects the rest)" if cut else "")
    timers = probe_timers(runner, num_blocks)
    profile = measure_profile(timers.step, batch_grid, request_grid, repeats=repeats,
                              warmup=1, progress=progress, key=key, draft_fn=timers.draft, cut=cut)
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    profile.save(cache)
    return profile


def _same_key(stored: object, key: dict) -> bool:
    """Whether a stored profile's key is ``key`` (compared as JSON: tuples and lists alike)."""
    import json

    return json.loads(json.dumps(dict(stored), default=str)) == json.loads(json.dumps(dict(key), default=str))
