"""Measuring the CPU plan at first start (engine/cpu_plan.py selects from what this times) and caching it.

The timed work is the model's own decoder-layer linears (``linear_shapes``: QKV, O, gate-up, down, each
once per layer), on random weights of those shapes, for every row bucket, candidate dtype and registry
path. Candidates are timed in alternation within a bucket (one call each per round, so a load change on a
shared machine hits all of them alike) and each keeps its fastest round (interference only adds time).
From ``SMALL_BUCKET`` rows on, a non-dense candidate more than ``prune_ratio`` times slower than the best
of its bucket is not timed at larger buckets (the fp32 int4 kernel is scalar: ~30x slower); dense paths are always timed (the fallback
every bucket needs). Buckets above ``SMALL_BUCKET`` rows get two timed rounds.

The LM head gets its own entry (``CpuPlan.lm_head``) where it is served quantised (a GGUF file's Q4 / Q8_0
head under ``--quantization auto`` in bf16): its shape with its plane count, timed the same way in the
chosen dtype at buckets up to ``LM_HEAD_MAX_ROWS`` (it runs only on the sampled rows; beyond: dense).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from sparkserve.engine.cpu_plan import (
    DTYPES,
    PATHS,
    PLAN_FORMAT_VERSION,
    CpuPlan,
    MemoryBudget,
    candidate_paths,
    row_buckets,
    select_lm_head,
    select_plan,
)
from sparkserve.engine.models.config import ModelConfig

logger = logging.getLogger(__name__)

SMALL_BUCKET = 64  # buckets up to this many rows get ``repeats`` rounds, larger ones one
LM_HEAD_MAX_ROWS = 64  # the LM head's largest bucket (sampled rows: 1 + drafts per decode request)
Build = Callable[[str, torch.Tensor, torch.dtype], Callable[[torch.Tensor], torch.Tensor]]  # (path, w, dtype)


def linear_shapes(config: ModelConfig) -> tuple[tuple[int, int, int], ...]:
    """(out features N, in features K, calls per forward) of the decoder-layer linears (LM head left out:
    it runs only on the verify rows)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return ((q + 2 * kv, d, layers), (d, q, layers), (2 * inter, d, layers), (d, inter, layers))


def weight_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of the dense weights in ``dtype`` (decoder linears, embedding, LM head if untied)."""
    size = 2 if dtype == "bfloat16" else 4
    params = sum(n * k * c for n, k, c in linear_shapes(config)) + config.vocab_size * config.hidden_size
    if not config.tie_word_embeddings:
        params += config.vocab_size * config.hidden_size
    return params * size


def measure_timings(
    shapes: Sequence[tuple[int, int, int]], buckets: Sequence[int], candidates: Sequence[tuple[str, str]],
    repeats: int = 3, prune_ratio: float = 4.0, progress: bool = False, seed: int = 0, build: Build | None = None,
) -> dict[tuple[str, str, int], float]:
    """Seconds of one forward's decoder-layer linears per (dtype, path, rows) for each candidate
    (dtype, path): the fastest round of one layer's calls, times the layer count. Candidates whose
    ``build`` (default: the registry's, ``PATHS[path].build``) raises RuntimeError are left out."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, k, generator=gen) * k ** -0.5 for n, k, _ in shapes]
    build = build or (lambda path, w, dtype: PATHS[path].build(w, dtype))
    fns: dict[tuple[str, str], list] = {}
    for dtype, path in candidates:
        try:
            fns[(dtype, path)] = [build(path, w, getattr(torch, dtype)) for w in weights]
        except RuntimeError as exc:
            logger.info("plan: path %s unavailable in %s (%s)", path, dtype, exc)
    dtypes = sorted({d for d, _ in candidates})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(buckets), desc="planning linears", unit="bucket")
    timings: dict[tuple[str, str, int], float] = {}
    live = list(fns)
    with torch.inference_mode():
        for m in buckets:
            xs = {d: [torch.randn(m, k, generator=gen).to(getattr(torch, d)) for _, k, _ in shapes] for d in dtypes}
            samples: dict[tuple[str, str], list[float]] = {c: [] for c in live}
            for round_ in range(1 + (repeats if m <= SMALL_BUCKET else 2)):  # round 0 warms up
                for cand in live:
                    start = time.perf_counter()
                    for fn, x in zip(fns[cand], xs[cand[0]], strict=True):
                        fn(x)
                    if round_:
                        samples[cand].append(time.perf_counter() - start)
            per_call = {c: min(s) for c, s in samples.items()}  # min: a stall on a shared machine only adds
            for (dtype, path), t in per_call.items():
                timings[(dtype, path, m)] = t * _calls_scale(shapes)
            fastest = min(per_call.values())
            if m >= SMALL_BUCKET:  # small buckets are cheap and decide the cap: never pruned on one noisy round
                live = [c for c in live if c[1] == "dense" or per_call[c] <= prune_ratio * fastest]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return timings


