"""ModelRunner: owns every tensor (weights, paged KV cache, persistent batch, drafts) and runs one step.

The scheduler decides *what* runs and who drafts; the runner only executes a ``SchedulerOutput``:
1. apply the schedule's diff to the persistent batch and build the flat inputs (``engine/input_batch.py``);
2. run the target once over the ragged batch (prefill chunks, decode tokens, verify blocks);
3. store the target features of the rows of requests that draft (with any they left pending) in the drafter's
   context cache (``engine/spec_decode/context_feed.py``);
4. verify (or plainly sample, l_r = 0) the sequences that reached the end of their known tokens
   (``engine/spec_decode/verifier.py``);
5. draft the next block for the sequences the scheduler marked ``draft``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparkserve.engine.attention import new_kv_cache
from sparkserve.engine.batch_invariant import batch_invariant_mode
from sparkserve.engine.input_batch import InputBatch
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.sampling.logprobs import PromptLogprobs
from sparkserve.engine.sampling.mask import LogitsMask, RequestLogitsMask
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode.context_feed import FeedRows
from sparkserve.engine.spec_decode.draft_graph import draft_step_graph, table_tensor
from sparkserve.engine.spec_decode.draft_store import DraftStore
from sparkserve.engine.spec_decode.drafter import DraftOutput
from sparkserve.engine.spec_decode.rejection import DraftProbs, RaggedDrafts
from sparkserve.engine.spec_decode.speculator import Speculator
from sparkserve.engine.spec_decode.verifier import Verifier, VerifyInput, VerifyOutput, emitted_tokens
from sparkserve.engine.step_graph import StepGraph, default_buckets, graph_q_lens
from sparkserve.kernels.common import interpreting
from sparkserve.scheduler.outputs import DraftProposal, RunnerOutput, ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


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
        attention_backend: "auto" (Triton kernels on CUDA), "torch" or "triton" (CUDA only).
        batch_invariant: run every step in batch-invariant mode (``--batch-invariant``).
        compile: torch.compile the decoder layers' bodies (engine/compile_step.py; call
            :meth:`warm_up_compile` before serving).
        step_graphs: run decode and uniform verify steps through ``engine/step_graph.py`` (CUDA graphs at
            padded buckets; the same static buffers eagerly off CUDA); None = on CUDA with the Triton kernels.
            The KV cache then holds one extra block, the pad rows' scratch block. A DSpark drafter's block
            forward is served the same way (``engine/spec_decode/draft_graph.py``).
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
        attention_backend: str = "auto",
        compile: bool = False,
        step_graphs: bool | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        self.speculator = speculator
        self.config = config
        self.block_size = block_size
        self.device = torch.device(device)
        use_kernels = attention_backend == "triton" or (attention_backend == "auto" and self.device.type == "cuda")
        graphs = (step_graphs if step_graphs is not None
                  else use_kernels and self.device.type == "cuda" and not batch_invariant)
        if graphs and not use_kernels:
            raise ValueError("step graphs need the Triton attention kernels (attention_backend triton)")
        if graphs and batch_invariant:  # the graphs' split-KV count follows the bucket, not the fixed split
            raise ValueError("step graphs cannot serve --batch-invariant (use --cuda-graphs off)")
        self.kv_caches = [  # with graphs, block num_blocks is the pad rows' scratch block
            new_kv_cache(num_blocks + int(graphs), block_size, config.num_key_value_heads, config.head_dim, dtype,
                         self.device)
            for _ in range(config.num_hidden_layers)
        ]
        gamma = speculator.gamma if speculator is not None else 0
        max_len = (max_model_len or config.max_position_embeddings) + gamma + 1
        if use_kernels and self.device.type != "cuda" and not interpreting():
            raise ValueError("attention_backend triton needs a CUDA device (the CPU serves with the torch path; "
                             "TRITON_INTERPRET=1 runs the kernels on the CPU for tests)")
        heads = (config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads)
        self.batch = InputBatch(max_num_seqs, max_len, block_size, config.vocab_size, self.device, engine_seed,
                                kernel_heads=heads if use_kernels else None)
        self.drafts = DraftStore()
        self.prompt_logprobs = PromptLogprobs()
        self.verifier = Verifier(mask, unseeded_coupling, use_kernels=use_kernels)
        self.mask = mask
        self.graphs = _step_graphs(self, heads, num_blocks, max_num_seqs, gamma) if graphs else None
        self.draft_graphs = (draft_step_graph(speculator, self.graphs.buckets, self.batch.block_table.shape[1],
                                              self.graphs.pool) if self.graphs is not None and speculator else None)
        self.graph_memory_bytes = 0  # device memory the graphs' capture took (``warm_up_kernels``, CUDA)
        self.compiled = False
        if compile:
            from sparkserve.engine.compile_step import compile_layers

            self._compiled_layers = compile_layers(model)
            self.compiled = True

    def warm_up_compile(self, step_fn: Callable[[int, int], float], progress: bool = True) -> None:
        """Compile the step's shapes now by running ``step_fn(B, R)`` (``throughput_probe.make_step_fn``; no-op
        without ``compile``); logs the time, warns on fallback."""
        if not self.compiled:
            return
        from sparkserve.engine.compile_step import warm_up

        seconds = warm_up(step_fn, progress=progress)
        failed = sum(w.failed for w in self._compiled_layers)
        logger.info("compiled step warmed up in %.1f s%s", seconds,
                    f" ({failed} bodies fell back to eager)" if failed else "")

    def warm_up_kernels(self, compile_fn: Callable | None = None) -> list[str]:
        """Before serving on CUDA with the Triton kernels: compile ``kernels/compile_check``'s warm-up list for
        this model and for a DSpark drafter served by graphs when its heads differ (``served_variants``;
        RuntimeError when one exceeds the card's shared memory), then capture every step graph (the target's,
        then the drafter's). ``compile_fn(variant, arch)`` replaces the compiler (dry runs on the CPU,
        where nothing is captured). Returns the variant names compiled ([] when the kernels do not serve)."""
        heads = self.batch.kernel_heads
        if heads is None or (self.device.type != "cuda" and compile_fn is None):
            return []
        from sparkserve.kernels import compile_check

        cuda = self.device.type == "cuda"
        major, minor = torch.cuda.get_device_capability(self.device) if cuda else (9, 0)
        limit = (torch.cuda.get_device_properties(self.device).shared_memory_per_block_optin if cuda
                 else compile_check.SM90_SHARED_MEMORY_PER_BLOCK)
        start = time.perf_counter()
        shapes = [(heads[1], self.config.head_dim)]  # (G, head dim): the target's, then the drafter graphs'
        if self.draft_graphs is not None:
            shapes.append((self.draft_graphs.kernel_heads[1], self.speculator.kv_caches[0][0].shape[-1]))
        done = [v for group, head_dim in dict.fromkeys(shapes) for v in compile_check.warm_up(
            group, head_dim, self.kv_caches[0][0].dtype, 10 * major + minor, limit, compile_fn,
            batch_invariant=self.batch_invariant)]
        reserved = torch.cuda.memory_reserved(self.device) if cuda else 0
        captured = sum(g.capture_all() for g in (self.graphs, self.draft_graphs) if g is not None)
        self.graph_memory_bytes = torch.cuda.memory_reserved(self.device) - reserved if cuda else 0
        logger.info("kernels warmed up: %d variants compiled, %d step graphs captured in %.1f s", len(done), captured,
                    time.perf_counter() - start)
        return list(dict.fromkeys(name for name, _ in done))

    # ------------------------------------------------------------------ step
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step (:meth:`_execute`), in batch-invariant mode with ``batch_invariant``
        (engine/batch_invariant.py: every linear and attention row in one fixed order)."""
        with batch_invariant_mode(self.batch_invariant):
            return self._execute(out)

    @torch.inference_mode()
    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step. Returns the emitted tokens and next drafts per request (Python values).

        One device-to-host transfer per step carries the emitted tokens, accepted counts and the next
        drafts with their confidences (the drafter reads the accepted counts on the device). Extra
        transfers happen only for logprobs, logits masks and drafters that read token histories.
        """
        released = (*out.finished_request_ids, *out.preempted_request_ids)
        for rid in released:
            self.drafts.drop(rid)
            self.prompt_logprobs.drop(rid)
            if self.mask is not None:
                self.mask.release(rid)
        if self.speculator is not None and released:
            self.speculator.release(released)
        if isinstance(self.mask, RequestLogitsMask):
            for seq in out.seqs:
                if seq.new_request is not None:
                    self.mask.add_request(seq.request_id, seq.new_request.sampling_params)
        self.batch.apply(out)
        self.prompt_logprobs.observe(out.seqs)
        result = RunnerOutput()
        if not out.seqs:
            return result
        sample_seqs = [seq for seq in out.seqs if seq.sample]
        drafting = [i for i, s in enumerate(sample_seqs) if s.draft] if self.speculator is not None else []
        small = self._step_tensors(sample_seqs, drafting) if sample_seqs else None
        inputs = self.batch.prepare(out.seqs, self.graphs, small)
        small = inputs.step_tensors
        aux_ids = self.speculator.target_layer_ids if self.speculator is not None else ()
        if inputs.graph is not None:
            assert self.graphs is not None
            hidden, aux = self.graphs.run(inputs.graph)
        else:
            hidden, aux = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attention, aux_ids)
        if self.speculator is not None:
            eager = {sample_seqs[i].request_id for i in drafting}
            rows = [FeedRows(s.request_id, s.start_pos, s.num_new_tokens, s.request_id in eager or not s.sample
                             or s.num_known_tokens > 1) for s in out.seqs]
            self.speculator.feed_step(rows, aux, inputs.positions, inputs.slot_mapping)
        if self.prompt_logprobs.active:  # only requests that ask for prompt logprobs pay for them
            self.prompt_logprobs.compute(out.seqs, hidden, self.model.compute_logits, self.batch.token_ids,
                                         [self.batch.requests[s.request_id].row for s in out.seqs], result)
        chunks = [seq for seq in out.seqs if not seq.sample]
        self.batch.record_all(chunks, [()] * len(chunks), [0] * len(chunks))
        if small is None:
            return result
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))  # [N, V] fp32
        verified = self.verifier.verify(self._verify_input(sample_seqs, logits, small))
        emitted: list[list[int]] | None = None
        if drafting and self._drafts_need_host_tokens(sample_seqs, drafting):
            emitted = emitted_tokens(verified.token_ids.tolist(), verified.num_accepted.tolist())
            self._record(sample_seqs, emitted, verified, result)
        drafted = self._draft(sample_seqs, drafting, verified, small) if drafting else None
        host = _to_host(verified if emitted is None else None, drafted)  # the step's transfer
        if emitted is None:
            emitted = emitted_tokens(host.token_ids, host.num_accepted)
            self._record(sample_seqs, emitted, verified, result)
        if drafted is not None:
            self._store_drafts([sample_seqs[i].request_id for i in drafting], drafted, host, result)
        return result

    def _record(self, seqs: Sequence[ScheduledSeq], emitted: list[list[int]], verified: VerifyOutput,
                result: RunnerOutput) -> None:
        self.batch.record_all(seqs, emitted, [len(e) - 1 for e in emitted])
        if self.speculator is not None:  # rows past the accepted drafts are never context
            for seq, tokens in zip(seqs, emitted, strict=True):
                self.speculator.truncate(seq.request_id, seq.start_pos + seq.num_known_tokens + len(tokens) - 1)
        for i, seq in enumerate(seqs):
            result.sampled_token_ids[seq.request_id] = emitted[i]
            logprobs = verified.logprobs(i, emitted[i])
            if logprobs is not None:
                result.logprobs[seq.request_id] = logprobs

    def _drafts_need_host_tokens(self, seqs: Sequence[ScheduledSeq], drafting: list[int]) -> bool:
        """Token-history drafters and masks need this step's emitted tokens on the host first."""
        assert self.speculator is not None
        if self.speculator.drafter.needs_token_history:
            return True
        return self.mask is not None and any(self.mask.constrained(seqs[i].request_id) for i in drafting)

    def _step_tensors(self, seqs: Sequence[ScheduledSeq], drafting: list[int]) -> _StepTensors:
        """The verifier's and drafter's small tensors, built on the host (staged with the step's inputs)."""
        host = torch.device("cpu")
        rids = [s.request_id for s in seqs]
        draft_q: list[torch.Tensor | None] = []  # stored q of freely sampled drafts (on the device), else None
        for seq in seqs:
            if not seq.spec_token_ids or seq.spec_draft_id is None:
                self.drafts.drop(seq.request_id)  # drafts not verified this step are stale after it
                draft_q.append(None)
                continue
            stored = self.drafts.take(seq.request_id, seq.spec_draft_id, seq.spec_token_ids)
            draft_q.append(None if stored.probs is None else stored.probs[: seq.num_spec_tokens])
        one_hot = torch.tensor([q is None for s, q in zip(seqs, draft_q, strict=True) for _ in s.spec_token_ids],
                               dtype=torch.bool)  # [D]
        known_end = torch.tensor([s.start_pos + s.num_known_tokens for s in seqs], dtype=torch.int64)  # [N]
        draft_rows = torch.tensor(drafting, dtype=torch.int64)  # [R_d]
        draft_tables = None  # [R_d, W] int32 the drafter's block tables (read on the device)
        if drafting and self.speculator.device_tables:
            states = [self.batch.requests[rids[i]] for i in drafting]
            draft_tables = table_tensor(self.speculator.draft_tables([seqs[i].end_pos for i in drafting],
                                                                     [st.block_ids for st in states]))
        return _StepTensors(
            drafts=torch.tensor([t for s in seqs for t in s.spec_token_ids], dtype=torch.int64),
            sampling=self.batch.sampling_metadata(rids, host), first_positions=known_end,
            draft_rows=draft_rows, draft_known_end=known_end.index_select(0, draft_rows),
            draft_sampling=self.batch.sampling_metadata([rids[i] for i in drafting], host) if drafting else None,
            draft_q=tuple(draft_q), one_hot=one_hot, draft_tables=draft_tables)

    def _verify_input(self, seqs: Sequence[ScheduledSeq], logits: torch.Tensor, small: _StepTensors) -> VerifyInput:
        """Drafts from the scheduler (``ScheduledSeq.spec_token_ids``), their q from the draft store."""
        rids = tuple(s.request_id for s in seqs)
        drafts = RaggedDrafts(small.drafts, tuple(s.num_spec_tokens for s in seqs))
        return VerifyInput(
            request_ids=rids, logits=logits, drafts=drafts,
            draft_probs=_draft_probs(seqs, small.draft_q, small.one_hot, logits.device),
            sampling=small.sampling, first_positions=small.first_positions,
            output_token_ids=[self.batch.requests[rid].output_token_ids for rid in rids],
        )

    def _draft(self, seqs: Sequence[ScheduledSeq], rows: list[int], verified: VerifyOutput,
               small: _StepTensors) -> _Drafted:
        """Draft the next block for the sequences the scheduler marked ``draft`` (on the device: the
        anchors and their positions come from the verify result without a host sync)."""
        spec = self.speculator
        assert spec is not None
        rids = [seqs[i].request_id for i in rows]
        states = [self.batch.requests[rid] for rid in rids]
        index = small.draft_rows
        accepted = verified.num_accepted.index_select(0, index)  # [R_d]
        anchors = verified.token_ids.index_select(0, index).gather(1, accepted[:, None]).squeeze(1)  # [R_d]
        starts = small.draft_known_end + accepted  # [R_d] anchor positions
        sampling = small.draft_sampling
        assert sampling is not None
        coupled = self.verifier.coupled(sampling)
        mask_fn = None
        if self.mask is not None and any(self.mask.constrained(rid) for rid in rids):
            mask = self.mask

            def mask_fn(row: int, prefix: Sequence[int]) -> torch.Tensor | None:
                rid = rids[row]
                return mask.allowed(rid, states[row].output_token_ids, prefix) if mask.constrained(rid) else None

        histories = [self.batch.history(rid) for rid in rids] if spec.drafter.needs_token_history else None
        out = spec.propose(anchors, starts, [seqs[i].end_pos for i in rows], [st.block_ids for st in states],
                           sampling, coupled, histories, mask_fn, rids, self.draft_graphs, small.draft_tables)
        free = out.q_rows if out.q_rows is not None else [
            r for r in range(len(rows)) if not sampling.greedy[r] and not coupled[r]]
        return _Drafted(out, free)

    def _store_drafts(self, rids: list[str], drafted: _Drafted, host: _HostStep, result: RunnerOutput) -> None:
        """Keep q under fresh draft ids; hand the token ids and confidences to the scheduler."""
        spec = self.speculator
        assert spec is not None
        out = drafted.output
        free = {row: f for f, row in enumerate(drafted.free_rows)}
        for row, rid in enumerate(rids):
            tokens = host.draft_tokens[row]
            n = out.num_tokens[row] if out.num_tokens is not None else len(tokens)
            n = self._allowed_draft_length(rid, tokens[:n])
            if n == 0:
                self.drafts.drop(rid)
                continue
            probs = out.draft_probs[free[row]] if row in free and out.draft_probs is not None else None
            draft_id = self.drafts.put(rid, tuple(tokens[:n]), probs)
            conf = tuple(host.confidences[row][:n]) if host.confidences is not None else ()
            name = out.drafters[row] if out.drafters is not None else spec.drafter.name
            result.drafts[rid] = DraftProposal(tuple(tokens[:n]), conf, draft_id, name)


    def _allowed_draft_length(self, request_id: str, tokens: Sequence[int]) -> int:
        """Drafts up to the first one the logits mask forbids: a forbidden draft is never verified,
        whatever the drafter (masks are cached, so the verifier's next calls on the same prefixes are
        free). Lossless for one-hot drafts: verifying a token with p = 0 rejects it with probability 1
        and recovers from p itself; sampled drafters mask q before drawing, so they never get here."""
        mask = self.mask
        if mask is None or not mask.constrained(request_id):
            return len(tokens)
        outputs = self.batch.requests[request_id].output_token_ids
        for k, token in enumerate(tokens):
            if not bool(mask.allowed(request_id, outputs, tokens[:k])[token]):
                return k
        return len(tokens)


