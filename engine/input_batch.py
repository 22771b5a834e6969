"""The persistent batch: per-request state the runner keeps between steps (after vLLM v1's InputBatch).

Each request owns a row: its tokens (prompt, outputs, and this step's drafts past them) in a
``[max_num_seqs, max_model_len]`` buffer, its block table in a ``[max_num_seqs, max_blocks]`` tensor,
its progress (known / computed tokens) and its sampling state. A step's ``SchedulerOutput`` is applied as
a diff (``apply``): a new request once, then new block ids; the runner appends the tokens it emits itself
(``record``). From the rows, ``prepare`` builds the step's flat inputs with tensor ops (input ids,
positions, slot mapping, attention metadata) instead of Python lists.

Invariants (checked, ``BatchStateError`` otherwise): a scheduled request's ``start_pos`` equals the
row's computed tokens, and a sampling request's known tokens equal the row's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparkserve.engine.attention import AttentionMetadata, build_step_metadata
from sparkserve.engine.sampling.metadata import SamplingMetadata, dense_logit_bias
from sparkserve.engine.staging import HostStaging
from sparkserve.engine.step_graph import StaticStep, StepGraph
from sparkserve.kernels.keyed_random import request_key
from sparkserve.scheduler.outputs import ScheduledSeq, SchedulerOutput
from sparkserve.scheduler.sampling_params import SamplingParams


class BatchStateError(RuntimeError):
    """The scheduler's view of a request and the runner's disagree."""


@dataclass
class RowState:
    """Host-side state of one request row.

    Attributes:
        row: index into the batch tensors.
        params: sampling parameters; key: random-stream key (``keyed_random.request_key``).
        prompt_len / num_tokens / num_computed: prompt length, known tokens, tokens whose KV is cached.
        output_token_ids: generated tokens (penalties, masks, drafter histories).
        block_ids: the block table (host mirror of the tensor row).
    """

    row: int
    params: SamplingParams
    key: int
    prompt_len: int
    num_tokens: int
    num_computed: int
    output_token_ids: list[int]
    block_ids: list[int]


@dataclass(frozen=True)
class StepInputs:
    """Flat inputs of one step (T tokens over S scheduled sequences).

    Attributes:
        input_ids / positions / slot_mapping: ``[T]`` int64.
        attention: paged attention metadata (None for a graph step: its metadata is ``graph.meta``).
        sample_index: indices into ``seqs`` of the sequences that sample this step.
        logits_rows: ``[N]`` int64 rows of the flat batch whose logits are needed: the last ``1 + l_r``
            rows of every sampling sequence, in order.
    """

    input_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    attention: AttentionMetadata | None
    sample_index: tuple[int, ...]
    logits_rows: Tensor
    graph: StaticStep | None = None
    step_tensors: object = None
    """The caller's small per-step tensors (``prepare``'s ``step_tensors``), on the device."""
    """The static buffers holding this step when it runs through ``engine/step_graph.py`` (a uniform decode or
    verify step at a padded bucket), else None."""


class InputBatch:
    """Rows of per-request state (module docstring).

    Args:
        max_num_seqs: most requests held at once.
        max_model_len: most tokens per request (+ drafts).
        block_size: tokens per KV block.
        vocab_size: V (sampling metadata).
        device: where step tensors go.
        engine_seed: mixed into unseeded requests' random keys.
        kernel_heads: ``(Hkv, H / Hkv)`` of the target when its attention runs the Triton kernels (then
            each step's metadata carries theirs too), else None.
    """

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, vocab_size: int,
                 device: torch.device, engine_seed: int = 0, kernel_heads: tuple[int, int] | None = None) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.engine_seed = engine_seed
        self.kernel_heads = kernel_heads
        self.max_len = max_model_len
        self.token_ids = torch.zeros(max_num_seqs, max_model_len, dtype=torch.int64)  # [rows, L]
        self.block_table = torch.zeros(max_num_seqs, -(-max_model_len // block_size) + 1, dtype=torch.int64)
        self.requests: dict[str, RowState] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.sampling = SamplingRows(max_num_seqs, vocab_size)
        self.staging = HostStaging(device)  # the step's inputs: built on the host, one copy to the device
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
        self.step = 0  # schedules applied so far (keys unseeded rows' random streams)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def __len__(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------- diffs
    def remove(self, request_id: str) -> None:
        """Free a request's row (finished, aborted or preempted); no-op when absent."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._free_rows.append(state.row)

    def apply(self, out: SchedulerOutput) -> None:
        """Apply one schedule: drop finished / preempted rows, (re)create new ones, grow block tables.

        Raises:
            BatchStateError: a request is unknown, its position disagrees, or the batch is full.
        """
        self.step += 1
        for rid in (*out.finished_request_ids, *out.preempted_request_ids):
            self.remove(rid)
        writes = _Writes()
        for seq in out.seqs:
            if seq.new_request is not None:
                self._add(seq, writes)
            state = self.requests.get(seq.request_id)
            if state is None:
                raise BatchStateError(f"request {seq.request_id!r} is scheduled but the runner has no state for it")
            if seq.start_pos != state.num_computed:
                raise BatchStateError(f"request {seq.request_id!r}: scheduled at position {seq.start_pos}, the runner "
                                      f"has {state.num_computed} computed tokens")
            if seq.sample and seq.start_pos + seq.num_known_tokens != state.num_tokens:
                raise BatchStateError(f"request {seq.request_id!r}: the scheduler knows "
                                      f"{seq.start_pos + seq.num_known_tokens} tokens, the runner {state.num_tokens}")
            self._set_blocks(state, seq, writes)
        writes.apply(self.token_ids, self.block_table)

    def _add(self, seq: ScheduledSeq, writes: _Writes) -> None:
        new = seq.new_request
        assert new is not None
        self.remove(seq.request_id)
        if not self._free_rows:
            raise BatchStateError("the persistent batch is full (more requests than max_num_seqs)")
        tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
        row = self._free_rows.pop()
        writes.tokens(row, 0, tokens)
        key = request_key(new.sampling_params.seed, seq.request_id, self.engine_seed)
        # a prefix-cache hit starts the request at its hit length (the cached blocks hold that KV)
        self.requests[seq.request_id] = RowState(row, new.sampling_params, key, len(new.prompt_token_ids),
                                                 len(tokens), seq.start_pos, list(new.output_token_ids), [])
        self.sampling.set_row(row, new.sampling_params, key, new.output_token_ids)

    def _set_blocks(self, state: RowState, seq: ScheduledSeq, writes: _Writes) -> None:
        kept = seq.num_blocks - len(seq.new_block_ids)
        if kept < 0 or kept > len(state.block_ids):
            raise BatchStateError(f"request {seq.request_id!r}: keeps {kept} of {len(state.block_ids)} blocks")
        del state.block_ids[kept:]
        if seq.new_block_ids:
            state.block_ids.extend(seq.new_block_ids)
            writes.blocks(state.row, kept, seq.new_block_ids)

    def record(self, seq: ScheduledSeq, emitted: Sequence[int], num_accepted: int) -> None:
        """After the step: ``emitted`` tokens appended (none for a non-final chunk); computed tokens
        advance by the known tokens and the accepted drafts."""
        self.record_all([seq], [emitted], [num_accepted])

    def record_all(self, seqs: Sequence[ScheduledSeq], emitted: Sequence[Sequence[int]],
                   num_accepted: Sequence[int]) -> None:
        """``record`` for many sequences with one write into the token buffer."""
        writes = _Writes()
        for seq, tokens, accepted in zip(seqs, emitted, num_accepted, strict=True):
            state = self.requests[seq.request_id]
            state.num_computed = seq.start_pos + seq.num_known_tokens + accepted
            if tokens:
                writes.tokens(state.row, state.num_tokens, tokens)
                state.num_tokens += len(tokens)
                state.output_token_ids.extend(tokens)
                self.sampling.record(state.row, state.params, tokens)
        writes.apply(self.token_ids, self.block_table)

    # ---------------------------------------------------------------- step inputs
    def prepare(self, seqs: Sequence[ScheduledSeq], graphs: StepGraph | None = None,
                step_tensors: object = None) -> StepInputs:
        """Flat inputs of a step; the drafts of each sequence are written into its token row first. With
        ``graphs``, a decode or uniform verify step (every sequence samples after ``1 + l_r`` tokens, the same
        count for all) is staged into its bucket's static buffers instead (``StepInputs.graph``)."""
        states = [self.requests[s.request_id] for s in seqs]
        writes = _Writes()
        for seq, state in zip(seqs, states, strict=True):
            if seq.spec_token_ids:
                writes.tokens(state.row, state.num_tokens, seq.spec_token_ids)
        writes.apply(self.token_ids, self.block_table)
        q_lens = [s.num_new_tokens for s in seqs]
        starts = [s.start_pos for s in seqs]
        rows = torch.tensor([st.row for st in states], dtype=torch.int64)
        counts = torch.tensor(q_lens, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(seqs)), counts)  # [T] sequence of each token
        first = torch.cumsum(counts, 0) - counts
        positions = torch.tensor(starts, dtype=torch.int64)[owner] + torch.arange(int(counts.sum())) - first[owner]
        input_ids = self.token_ids.view(-1)[rows[owner] * self.max_len + positions]
        tables = self.block_table.index_select(0, rows)  # [S, max_blocks]
        kv_lens = [s.end_pos for s in seqs]
        key = graphs.key_for(q_lens) if graphs is not None else None
        if key is not None and all(s.sample and s.num_new_tokens == 1 + s.num_spec_tokens for s in seqs):
            step = graphs.stage(graphs.step(key), input_ids, positions, tables, kv_lens)
            n = step.num_tokens  # every row samples: the logits rows are all T rows, in order
            return StepInputs(step.input_ids[:n], step.positions[:n], step.meta.slot_mapping[:n], None,
                              tuple(range(len(seqs))), torch.arange(n, device=self.device), step,
                              self.staging.to_device(step_tensors))
        host = torch.device("cpu")
        meta = build_step_metadata(q_lens, starts, kv_lens, tables, self.block_size, host, self.kernel_heads,
                                   token_positions=(owner, positions), num_sms=self.num_sms)
        sample_index = tuple(i for i, s in enumerate(seqs) if s.sample)
        ends = (first + counts).tolist()
        logits_rows = [ends[i] - 1 - seqs[i].num_spec_tokens + k for i in sample_index
                       for k in range(1 + seqs[i].num_spec_tokens)]
        staged = self.staging.to_device((input_ids, positions, meta, torch.tensor(logits_rows, dtype=torch.int64),
                                         step_tensors))
        input_ids, positions, meta, logits_rows_t, step_tensors = staged
        return StepInputs(input_ids, positions, meta.slot_mapping, meta, sample_index, logits_rows_t,
                          step_tensors=step_tensors)

    def sampling_metadata(self, request_ids: Sequence[str], device: torch.device | None = None) -> SamplingMetadata:
        """Sampling metadata of the given requests (one row each), gathered from the row tensors onto
        ``device`` (default the batch's; the host for staging)."""
        return self.sampling.gather([self.requests[rid] for rid in request_ids], device or self.device, self.step)

    def history(self, request_id: str) -> list[int]:
        """Prompt + outputs of a request (drafter token histories)."""
        state = self.requests[request_id]
        return self.token_ids[state.row, : state.num_tokens].tolist()


