"""EngineCore: the synchronous step loop body, ``schedule -> execute -> update``.

No asyncio here: ``AsyncEngine`` calls ``step()`` from a worker thread and applies new requests and
aborts between steps, so the scheduler is never touched concurrently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.config import EngineArgs
from engine.loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from scheduler.config import SchedulerConfig
from scheduler.errors import RequestRejectedError
from scheduler.outputs import EngineCoreOutput
from scheduler.request import Request
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
    """

    num_batched_tokens: int = 0
    num_decode_requests: int = 0
    duration_s: float = 0.0


class EngineCore:
    """Owns the scheduler and the model runner; one ``step()`` at a time.

    Args:
        args: engine arguments.
        loaded: an already loaded model (tests share one load), or None to load ``args.model``.
    """

    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None) -> None:
        self.args = args
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.loaded = loaded if loaded is not None else load_model(args.model, dtype=dtype)
        config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_name = args.served_model_name or self.loaded.name
        self.max_model_len = min(args.max_model_len or _DEFAULT_MAX_MODEL_LEN, config.max_position_embeddings)
        num_blocks = args.num_kv_blocks
        if num_blocks is None:
            per_block = kv_cache_bytes_per_block(config, args.block_size, dtype)
            num_blocks = max(1, int(args.kv_cache_memory_gb * (1 << 30)) // per_block)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=args.block_size,
                num_kv_blocks=num_blocks,
                shuffle_blocks=args.shuffle_blocks,
                seed=args.seed,
            )
        )
        self.runner = ModelRunner(self.loaded.model, config, num_blocks, args.block_size, dtype)
        self.last_step = StepStats()
        logger.info(
            "engine ready: model=%s dtype=%s kv_blocks=%d (block_size=%d) max_model_len=%d",
            self.model_name, args.dtype, num_blocks, args.block_size, self.max_model_len,
        )

    def make_request(self, request_id: str, prompt_token_ids: list[int], params) -> Request:
        """Build a scheduler request with the model's EOS."""
        return Request(request_id, list(prompt_token_ids), params, eos_token_id=self.tokenizer.eos_token_id)

    def validate(self, request: Request) -> None:
        """Raise RequestRejectedError for a request that can never fit (checked before queueing)."""
        total = request.num_prompt_tokens + request.sampling_params.max_tokens
        if request.num_prompt_tokens == 0:
            raise RequestRejectedError("the prompt is empty", param="prompt", code="empty_prompt")
        if total > self.max_model_len:
            raise RequestRejectedError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({request.num_prompt_tokens} in the messages, "
                f"{request.sampling_params.max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="max_tokens", code="context_length_exceeded",
            )
        blocks = -(-total // self.args.block_size)
        if blocks > self.num_blocks:
            raise RequestRejectedError(
                f"the request needs {blocks} KV blocks at full length but the cache holds {self.num_blocks}",
                param="max_tokens", code="kv_cache_too_small",
            )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """One engine step: schedule -> execute -> update. Returns per-request deltas."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return self.scheduler.update_from_output(plan, self.runner.execute(plan))
        runner_output = self.runner.execute(plan)
        outputs = self.scheduler.update_from_output(plan, runner_output)
        self.last_step = StepStats(
            num_batched_tokens=plan.num_batched_tokens,
            num_decode_requests=sum(1 for s in plan.seqs if s.sample),
            duration_s=time.perf_counter() - start,
        )
        return outputs

    def generate_batch(self, prompts: list[list[int]], params, request_prefix: str = "batch") -> list[list[int]]:
        """Run prompts to completion (offline batch job; all submitted at once). Returns token ids.

        ``params`` is one SamplingParams for all or a list with one per prompt.
        """
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"{request_prefix}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, per_prompt):
            request = self.make_request(rid, prompt, p)
            self.validate(request)
            self.add_request(request)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[rid] for rid in ids]
