"""ModelRunner: owns every tensor (weights, paged KV cache, sampler state) and runs one step.

The scheduler decides *what* runs; the runner only executes a ``SchedulerOutput``:
1. flatten the ragged batch (prefill chunks, decode tokens, verify blocks) into ``[T]`` input ids and
   positions, with a slot mapping and block tables for paged attention;
2. run the target once;
3. sample (or verify drafts with the rejection sampler) for the sequences that reached the end of
   their known tokens;
4. run the drafter for the next step (when one is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention import build_attention_metadata, new_kv_cache
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler, SamplingMetadata, to_token_logprobs
from engine.spec.speculator import Speculator
from engine.spec.verify_step import verify_and_draft
from scheduler.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput
from scheduler.sampling_params import SamplingParams


@dataclass
class RequestState:
    """Per-request state kept by the runner between steps.

    Attributes:
        params: the request's sampling parameters.
        generator: seeded generator (``None`` = global RNG).
        output_token_ids: generated tokens so far (penalties).
    """

    params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: tuple[int, ...] = ()


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize


class ModelRunner:
    """Executes scheduler plans on the target model with a paged KV cache.

    Args:
        model: the target model.
        config: its configuration.
        num_blocks: KV blocks in the paged cache.
        block_size: tokens per block.
        dtype: KV cache dtype (same as the model's).
        device: torch device.
        speculator: drafter wrapper (None = no speculation).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        speculator: Speculator | None = None,
    ) -> None:
        self.model = model
        self.speculator = speculator
        self.config = config
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_caches = [
            new_kv_cache(num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype, self.device)
            for _ in range(config.num_hidden_layers)
        ]
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}

    # ------------------------------------------------------------------ state
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.requests.pop(rid, None)
            if self.speculator is not None:
                self.speculator.drop(rid)
        for rid in out.preempted_request_ids:
            if self.speculator is not None:
                self.speculator.drop(rid)
        for seq in out.seqs:
            new = seq.new_request
            if new is None:
                continue
            if self.speculator is not None:
                self.speculator.drop(seq.request_id)
            state = self.requests.get(seq.request_id)
            if state is None:
                generator = None
                if new.sampling_params.seed is not None:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(new.sampling_params.seed)
                state = RequestState(new.sampling_params, generator)
                self.requests[seq.request_id] = state
            state.output_token_ids = list(new.output_token_ids)
            state.prompt_token_ids = new.prompt_token_ids

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step. Returns the tokens sampled per request (python ints)."""
        self._update_states(out)
        result = RunnerOutput()
        if not out.seqs:
            return result
        seqs = out.seqs
        input_ids, positions = self._flatten(seqs)
        meta = build_attention_metadata(
            q_lens=[s.num_new_tokens for s in seqs],
            start_positions=[s.start_pos for s in seqs],
            kv_lens=[s.end_pos for s in seqs],
            block_tables=[s.block_table for s in seqs],
            block_size=self.block_size,
            device=self.device,
        )
        aux_ids = self.speculator.target_layer_ids if self.speculator is not None else ()
        hidden, aux = self.model(input_ids, positions, self.kv_caches, meta, aux_ids)  # [T, d], [T, m*d]
        if self.speculator is not None:
            verify_and_draft(self, seqs, meta, hidden, aux, result)
            return result
        sample_seqs = [s for s in seqs if s.sample]
        if not sample_seqs:
            return result
        rows, offset = [], 0
        for s in seqs:
            offset += s.num_new_tokens
            if s.sample:
                rows.append(offset - 1)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [R, V] fp32
        self.sample(sample_seqs, logits, result)
        return result

    def _flatten(self, seqs: tuple[ScheduledSeq, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        for s in seqs:
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.end_pos))
        return (
            torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            torch.tensor(pos, dtype=torch.int64, device=self.device),  # [T]
        )

    def sample(self, seqs: list[ScheduledSeq], logits: torch.Tensor, result: RunnerOutput) -> None:
        """One token per sequence from its logits row ([R, V] fp32) with the request's sampling
        parameters; appends it to the request state and to ``result`` (with logprobs when asked)."""
        states = [self.requests[s.request_id] for s in seqs]
        meta = SamplingMetadata.build(
            [st.params for st in states],
            [st.generator for st in states],
            [st.output_token_ids for st in states],
            logits.shape[-1],
            self.device,
        )
        sampled = self.sampler(logits, meta)
        token_ids = sampled.token_ids.tolist()
        logprobs = to_token_logprobs(sampled, [st.params.logprobs for st in states])
        for seq, state, token, logprob in zip(seqs, states, token_ids, logprobs, strict=True):
            state.output_token_ids.append(token)
            result.sampled_token_ids[seq.request_id] = [token]
            if logprob is not None:
                result.logprobs[seq.request_id] = [logprob]