class _Writes:
    """Scattered writes into the token buffer and the block table, applied with one ``index_put_`` each."""

    def __init__(self) -> None:
        self.token_rows: list[int] = []
        self.token_cols: list[int] = []
        self.token_values: list[int] = []
        self.block_rows: list[int] = []
        self.block_cols: list[int] = []
        self.block_values: list[int] = []

    def tokens(self, row: int, start: int, values: Sequence[int]) -> None:
        self.token_rows.extend([row] * len(values))
        self.token_cols.extend(range(start, start + len(values)))
        self.token_values.extend(values)

    def blocks(self, row: int, start: int, values: Sequence[int]) -> None:
        self.block_rows.extend([row] * len(values))
        self.block_cols.extend(range(start, start + len(values)))
        self.block_values.extend(values)

    def apply(self, token_ids: Tensor, block_table: Tensor) -> None:
        for target, rows, cols, values in ((token_ids, self.token_rows, self.token_cols, self.token_values),
                                           (block_table, self.block_rows, self.block_cols, self.block_values)):
            if values:
                target.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.tensor(values, dtype=torch.int64))


class SamplingRows:
    """Sampling parameters of every row as tensors (set once per request, gathered per step).

    Dense ``[rows, V]`` penalty counts and logit biases are allocated the first time a request needs them
    and kept up to date incrementally (``record``); host flags say which features a step's rows use.
    """

    def __init__(self, num_rows: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(num_rows, dtype=torch.float32)
        self.top_p = torch.ones(num_rows, dtype=torch.float32)
        self.top_k = torch.full((num_rows,), vocab_size, dtype=torch.int64)
        self.min_p = torch.zeros(num_rows, dtype=torch.float32)
        self.presence = torch.zeros(num_rows, dtype=torch.float32)
        self.frequency = torch.zeros(num_rows, dtype=torch.float32)
        self.keys = torch.zeros(num_rows, dtype=torch.int64)
        self.counts: Tensor | None = None  # [rows, V] int32
        self.bias: Tensor | None = None  # [rows, V] fp32

    def set_row(self, row: int, params: SamplingParams, key: int, output_token_ids: Sequence[int]) -> None:
        """(Re)initialise a row for a request (its outputs so far feed the penalty counts)."""
        self.temperature[row] = 0.0 if params.greedy else params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = min(params.top_k or self.vocab_size, self.vocab_size)
        self.min_p[row] = params.min_p
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.keys[row] = key
        if params.needs_penalties and self.counts is None:
            self.counts = torch.zeros(self.temperature.numel(), self.vocab_size, dtype=torch.int32)
        if self.counts is not None:
            self.counts[row].zero_()
        if params.needs_penalties and output_token_ids:
            assert self.counts is not None
            self.counts[row].index_put_((torch.tensor(list(output_token_ids)),),
                                        torch.ones(len(output_token_ids), dtype=torch.int32), accumulate=True)
        if params.logit_bias and self.bias is None:
            self.bias = torch.zeros(self.temperature.numel(), self.vocab_size, dtype=torch.float32)
        if self.bias is not None:  # a row's previous occupant may have had a bias: always overwrite
            self.bias[row] = dense_logit_bias([params], self.vocab_size, "cpu")[0]

    def record(self, row: int, params: SamplingParams, emitted: Sequence[int]) -> None:
        """A row emitted tokens: count them for penalties."""
        if params.needs_penalties and self.counts is not None:
            self.counts[row].index_put_((torch.tensor(list(emitted)),), torch.ones(len(emitted), dtype=torch.int32),
                                        accumulate=True)

    def gather(self, states: Sequence[RowState], device: torch.device, step: int) -> SamplingMetadata:
        """``SamplingMetadata`` of the given rows; optional tensors only when a row uses them. Unseeded
        rows draw from streams of this ``step`` (fresh numbers every step), seeded rows from attempt 0."""
        params = [st.params for st in states]
        index = torch.tensor([st.row for st in states], dtype=torch.int64)

        def pick(t: Tensor | None, used: bool) -> Tensor | None:
            return t.index_select(0, index).to(device) if used and t is not None else None

        penalties = any(p.needs_penalties for p in params)
        seeded = tuple(p.seed is not None for p in params)
        return SamplingMetadata(
            temperature=pick(self.temperature, True),
            top_p=pick(self.top_p, any(p.top_p < 1.0 for p in params)),
            top_k=pick(self.top_k, any(p.top_k is not None and p.top_k < self.vocab_size for p in params)),
            min_p=pick(self.min_p, any(p.min_p > 0 for p in params)),
            presence_penalty=pick(self.presence, penalties),
            frequency_penalty=pick(self.frequency, penalties),
            output_token_counts=pick(self.counts, penalties),
            logit_bias=pick(self.bias, any(p.logit_bias for p in params)),
            keys=pick(self.keys, True),
            attempts=torch.tensor([0 if sd else step for sd in seeded], dtype=torch.int64, device=device),
            greedy=tuple(p.greedy for p in params),
            seeded=seeded,
            num_logprobs=tuple(p.logprobs for p in params),
        )