def _calls_scale(shapes: Sequence[tuple[int, int, int]]) -> int:
    """Every shape is called once per layer: one timed layer x the layer count."""
    return max(c for _, _, c in shapes)


def lm_head_planes(model: str | None, quantization: str) -> int:
    """The int4 planes the LM head is served with: a GGUF file's output head (or tied embedding) kept in
    blocks under ``--quantization auto`` (Q4_0 / Q4_1: one plane, Q8_0: two); 0 (dense) otherwise."""
    from sparkserve.engine.loader import default_model_path

    path = Path(model) if model is not None else default_model_path()
    if quantization != "auto" or not (path.is_file() and path.suffix == ".gguf"):
        return 0
    from sparkserve.engine.gguf_loader import open_gguf

    tensors = {t.name: t for t in open_gguf(path).tensors}
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    return 0 if head is None else {"Q4_0": 1, "Q4_1": 1, "Q8_0": 2}.get(head.tensor_type.name, 0)


def lm_head_build(planes: int) -> Build:
    """:func:`measure_timings`' build for the LM head: a weight of ``planes`` int4 planes (2: Q8_0's,
    engine/quant.py ``quantize_q8_planes``), packed and served as the engine serves it (``BlockQuant.pack``:
    a two-plane weight's ``int4_gemv`` runs the weight-stationary kernel where it is built)."""
    from sparkserve.engine.quant import Routing, quantize_int4, quantize_q8_planes

    def build(path: str, weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        if path == "dense":
            return PATHS["dense"].build(weight, dtype)
        block = quantize_q8_planes(weight) if planes == 2 else quantize_int4(weight, dtype)
        packed = block.pack(dtype, Routing.up_to(1 << 30, path))
        served = packed.routing.limits[0][1]
        return lambda x: packed(x, served)

    return build


def served_paths(paths: Sequence[str], planes: int) -> tuple[str, ...]:
    """``paths`` named as a weight of ``planes`` planes is served (engine/quant.py ``int4_formats``), each once."""
    from sparkserve.engine.quant import Routing, int4_formats

    served = (p if p == "dense" else int4_formats(Routing.up_to(1, p), planes).limits[0][1] for p in paths)
    return tuple(dict.fromkeys(served))


def measure_lm_head(config: ModelConfig, planes: int, dtype: str, paths: Sequence[str], max_rows: int,
                    progress: bool = False) -> tuple[dict[tuple[str, str, int], float], tuple[tuple[int, str], ...]]:
    """Time the LM head ([vocab, hidden], ``planes`` int4 planes) on ``paths`` in ``dtype`` at buckets up to
    ``min(max_rows, LM_HEAD_MAX_ROWS)``; returns (timings, the plan's LM-head entry)."""
    buckets = row_buckets(min(max_rows, LM_HEAD_MAX_ROWS))
    served = served_paths(paths, planes)
    timings = measure_timings(((config.vocab_size, config.hidden_size, 1),), buckets, [(dtype, p) for p in served],
                              progress=progress, build=lm_head_build(planes))
    return timings, select_lm_head(timings, buckets, dtype, served)


def read_model_config(model: str | None) -> tuple[ModelConfig, bool]:
    """(ModelConfig, is a GGUF file) of a GGUF file or HF folder (None: the embedded model), without
    loading weights."""
    from sparkserve.engine.loader import default_model_path

    path = Path(model) if model is not None else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        from sparkserve.engine.gguf_loader import gguf_model_config, open_gguf

        return gguf_model_config(open_gguf(path)), True
    return ModelConfig.from_hf_config(json.loads((path / "config.json").read_text(encoding="utf-8"))), False


def available_memory_bytes() -> int | None:
    """Physical memory free now (bytes), or None where ``os.sysconf`` cannot tell."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def plan_cache_path(key: Mapping[str, object], cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/<sha256 of the key, 16 hex>.json``; default ``$XDG_CACHE_HOME/sparkserve/plans``."""
    from sparkserve.scheduler.profile import profile_cache_path

    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = base / "sparkserve" / "plans"
    return profile_cache_path(key, cache_dir)


def load_or_measure_plan(
    config: ModelConfig, key: Mapping[str, object], dtypes: Sequence[str], quantization: str, gguf: bool,
    max_rows: int, memory_budget_bytes: int | None = None, batch_invariant: bool = False, progress: bool = True,
    lm_head_planes: int = 0,
) -> CpuPlan:
    """The cached plan for ``key`` (which must name the machine: ``cpu_signature``), else measure, select,
    cache and return it. A cached file whose stored key differs from ``key`` is measured again (never
    reused silently). Logs the plan's table.

    Args:
        dtypes: the candidate compute dtypes ("float32" / "bfloat16"; ``--dtype auto`` gives both).
        quantization: the engine's ``--quantization`` (which paths exist: ``candidate_paths``).
        gguf: the model is a GGUF file (``auto`` keeps its blocks).
        max_rows: the step's token budget (largest bucket).
        memory_budget_bytes: memory the weights may take (None: unbounded).
        batch_invariant: restrict to one batch-invariant path (issue 24; ``candidate_paths``).
        lm_head_planes: the LM head's int4 planes (:func:`lm_head_planes`; 0: dense, no entry of its own).
            Outside the batch-invariant mode, a quantised head served in bf16 gets its own entry
            (:func:`measure_lm_head`).
    """
    path = plan_cache_path(key)
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(dict(key), default=str)):
            logger.warning("CPU plan cache %s was measured for another key %s: measuring again", path, data.get("key"))
        elif data["plan"].get("version") != PLAN_FORMAT_VERSION:
            logger.info("CPU plan cache %s has format %s, not %s: measuring again", path, data["plan"].get("version"),
                        PLAN_FORMAT_VERSION)
        else:
            plan = CpuPlan.from_dict(data["plan"])
            logger.info("CPU plan from cache %s: %s", path, plan.summary())
            return plan
    buckets = row_buckets(max_rows)
    candidates = [(d, p) for d in dtypes for p in candidate_paths(quantization, d, gguf, batch_invariant)]
    paths = tuple(dict.fromkeys(p for _, p in candidates))
    start = time.perf_counter()
    timings = measure_timings(linear_shapes(config), buckets, candidates, progress=progress)
    memory = None
    if memory_budget_bytes is not None:
        quant = max(weight_bytes(config, d) for d in dtypes) // 4  # int4 codes + scales <= a quarter of fp32
        memory = MemoryBudget(memory_budget_bytes, {d: weight_bytes(config, d) for d in DTYPES}, quant)
    # in the mode the candidates are invariant and compute the same bits (candidate_paths: int4_gemv and
    # int4_ws only where they agree), so each bucket may take its fastest
    plan = select_plan(timings, buckets, dtypes, paths, memory=memory, batch_invariant=batch_invariant,
                       invariant_paths=frozenset(paths) if batch_invariant else None,
                       same_bits=frozenset(paths) if batch_invariant else frozenset())
    if lm_head_planes and not batch_invariant and plan.dtype == "bfloat16":
        head_timings, head = measure_lm_head(config, lm_head_planes, plan.dtype,
                                             [p for d, p in candidates if d == plan.dtype], max_rows, progress)
        plan = dataclasses.replace(plan, lm_head=head, lm_head_timings=head_timings)
    logger.info("CPU plan measured in %.1f s: %s\n%s", time.perf_counter() - start, plan.summary(), plan.table())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": dict(key), "plan": plan.to_dict()}, default=str, indent=1))
    tmp.replace(path)
    return plan