def _step_graphs(runner: ModelRunner, heads: tuple[int, int], num_blocks: int, max_num_seqs: int,
                 gamma: int) -> StepGraph:
    """The runner's ``StepGraph``: decode (q = 1) and verify blocks (``graph_q_lens``) at
    ``default_buckets(max_num_seqs)``; the scratch block is the cache's last (``num_blocks``)."""
    q_lens = graph_q_lens(runner.block_size, heads[1], gamma)
    aux_ids = runner.speculator.target_layer_ids if runner.speculator is not None else ()
    return StepGraph(runner.model, runner.kv_caches, heads, runner.block_size, runner.batch.block_table.shape[1],
                     scratch_block=num_blocks, buckets=default_buckets(max_num_seqs), q_lens=q_lens,
                     staging=runner.batch.staging, aux_layer_ids=tuple(aux_ids))


@dataclass(frozen=True)
class _StepTensors:
    """The small tensors the verifier and the drafter read, built on the host from the schedule and staged
    to the device in the step's one copy (``InputBatch.prepare``; engine/staging.py).

    Attributes:
        drafts: ``[D]`` int64 the sampling sequences' drafts, flat (``ScheduledSeq.spec_token_ids``).
        sampling: the sampling sequences' ``SamplingMetadata`` (N rows).
        first_positions: ``[N]`` int64 position of each sampling sequence's first verified token.
        draft_rows: ``[R_d]`` int64 indices (into the N) of the sequences that draft next.
        draft_known_end: ``[R_d]`` int64 their known-token ends (+ accepted drafts = the anchors' positions).
        draft_sampling: those rows' ``SamplingMetadata``, or None when none drafts.
        draft_q: per sampling sequence, the stored q ``[K, V']`` of its freely sampled drafts (already on the
            device: not staged), or None (one-hot drafts, or none).
        one_hot: ``[D]`` bool, which drafts are one-hot (``DraftProbs.one_hot``).
        draft_tables: ``[R_d, W]`` int32 the drafting rows' drafter block tables when the drafter reads them
            on the device (``Speculator.device_tables``; ``Speculator.draft_tables``), else None.
    """

    drafts: torch.Tensor
    sampling: SamplingMetadata
    first_positions: torch.Tensor
    draft_rows: torch.Tensor
    draft_known_end: torch.Tensor
    draft_sampling: SamplingMetadata | None
    draft_q: tuple[torch.Tensor | None, ...]
    one_hot: torch.Tensor
    draft_tables: torch.Tensor | None = None


