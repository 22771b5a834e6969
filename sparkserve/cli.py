"""The ``sparkserve`` console script.

    sparkserve serve [flags]              serve the OpenAI API (and /metrics)
    sparkserve profile --out PATH [flags] measure the throughput profile SPS(B, R) and save it
    sparkserve replicas [flags] -- [serve flags]  N replicas behind vllm-router (sparkserve.server.replicas)
    sparkserve bench [flags]              serving benchmark against OpenAI-compatible servers
                                          (loadtests.bench; needs httpx, tqdm, matplotlib)
    sparkserve gen-data | train-drafter | calibrate-drafter | eval-drafter   (from sparkserve.train.cli)

Engine flags map 1:1 onto :class:`sparkserve.engine.config.EngineArgs`. The engine (and torch) is imported
only when a command runs; ``serve`` and ``profile`` do not import the training code at all.

Graceful shutdown and engine death: ``sparkserve.server.http_server.serve``. HTTP hardening
(``sparkserve.server.http_guard``): request bodies above ``--max-body-bytes`` get 413, bodies slower than
``--body-read-timeout`` 408, a connection that does not complete its request headers within
``--timeout-keep-alive`` seconds is closed, and ``--limit-concurrency`` caps open connections + tasks
(503 past it). The API key may come from ``SPARKSERVE_API_KEY`` instead of the command line (where
``ps`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sparkserve.engine.config import EngineArgs
from sparkserve.server.app import build_app
from sparkserve.server.http_guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from sparkserve.server.http_server import serve

logger = logging.getLogger("sparkserve")


ENGINE_COMMANDS = ("serve", "profile")
NO_TRAIN_COMMANDS = (*ENGINE_COMMANDS, "bench", "replicas")  # commands whose parser skips the training code


def _add_engine_args(s: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve`` and ``profile`` (mapped by :func:`engine_args_from`)."""
    d = EngineArgs()
    s.add_argument(
        "--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2-135M-Instruct)"
    )
    s.add_argument("--served-model-name", default=None, help="model name clients use (default: from --model)")
    s.add_argument("--chat-template", default=None,
                   help="jinja chat template file replacing the model's (tools: a template that renders `tools`)")
    s.add_argument("--tool-call-parser", default="hermes", choices=("hermes",),
                   help="how tool calls are prompted and parsed (<tool_call>{json}</tool_call>)")
    s.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "auto"),
                   help="auto: the faster on this CPU, measured at first start (default: %(default)s)")
    s.add_argument(
        "--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb,
        help="paged KV cache size, GiB (default: 1 on the CPU, --gpu-memory-utilization on CUDA)"
    )
    s.add_argument(
        "--num-kv-blocks", type=int, default=None, help="explicit KV block count (overrides memory)"
    )
    s.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    s.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="most requests running at once")
    s.add_argument(
        "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="token budget per step"
    )
    s.add_argument(
        "--max-model-len", type=int, default=None, help="context length cap (default: model's, <= 8192)"
    )
    s.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests, help="beyond it: 429")
    s.add_argument("--max-waiting-tokens", type=int, default=d.max_waiting_tokens,
                   help="prompt tokens in the waiting queue beyond which new requests get 429")
    s.add_argument("--long-prefill-token-threshold", type=int, default=d.long_prefill_token_threshold,
                   help="prompts with more tokens left are long; prefill chunks are capped at this "
                        "(default: max-num-batched-tokens / 4)")
    s.add_argument("--max-num-partial-prefills", type=int, default=d.max_num_partial_prefills,
                   help="most requests mid-prefill at once")
    s.add_argument("--max-long-partial-prefills", type=int, default=d.max_long_partial_prefills,
                   help="most long prompts mid-prefill at once (shorter ones pass them meanwhile)")
    s.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    s.add_argument("--seed", type=int, default=d.seed, help="global seed for requests without one")
    s.add_argument("--drafter", default=None,
                   help="drafter checkpoint ('none': alias of --speculative-method none)")
    s.add_argument("--drafter-kind", default=None, choices=CHECKPOINT_METHODS,
                   help="alias: --speculative-method KIND for the family of --drafter PATH (with hybrid: the "
                        "family of its checkpoint drafter)")
    s.add_argument("--num-draft-tokens", type=int, default=d.num_draft_tokens,
                   help="drafts per step for a draft-model drafter (default: %(default)s)")
    s.add_argument("--draft-vocab-size", type=int, default=None,
                   help="restrict DSpark/DFlash drafts to token ids below this (default: 8192 for the shipped drafter)")
    s.add_argument("--verify-policy", default=None,
                   help="fixed:K | dspark | dspark-async (default: dspark when a drafter is loaded); 'none' keeps "
                        "the drafter loaded and verifies nothing (a diagnostic: --speculative-method none turns "
                        "speculation off)")
    s.add_argument("--no-draft-gate", dest="draft_gate", action="store_false",
                   help="with dspark policies, draft for every request every step (default: skip the drafter "
                        "for requests whose drafts are not worth its cost at the current load)")
    s.add_argument("--speculative-method", default=None, choices=("none", *CHECKPOINT_METHODS, "suffix", "hybrid"),
                   help="none (no speculation); drafts from the --drafter checkpoint (dspark, dflash, or a "
                        "draft-model LM), training-free suffix matches, or per request and step the better of "
                        "a DSpark / DFlash checkpoint and suffix matches (hybrid) (default: dspark)")
    s.add_argument("--suffix-global", action="store_true",
                   help="suffix drafts also match recent outputs of other requests (off: tenants share it)")
    s.add_argument("--no-online-calibration", dest="online_calibration", action="store_false",
                   help="rank drafts by the drafter's own confidences (default: corrected online from outcomes)")
    s.add_argument("--no-spec-guard", dest="spec_guard", action="store_false",
                   help="with dspark policies, never back speculation off (default: off for a while when "
                        "verify steps measurably lose to plain decode steps)")
    s.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default: %(default)s: CUDA when available)")
    s.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="on CUDA, the share of device memory for weights, activations and KV cache (default: %(default)s)")
    s.add_argument("--attention-backend", default=d.attention_backend, choices=("auto", "torch", "triton"),
                   help="Triton kernels on CUDA, torch on the CPU (default: %(default)s)")
    s.add_argument("--cuda-graphs", default=d.cuda_graphs, choices=("auto", "on", "off"),
                   help="decode and uniform verify steps replay CUDA graphs at padded batch buckets (auto: on "
                        "CUDA with the Triton kernels; off = every step eager) (default: %(default)s)")
    s.add_argument("--quantization", default=d.quantization, choices=("auto", "none", "int8", "int4"),
                   help="weight-only quantisation on the CPU: auto keeps a GGUF file's Q4_0/Q4_1/Q8_0 blocks "
                        "(HF checkpoints dense), none dequantises, int8/int4 quantise the linears at load "
                        "(default: %(default)s)")
    s.add_argument("--quant-gemv-max-tokens", type=int, default=d.quant_gemv_max_tokens,
                   help="linears over at most this many rows use the quantised kernel, larger ones the dense "
                        "GEMM on the same weights (default: the CPU plan's measured crossover)")
    s.add_argument("--cpu-plan", dest="cpu_plan", action="store_true", default=d.cpu_plan,
                   help="time the linear paths for this model on this CPU at first start (cached; default)")
    s.add_argument("--no-cpu-plan", dest="cpu_plan", action="store_false", help="fixed paths, no timing")
    s.add_argument("--compile", dest="compile", action="store_true", default=d.compile,
                   help="torch.compile the decoder layers (attention eager; warmed at start-up)")
    s.add_argument("--no-compile", dest="compile", action="store_false", help="eager step (default)")
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="shard the model over this many worker processes (gloo on the CPU, NCCL on CUDA; "
                        "docs/tensor_parallel.md)")
    s.add_argument("--batch-invariant", dest="batch_invariant", action="store_true", default=d.batch_invariant,
                   help="every reducing op computes each row in one fixed order: a request's text does not depend "
                        "on the batch, the prefill chunking or the prefix cache (default on the CPU; docs/batch_invariance.md)")
    s.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="the fastest path per step, whose last bits may depend on the batch")
    s.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="reuse the KV of full blocks computed before (default)")
    s.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute every prompt")
    s.add_argument("--kv-events-endpoint", default=None, metavar="ENDPOINT",
                   help="publish the prefix cache's KV events (vLLM format) on a ZMQ PUB socket bound here, "
                        "e.g. tcp://*:5557, for vllm-router --policy kv_aware (docs/scale_out.md)")
    s.add_argument("--kv-events-topic", default="", help="topic frame of every KV event message (default: none)")
    s.add_argument("--kv-events-replay-endpoint", default=None, metavar="ENDPOINT",
                   help="serve recent KV event batches again on a ZMQ ROUTER socket bound here (e.g. tcp://*:5558)")
    s.add_argument("--unseeded-coupling", action="store_true",
                   help="verify unseeded sampled requests by Gumbel-max coupling like seeded ones (default: "
                        "rejection sampling, which accepts more drafts; see docs/benchmarks.md)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _add_train_subcommands(sub: argparse._SubParsersAction) -> None:
    """``sparkserve.train.cli.add_subcommands(sub)`` when the training package provides it (imports torch)."""
    try:
        from sparkserve.train import cli as train_cli
    except ImportError as exc:
        logger.debug("training subcommands unavailable: %r", exc)
        return
    add_subcommands = getattr(train_cli, "add_subcommands", None)
    if callable(add_subcommands):
        add_subcommands(sub)


def build_parser(include_train: bool = True) -> argparse.ArgumentParser:
    """The ``sparkserve`` argument parser: ``serve``, ``profile`` and (``include_train``) the
    training subcommands of :mod:`sparkserve.train.cli`."""
    parser = argparse.ArgumentParser(prog="sparkserve", description="OpenAI-compatible LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over the OpenAI API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _add_engine_args(s)
    s.add_argument("--api-key", default=os.environ.get("SPARKSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SPARKSERVE_API_KEY)")
    s.add_argument("--profile", default=None, help="throughput profile file to reuse")
    s.add_argument("--default-max-tokens", type=int, default=1024, help="max_tokens when a request omits it")
    s.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM"
    )
    s.add_argument("--max-total-tokens", type=int, default=65536,
                   help="most tokens one request may ask for (n x max_tokens, summed over prompts)")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (413 past it)")
    s.add_argument("--body-read-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds for a request body to arrive (408 after)")
    s.add_argument("--timeout-keep-alive", type=int, default=5,
                   help="seconds for request headers to arrive and for idle keep-alive connections")
    s.add_argument("--limit-concurrency", type=int, default=None,
                   help="most open connections + tasks (503 past it; default: no limit)")
    s.add_argument("--cors-allow-origin", action="append", default=[],
                   help="allow CORS from this origin (repeatable; default: no CORS headers)")
    s.add_argument("--strict-openai-fields", action="store_true",
                   help="400 for OpenAI request fields this server ignores (service_tier, store, ...; "
                        "default: accept them with a log warning)")
    s.add_argument(
        "--metrics-profile-every",
        type=int,
        default=100,
        help="republish the online-corrected throughput profile on /metrics every N engine steps",
    )
    p = sub.add_parser("profile", help="measure the throughput profile SPS(B, R) and save it")
    _add_engine_args(p)
    p.add_argument("--out", required=True, help="where to write the profile (JSON); also cached")
    p.add_argument("--remeasure", action="store_true", help="ignore a cached profile and measure again")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per grid cell (median)")
    b = sub.add_parser("bench", help="benchmark OpenAI-compatible servers (TTFT, TPOT, ITL, throughput, goodput)")
    from sparkserve.loadtests.bench.cli import add_arguments as add_bench_arguments  # argparse only: no torch

    add_bench_arguments(b)
    from sparkserve.server.replicas import add_arguments as add_replicas_arguments  # argparse only: no torch

    add_replicas_arguments(sub.add_parser("replicas", help="N local `serve` replicas behind vllm-router"))
    if include_train:
        _add_train_subcommands(sub)
    return parser


CHECKPOINT_METHODS = ("dspark", "dflash", "draft-model")
"""Speculative methods that draft from a ``--drafter`` checkpoint (its family, ``EngineArgs.drafter_kind``)."""


def speculation_from(ns: argparse.Namespace) -> tuple[str | None, str, str]:
    """``(drafter, speculative_method, drafter_kind)`` of ``EngineArgs`` from the one flag that says how
    to speculate, ``--speculative-method none|dspark|dflash|draft-model|suffix|hybrid``, and its documented
    aliases: ``--drafter none`` = ``--speculative-method none``; ``--drafter-kind KIND`` =
    ``--speculative-method KIND`` (or, with ``hybrid``, the family of its checkpoint drafter). ``--drafter
    none`` wins over any method, as it always did.

    Raises:
        ValueError: ``--speculative-method`` names one checkpoint family and ``--drafter-kind`` another.
    """
    method = getattr(ns, "speculative_method", None)
    kind = getattr(ns, "drafter_kind", None)
    drafter = getattr(ns, "drafter", None)
    if method in CHECKPOINT_METHODS and kind is not None and kind != method:
        raise ValueError(f"--speculative-method {method} contradicts --drafter-kind {kind}")
    if method == "none" or drafter == "none":
        return "none", "dspark", kind or "dspark"
    if method in CHECKPOINT_METHODS:
        return drafter, "dspark", method
    return drafter, method or "dspark", kind or "dspark"


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Map parsed ``serve`` / ``profile`` flags onto :class:`EngineArgs` (ValueError on bad values)."""
    drafter, method, kind = speculation_from(ns)
    return EngineArgs(
        model=ns.model,
        served_model_name=ns.served_model_name,
        dtype=ns.dtype,
        kv_cache_memory_gb=ns.kv_cache_memory_gb,
        num_kv_blocks=ns.num_kv_blocks,
        block_size=ns.block_size,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len,
        max_waiting_requests=ns.max_waiting_requests,
        max_waiting_tokens=ns.max_waiting_tokens,
        long_prefill_token_threshold=ns.long_prefill_token_threshold,
        max_num_partial_prefills=ns.max_num_partial_prefills,
        max_long_partial_prefills=ns.max_long_partial_prefills,
        num_threads=ns.num_threads,
        seed=ns.seed,
        drafter=drafter,
        drafter_kind=kind,
        num_draft_tokens=ns.num_draft_tokens,
        draft_vocab_size=ns.draft_vocab_size,
        verify_policy=ns.verify_policy,
        profile_path=getattr(ns, "profile", None),
        draft_gate=getattr(ns, "draft_gate", True),
        unseeded_coupling=getattr(ns, "unseeded_coupling", False),
        speculative_method=method,
        suffix_global=getattr(ns, "suffix_global", False),
        online_calibration=getattr(ns, "online_calibration", True),
        spec_guard=getattr(ns, "spec_guard", True),
        enable_prefix_caching=getattr(ns, "enable_prefix_caching", True),
        device=getattr(ns, "device", "auto"),
        gpu_memory_utilization=getattr(ns, "gpu_memory_utilization", 0.9),
        attention_backend=getattr(ns, "attention_backend", "auto"),
        cuda_graphs=getattr(ns, "cuda_graphs", "auto"),
        quantization=getattr(ns, "quantization", "auto"),
        quant_gemv_max_tokens=getattr(ns, "quant_gemv_max_tokens", None),
        cpu_plan=getattr(ns, "cpu_plan", True),
        compile=getattr(ns, "compile", False),
        tensor_parallel_size=getattr(ns, "tensor_parallel_size", 1),
        kv_events_endpoint=getattr(ns, "kv_events_endpoint", None),
        kv_events_topic=getattr(ns, "kv_events_topic", ""),
        kv_events_replay_endpoint=getattr(ns, "kv_events_replay_endpoint", None),
        batch_invariant=getattr(ns, "batch_invariant", None),
    )


def set_chat_template(tokenizer: object, path: str) -> None:
    """Replace the tokenizer's chat template with the jinja file at ``path`` (``--chat-template``)."""
    with open(path, encoding="utf-8") as f:
        tokenizer.chat_template = f.read()  # type: ignore[attr-defined]
    tokenizer.__dict__.pop("_template", None)  # the compiled template is cached


def run_serve(ns: argparse.Namespace, engine_args: EngineArgs) -> None:
    """``sparkserve serve``: build the engine and its metrics, then serve until a signal."""
    from sparkserve.engine.async_engine import AsyncEngine  # imports torch: only when actually serving
    from sparkserve.server.metrics_glue import build_metrics

    engine = AsyncEngine.from_args(engine_args)
    if getattr(ns, "chat_template", None):
        set_chat_template(engine.tokenizer, ns.chat_template)
    metrics = build_metrics(engine, engine_args.max_num_batched_tokens, ns.metrics_profile_every)
    app = build_app(
        engine,
        api_key=ns.api_key,
        served_model_name=ns.served_model_name,
        default_max_tokens=ns.default_max_tokens,
        max_total_tokens=ns.max_total_tokens,
        metrics=metrics,
        max_body_bytes=ns.max_body_bytes,
        body_timeout_s=ns.body_read_timeout,
        cors_origins=ns.cors_allow_origin,
        strict_openai_fields=ns.strict_openai_fields,
    )
    serve(app, host=ns.host, port=ns.port, drain_timeout_s=ns.drain_timeout, log_level=ns.log_level,
          timeout_keep_alive_s=ns.timeout_keep_alive, limit_concurrency=ns.limit_concurrency)


def run_profile(ns: argparse.Namespace, engine_args: EngineArgs) -> Path:
    """``sparkserve profile``: measure SPS(B, R) on this machine and write it to ``--out``.

    Uses the cache key ``serve`` uses for the same flags, so a later ``serve`` (same model, dtype,
    drafter, budgets and threads) finds the measured profile in the cache without ``--profile``.
    """
    import dataclasses

    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.throughput_probe import load_or_measure_profile
    from sparkserve.scheduler.profile.measure import profile_cache_path

    # The verify policy "none" keeps EngineCore from profiling at construction: we do it below.
    core = EngineCore(dataclasses.replace(engine_args, verify_policy="none", profile_path=None))
    key = core.profile_key()
    cache = profile_cache_path(key)
    if ns.remeasure:
        cache.unlink(missing_ok=True)
    try:  # under tensor parallelism every rank steps through the probe
        profile = load_or_measure_profile(
            core.runner,
            core.num_blocks,
            key,
            engine_args.max_num_batched_tokens,
            engine_args.max_num_seqs,
            progress=True,
            repeats=ns.repeats,
            cut=False,  # the explicit command measures every cell; a first start measures the cut grid
        )
    finally:
        core.close()
    out = Path(ns.out)
    profile.save(out)
    print(f"throughput profile written to {out} (cache: {cache})")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sparkserve`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(include_train=not (args and args[0] in NO_TRAIN_COMMANDS))
    ns = parser.parse_args(args)
    if ns.command == "bench":
        try:
            from sparkserve.loadtests.bench.cli import run as run_bench
            from sparkserve.loadtests.bench.client import httpx  # noqa: F401 - the one hard dependency of the bench
        except ImportError as exc:
            parser.error(f"sparkserve bench needs the bench extras (pip install 'sparkserve[bench]'): {exc}")
        try:
            run_bench(ns)
        except ValueError as exc:
            parser.error(str(exc))
        return
    if ns.command == "replicas":
        from sparkserve.server.replicas import run as run_replicas

        sys.exit(run_replicas(ns))
    if ns.command not in ENGINE_COMMANDS:
        ns.func(ns)  # a training subcommand
        return
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_args = engine_args_from(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.command == "profile":
        if ns.repeats < 1:
            parser.error("--repeats must be >= 1")
        run_profile(ns, engine_args)
        return
    if min(ns.default_max_tokens, ns.metrics_profile_every, ns.max_total_tokens, ns.max_body_bytes,
           ns.timeout_keep_alive) < 1 or ns.drain_timeout < 0 or ns.body_read_timeout <= 0:
        parser.error("--default-max-tokens, --metrics-profile-every, --max-total-tokens, --max-body-bytes and "
                     "--timeout-keep-alive must be >= 1, --drain-timeout >= 0, --body-read-timeout > 0")
    run_serve(ns, engine_args)


if __name__ == "__main__":
    main()
