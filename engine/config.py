"""Engine configuration (frozen, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build an engine; the CLI maps flags 1:1 onto these fields.

    Attributes:
        model: local HF folder or GGUF file; ``None`` = the embedded SmolLM2-135M-Instruct.
        served_model_name: name reported by ``/v1/models`` (default: derived from ``model``).
        dtype: "float32" | "bfloat16" (weights, activations and KV cache) | "auto" (on the CPU the plan
            picks the faster by measurement, engine/cpu_plan.py; elsewhere bfloat16).
        kv_cache_memory_gb: memory for the paged KV cache (GiB), used when ``num_kv_blocks`` is None;
            None = 1 GiB on the CPU, ``gpu_memory_utilization`` on CUDA.
        num_kv_blocks: explicit number of KV blocks (overrides ``kv_cache_memory_gb``).
        block_size: tokens per KV block.
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: token budget of one step (prefill chunks + decode + verify tokens).
        max_model_len: context length cap (default: the model's, capped at 8192).
        max_waiting_requests: bounded waiting queue; past it new requests get 429.
        max_waiting_tokens: bound on the prompt tokens in the waiting queue (429 past it; a request
            arriving at an empty queue is always queued); None = no bound.
        long_prefill_token_threshold / max_num_partial_prefills / max_long_partial_prefills:
            chunked-prefill fairness (``sparkserve.scheduler.config.SchedulerConfig``): a long prefill takes at
            most its share of each step while decode rows and short prompts keep flowing.
        num_threads: torch intra-op threads (None = torch default).
        seed: global seed for requests without their own.
        drafter: path of a drafter checkpoint, "none" for no speculation, None = the default
            (the shipped drafter for the embedded model, none otherwise).
        drafter_kind: "dspark" | "dflash" | "draft-model".
        num_draft_tokens: drafts per step for the draft-model drafter.
        draft_vocab_size: restrict DSpark / DFlash drafts to token ids below this (the LM head over
            the full vocabulary dominates the drafter's cost); None = full vocabulary, or the shipped
            drafter's default for the embedded model.
        verify_policy: "none" | "fixed:K" | "dspark" | "dspark-async" (None = dspark when drafting).
        profile_path: throughput profile file to reuse (None = measure / cache at start-up).
        draft_gate: with dspark / dspark-async, skip the drafter forward for requests whose next
            drafts are not worth its cost at the current load (``sparkserve.scheduler.policy.dspark_planner.plan_drafting``).
        shuffle_blocks: hand out physical KV blocks in a random order (tests that paging is real).
        unseeded_coupling: verify unseeded sampled requests by Gumbel-max coupling (as seeded ones
            always are) instead of rejection sampling (``engine/spec_decode/verifier.py``).
        speculative_method: "dspark" (the ``drafter`` checkpoint), "suffix" (training-free suffix
            drafts) or "hybrid" (per request and step the better of the two).
        suffix_global: the suffix drafter also matches recent outputs of other requests (opt-in: one
            tenant's text could raise another's acceptance).
        online_calibration: correct draft confidences online from verification outcomes.
        spec_guard: with dspark / dspark-async, back speculation off while verify steps measurably emit
            fewer tokens per second than plain steps would (``sparkserve.scheduler.policy.guard``).
        lazy_drafter_context: store a request's rows in the drafter's context cache only when it drafts
            (``engine/spec_decode/context_feed.py``); False feeds every row every step.
        enable_prefix_caching: reuse the KV (and the drafter's context) of cached full blocks.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        gpu_memory_utilization: on CUDA, the fraction of device memory the engine may use; the KV
            cache gets what is left after the weights and a profiling forward (vLLM's flag). Used when
            neither ``num_kv_blocks`` nor an explicit ``kv_cache_memory_gb`` is given.
        attention_backend: "auto" (Triton kernels on CUDA, torch on the CPU), "torch" or "triton".
        quantization: weight-only quantisation (engine/quant.py): "auto" keeps a GGUF file's Q4_0 /
            Q4_1 / Q8_0 blocks quantised (HF checkpoints stay dense), "none" dequantises everything,
            "int8" / "int4" quantise the decoder-layer linears at load. CPU only ("auto" is dense elsewhere).
        quant_gemv_max_tokens: a linear over at most this many rows runs the quantised kernel, larger
            ones the dense GEMM on the same canonical weights; None = the CPU plan's measured crossover
            (4 without a plan).
        cpu_plan: on the CPU, time the linear paths and dtypes for the model's shapes at first start and
            serve each row bucket with the fastest (engine/cpu_plan.py; cached per machine).
        cuda_graphs: "auto" (decode and uniform verify steps replay CUDA graphs at padded batch buckets on
            CUDA with the Triton kernels, ``engine/step_graph.py``), "on" (also the same static-buffer path
            off CUDA under ``TRITON_INTERPRET=1``: tests) or "off" (every step eager; vLLM's --enforce-eager).
        warm_up_kernels: on CUDA with the Triton kernels, compile ``kernels/compile_check``'s list for the
            model and capture every step graph before serving (the server); off, both happen on first use
            (short in-process checks: scripts/gpu_check.py's smoke and exactness).
        tensor_parallel_size: ranks the target is sharded over (engine/parallel; docs/tensor_parallel.md).
        compile: torch.compile the decoder layers' bodies (attention stays eager); off by default
            because it measured no faster on this CPU (docs/benchmarks.md); eager fallback on failure.
        kv_events_endpoint: bind a ZMQ PUB socket there (e.g. ``tcp://*:5557``) and publish the prefix
            cache's KV events, one batch per step (scheduler/kv_events.py; a KV-aware router reads them);
            None: no events.
        kv_events_topic: the topic frame of every event message ("" = none).
        kv_events_replay_endpoint: bind a ROUTER socket there serving recent event batches again to a
            subscriber that missed some (scheduler/kv_events_replay.py); None: no replay.
        batch_invariant: every reducing op computes each row in one fixed order, so a request's text
            does not depend on the batch, the prefill chunking or the prefix cache
            (engine/batch_invariant.py, docs/batch_invariance.md). None (default): on where the mode holds
            and costs little, the CPU (:meth:`batch_invariant_on`; its cost: docs/benchmarks.md); True: on
            (``--batch-invariant``, also on CUDA); False: off (``--no-batch-invariant``).
    """

    model: str | None = None
    served_model_name: str | None = None
    dtype: str = "bfloat16"
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    max_waiting_requests: int = 512
    max_waiting_tokens: int | None = 131072
    long_prefill_token_threshold: int | None = None
    max_num_partial_prefills: int = 4
    max_long_partial_prefills: int = 1
    num_threads: int | None = None
    seed: int = 0
    drafter: str | None = None
    drafter_kind: str = "dspark"
    num_draft_tokens: int = 4
    draft_vocab_size: int | None = None
    verify_policy: str | None = None
    profile_path: str | None = None
    draft_gate: bool = True
    shuffle_blocks: bool = False
    unseeded_coupling: bool = False
    speculative_method: str = "dspark"
    suffix_global: bool = False
    online_calibration: bool = True
    spec_guard: bool = True
    lazy_drafter_context: bool = True
    enable_prefix_caching: bool = True
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"
    quantization: str = "auto"
    quant_gemv_max_tokens: int | None = None
    cpu_plan: bool = True
    cuda_graphs: str = "auto"
    warm_up_kernels: bool = True
    compile: bool = False
    tensor_parallel_size: int = 1
    kv_events_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_events_replay_endpoint: str | None = None
    batch_invariant: bool | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.batch_invariant:
            raise ValueError("--batch-invariant is not supported with --tensor-parallel-size > 1 (the all-reduce "
                             "order is not fixed)")
        if self.tensor_parallel_size > 1 and self.compile:
            raise ValueError("--compile is not supported with --tensor-parallel-size > 1")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"dtype must be float32, bfloat16 or auto, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_waiting_requests < 0:
            raise ValueError("max_waiting_requests must be >= 0")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens < 1:
            raise ValueError("max_waiting_tokens must be >= 1")
        if self.drafter_kind not in ("dspark", "dflash", "draft-model"):
            raise ValueError(f"unknown drafter_kind {self.drafter_kind!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.speculative_method not in ("dspark", "suffix", "hybrid"):
            raise ValueError(f"unknown speculative_method {self.speculative_method!r}: dspark, suffix or hybrid")
        if self.quantization not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"quantization must be auto, none, int8 or int4, got {self.quantization!r}")
        if self.quant_gemv_max_tokens is not None and self.quant_gemv_max_tokens < 0:
            raise ValueError("quant_gemv_max_tokens must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.batch_invariant and self.compile:
            raise ValueError("--batch-invariant runs the eager layers: it cannot be combined with --compile")


    def batch_invariant_on(self, device: str) -> bool:
        """Whether an engine on ``device`` (a resolved torch device type: "cpu" / "cuda") runs in batch-invariant
        mode: ``batch_invariant`` when set; by default on the CPU, unless ``--compile``, tensor parallelism or
        forced step graphs rule it out. Off by default on CUDA, whose linears (cuBLAS) are not invariant."""
        if self.batch_invariant is not None:
            return self.batch_invariant
        return (device == "cpu" and not self.compile and self.tensor_parallel_size == 1
                and self.cuda_graphs != "on")


def resolve_device(spec: str) -> str:
    """``EngineArgs.device`` -> a torch device string. Raises ValueError for CUDA without CUDA."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    return spec