@dataclass(frozen=True)
class _Drafted:
    """A drafter's output (on the device) and which of its rows were freely sampled."""

    output: DraftOutput
    free_rows: list[int]


@dataclass(frozen=True)
class _HostStep:
    """The step's results after its one device-to-host transfer (Python values)."""

    token_ids: list[list[int]]
    num_accepted: list[int]
    draft_tokens: list[list[int]]
    confidences: list[list[float]] | None


def _to_host(verified: VerifyOutput | None, drafted: _Drafted | None) -> _HostStep:
    """One transfer: emitted tokens and accepted counts (unless already moved), drafts and confidences,
    packed as float64 (exact for token ids)."""
    parts, shapes = [], []
    for t in (None if verified is None else verified.token_ids, None if verified is None else verified.num_accepted,
              None if drafted is None else drafted.output.token_ids,
              None if drafted is None else drafted.output.confidences):
        shapes.append(None if t is None else tuple(t.shape))
        if t is not None:
            parts.append(t.reshape(-1).to(torch.float64))
    flat = torch.cat(parts).tolist() if parts else []
    values, offset = [], 0
    for shape in shapes:
        if shape is None:
            values.append(None)
            continue
        size = 1
        for dim in shape:
            size *= dim
        chunk = flat[offset: offset + size]
        offset += size
        values.append([chunk[i * shape[1]: (i + 1) * shape[1]] for i in range(shape[0])] if len(shape) == 2 else chunk)
    tokens, accepted, drafts, conf = values
    return _HostStep([[int(x) for x in row] for row in tokens or []], [int(x) for x in accepted or []],
                     [[int(x) for x in row] for row in drafts or []], conf)


def _draft_probs(seqs: Sequence[ScheduledSeq], dense: Sequence[torch.Tensor | None], one_hot: torch.Tensor,
                 device: torch.device) -> DraftProbs | None:
    """q rows of every draft: the stored q of freely sampled drafts, one-hot for the rest (``one_hot`` [D],
    staged)."""
    if not any(s.spec_token_ids for s in seqs):
        return None
    shapes = [d for d in dense if d is not None]
    if not shapes:
        return DraftProbs(None, one_hot)
    vocab = shapes[0].shape[-1]
    rows = [d if d is not None else torch.zeros(s.num_spec_tokens, vocab, device=device)
            for s, d in zip(seqs, dense, strict=True) if s.spec_token_ids]
    return DraftProbs(torch.cat(rows), one_hot)
