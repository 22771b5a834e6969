"""ModelRunner: owns every tensor (weights, paged KV cache, persistent batch, drafts) and runs one step.

The scheduler decides *what* runs and who drafts; the runner only executes a ``SchedulerOutput``:
1. apply the schedule's diff to the persistent batch and build the flat inputs (``engine/input_batch.py``);
2. run the target once over the ragged batch (prefill chunks, decode tokens, verify blocks);
3. store every row's target features in the drafter's context cache;
4. verify (or plainly sample, l_r = 0) the sequences that reached the end of their known tokens
   (``engine/spec_decode/verifier.py``);
5. draft the next block for the sequences the scheduler marked ``draft``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import new_kv_cache
from engine.input_batch import InputBatch
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampling.mask import LogitsMask
from engine.spec_decode.draft_store import DraftStore
from engine.spec_decode.rejection import DraftProbs, RaggedDrafts
from engine.spec_decode.speculator import Speculator
from engine.spec_decode.verifier import Verifier, VerifyInput, VerifyOutput
from scheduler.outputs import DraftProposal, RunnerOutput, ScheduledSeq, SchedulerOutput


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
        max_num_seqs / max_model_len: size of the persistent batch.
        engine_seed: mixed into unseeded requests' random streams.
        mask: the logits-mask hook (grammars), or None.
        unseeded_coupling: verify unseeded sampled requests by Gumbel coupling (``Verifier``).
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
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        engine_seed: int = 0,
        mask: LogitsMask | None = None,
        unseeded_coupling: bool = False,
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
        gamma = speculator.gamma if speculator is not None else 0
        max_len = (max_model_len or config.max_position_embeddings) + gamma + 1
        self.batch = InputBatch(max_num_seqs, max_len, block_size, config.vocab_size, self.device, engine_seed)
        self.drafts = DraftStore()
        self.verifier = Verifier(mask, unseeded_coupling)
        self.mask = mask

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step. Returns the emitted tokens and next drafts per request (Python values)."""
        for rid in (*out.finished_request_ids, *out.preempted_request_ids):
            self.drafts.drop(rid)
            if self.mask is not None:
                self.mask.release(rid)
        self.batch.apply(out)
        result = RunnerOutput()
        if not out.seqs:
            return result
        inputs = self.batch.prepare(out.seqs)
        aux_ids = self.speculator.target_layer_ids if self.speculator is not None else ()
        hidden, aux = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attention, aux_ids)
        if self.speculator is not None:
            self.speculator.add_context(aux, inputs.positions, inputs.slot_mapping)
        sample_seqs = [out.seqs[i] for i in inputs.sample_index]
        for seq in out.seqs:
            if not seq.sample:
                self.batch.record(seq, (), 0)
        if not sample_seqs:
            return result
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))  # [N, V] fp32
        verified = self.verifier.verify(self._verify_input(sample_seqs, logits))
        for i, seq in enumerate(sample_seqs):
            self.batch.record(seq, verified.token_ids[i], verified.num_accepted[i])
            result.sampled_token_ids[seq.request_id] = verified.token_ids[i]
            if verified.logprobs[i] is not None:
                result.logprobs[seq.request_id] = verified.logprobs[i]
        if self.speculator is not None:
            self._draft(sample_seqs, verified, result)
        return result

    def _verify_input(self, seqs: Sequence[ScheduledSeq], logits: torch.Tensor) -> VerifyInput:
        """Drafts from the scheduler (``ScheduledSeq.spec_token_ids``), their q from the draft store."""
        rids = tuple(s.request_id for s in seqs)
        device = logits.device
        dense: list[torch.Tensor | None] = []
        for seq in seqs:
            if not seq.spec_token_ids or seq.spec_draft_id is None:
                self.drafts.drop(seq.request_id)  # drafts not verified this step are stale after it
                dense.append(None)
                continue
            stored = self.drafts.take(seq.request_id, seq.spec_draft_id, seq.spec_token_ids)
            dense.append(None if stored.probs is None else stored.probs[: seq.num_spec_tokens])
        flat = [t for s in seqs for t in s.spec_token_ids]
        drafts = RaggedDrafts(torch.tensor(flat, dtype=torch.int64, device=device),
                              tuple(s.num_spec_tokens for s in seqs))
        return VerifyInput(
            request_ids=rids, logits=logits, drafts=drafts, draft_probs=_draft_probs(seqs, dense, device),
            sampling=self.batch.sampling_metadata(rids),
            first_positions=torch.tensor([s.start_pos + s.num_known_tokens for s in seqs], device=device),
            output_token_ids=[self.batch.requests[rid].output_token_ids for rid in rids],
        )

    def _draft(self, seqs: Sequence[ScheduledSeq], verified: VerifyOutput, result: RunnerOutput) -> None:
        """Draft the next block for the sequences the scheduler marked ``draft``; q goes to the store."""
        spec = self.speculator
        assert spec is not None
        rows = [i for i, s in enumerate(seqs) if s.draft]
        if not rows:
            return
        rids = [seqs[i].request_id for i in rows]
        states = [self.batch.requests[rid] for rid in rids]
        sampling = self.batch.sampling_metadata(rids)
        coupled = self.verifier.coupled(sampling)
        mask_fn = None
        if self.mask is not None and any(self.mask.constrained(rid) for rid in rids):
            mask = self.mask

            def mask_fn(row: int, prefix: Sequence[int]) -> torch.Tensor | None:
                rid = rids[row]
                return mask.allowed(rid, states[row].output_token_ids, prefix) if mask.constrained(rid) else None

        histories = [self.batch.history(rid) for rid in rids] if spec.drafter.needs_token_history else None
        anchors = torch.tensor([verified.token_ids[i][-1] for i in rows], dtype=torch.int64, device=self.device)
        out = spec.propose(anchors, [st.num_computed for st in states], [st.block_ids for st in states],
                           sampling, coupled, histories, mask_fn)
        tokens = out.token_ids.tolist()
        confidences = out.confidences.float().tolist() if out.confidences is not None else None
        free = {row: f for f, row in enumerate(r for r in range(len(rows)) if not sampling.greedy[r] and not coupled[r])}
        for row, rid in enumerate(rids):
            n = out.num_tokens[row] if out.num_tokens is not None else len(tokens[row])
            if n == 0:
                self.drafts.drop(rid)
                continue
            probs = out.draft_probs[free[row]] if row in free and out.draft_probs is not None else None
            draft_id = self.drafts.put(rid, tuple(tokens[row][:n]), probs)
            conf = tuple(confidences[row][:n]) if confidences is not None else ()
            result.drafts[rid] = DraftProposal(tuple(tokens[row][:n]), conf, draft_id, spec.drafter.name)


def _draft_probs(seqs: Sequence[ScheduledSeq], dense: list[torch.Tensor | None],
                 device: torch.device) -> DraftProbs | None:
    """q rows of every draft: the stored q of freely sampled drafts, one-hot for the rest."""
    if not any(s.spec_token_ids for s in seqs):
        return None
    one_hot = torch.tensor([d is None for s, d in zip(seqs, dense, strict=True) for _ in s.spec_token_ids],
                           dtype=torch.bool, device=device)
    shapes = [d for d in dense if d is not None]
    if not shapes:
        return DraftProbs(None, one_hot)
    vocab = shapes[0].shape[-1]
    rows = [d if d is not None else torch.zeros(s.num_spec_tokens, vocab, device=device)
            for s, d in zip(seqs, dense, strict=True) if s.spec_token_ids]
    return DraftProbs(torch.cat(rows), one_hot)
