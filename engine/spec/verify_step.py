"""The speculative half of a runner step: verify drafts, grow the drafter context, draft again.

Terms (DESIGN.md section 1, DEEPSPEC_FORMAT.md section 2 steps 8-11):
- a request that verifies ``l_r`` drafts feeds ``[anchor, d_1 .. d_l]`` to the target at positions
  ``p .. p + l``; its last ``1 + l`` rows give the target distributions ``p_0 .. p_l``;
- the rejection sampler accepts a prefix of ``a`` drafts and emits ``a + 1`` tokens (accepted drafts,
  then a recovered token on rejection or a bonus token when all pass);
- the drafter's context grows by exactly the accepted rows (anchor + accepted drafts) and the next
  block is drafted from the last emitted token at position ``p + a + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.sampler import SamplingMetadata, apply_penalties_and_bias, compute_logprobs, processed_probs
from engine.spec.rejection import rejection_sample
from engine.spec.speculator import Speculator
from scheduler.outputs import RunnerOutput, ScheduledSeq, TokenLogprob


@dataclass
class VerifyResult:
    """Per sample-request outcome of the verify: emitted tokens and accepted draft counts."""

    emitted: list[list[int]]
    num_accepted: list[int]


def verify_and_draft(
    runner,
    seqs: tuple[ScheduledSeq, ...],
    meta: AttentionMetadata,
    hidden: torch.Tensor,  # [T, d] final-normed target hidden states
    aux: torch.Tensor,  # [T, m * d] target features for the drafter
    result: RunnerOutput,
) -> None:
    """Verify, extend the drafter context, draft the next block; fills ``result``."""
    spec: Speculator = runner.speculator
    sample_seqs = [s for s in seqs if s.sample]
    ends = [off + s.num_new_tokens for off, s in zip(_seq_row_offsets(seqs), seqs, strict=False) if s.sample]
    if not sample_seqs:
        verify = VerifyResult([], [])
    elif any(s.num_spec_tokens for s in sample_seqs):
        verify = _verify(runner, sample_seqs, ends, hidden, result)
    else:  # nothing to verify (e.g. the drafting gate is off for everyone): the plain sampler's path
        logits = runner.model.compute_logits(hidden[torch.tensor([e - 1 for e in ends], device=hidden.device)])
        runner.sample(sample_seqs, logits, result)  # [R, V] fp32 -> one token each
        verify = VerifyResult([result.sampled_token_ids[s.request_id] for s in sample_seqs], [0] * len(sample_seqs))
    _add_context(spec, seqs, meta, aux, verify)
    _draft(runner, sample_seqs, verify, result)


def _seq_row_offsets(seqs: tuple[ScheduledSeq, ...] | list[ScheduledSeq]) -> list[int]:
    offsets, total = [], 0
    for s in seqs:
        offsets.append(total)
        total += s.num_new_tokens
    return offsets


def _verify(
    runner, seqs: list[ScheduledSeq], ends: list[int], hidden: torch.Tensor, result: RunnerOutput
) -> VerifyResult:
    """Rejection-sample every sample request (``ends``: its last row + 1 in the flat batch)."""
    spec: Speculator = runner.speculator
    device = hidden.device
    states = [runner.requests[s.request_id] for s in seqs]
    num_rows = len(seqs)
    lengths = [s.num_spec_tokens for s in seqs]
    all_greedy = all(st.params.greedy for st in states)
    # Pad to the longest verify of the step, not to the drafter's gamma: at high load most l_r are 0
    # and the [R, width, V] probability tensors are the verify step's main cost. (A seeded sampled
    # request draws `width - 1` uniforms, so its samples depend on the step's width, as they already
    # depend on its own l_r, i.e. on load.)
    gamma = max(lengths)
    width = gamma + 1
    # Rows of the target logits: the last 1 + l_r rows of each sample sequence.
    src = [e - 1 - n + j for e, n in zip(ends, lengths, strict=True) for j in range(n + 1)]
    dst = [r * width + j for r, n in enumerate(lengths) for j in range(n + 1)]
    logits = runner.model.compute_logits(hidden[torch.tensor(src, device=device)])  # [N, V] fp32
    vocab = logits.shape[-1]
    padded = logits.new_zeros(num_rows * width, vocab)
    padded[torch.tensor(dst, device=device)] = logits  # [R * (gamma+1), V]

    drafts = torch.zeros(num_rows, gamma, dtype=torch.int64, device=device)  # [R, gamma]
    draft_probs = None if all_greedy else torch.zeros(num_rows, gamma, vocab, device=device)
    for r, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        pending = spec.pending.get(s.request_id)
        if n and pending is not None:
            drafts[r, :n] = pending.token_ids[:n]
            if draft_probs is not None and pending.draft_probs is not None:
                q = pending.draft_probs[:n]  # [n, V'] (V' < V with a reduced draft vocabulary)
                draft_probs[r, :n, : q.shape[-1]] = q
    sampling = SamplingMetadata.build(
        [st.params for st in states], [st.generator for st in states],
        [st.output_token_ids for st in states], vocab, device,
    ).expand_for_verify(drafts)
    adjusted = apply_penalties_and_bias(padded, sampling)  # [R * (gamma+1), V]
    target_argmax = adjusted.argmax(dim=-1).view(num_rows, width)
    target_probs = None if all_greedy else processed_probs(adjusted, sampling).view(num_rows, width, vocab)
    is_greedy = torch.tensor([st.params.greedy for st in states], device=device)
    out = rejection_sample(
        drafts, torch.tensor(lengths, device=device), draft_probs, target_probs, target_argmax, is_greedy,
        [st.generator for st in states],
    )
    tokens = out.output_token_ids.tolist()
    emitted_counts = out.num_emitted.tolist()
    emitted = [tokens[r][: emitted_counts[r]] for r in range(num_rows)]
    for r, (s, st) in enumerate(zip(seqs, states, strict=False)):
        st.output_token_ids.extend(emitted[r])
        result.sampled_token_ids[s.request_id] = emitted[r]
        if st.params.logprobs is not None:
            result.logprobs[s.request_id] = _logprobs(adjusted, r * width, emitted[r], st.params.logprobs)
    return VerifyResult(emitted, [c - 1 for c in emitted_counts])


def _logprobs(adjusted: torch.Tensor, first_row: int, tokens: list[int], k: int) -> list[TokenLogprob]:
    rows = adjusted[first_row:first_row + len(tokens)]  # [n, V]
    chosen, top_ids, top_values = compute_logprobs(rows, torch.tensor(tokens, device=rows.device), max(k, 1))
    chosen_l, ids_l, vals_l = chosen.tolist(), top_ids.tolist(), top_values.tolist()
    return [TokenLogprob(t, chosen_l[i], tuple(zip(ids_l[i][:k], vals_l[i][:k], strict=False))) for i, t in enumerate(tokens)]


def _add_context(
    spec: Speculator, seqs: tuple[ScheduledSeq, ...], meta: AttentionMetadata, aux: torch.Tensor,
    verify: VerifyResult,
) -> None:
    """Context rows = every computed row that stays: whole prefill chunks, anchor + accepted drafts.
    No-op for drafters that take no target features (``aux`` is None)."""
    if aux is None:
        return
    rows: list[int] = []
    positions: list[int] = []
    sample_index = 0
    for off, s in zip(_seq_row_offsets(seqs), seqs, strict=False):
        keep = s.num_new_tokens
        if s.sample:
            keep -= s.num_spec_tokens - verify.num_accepted[sample_index]
            sample_index += 1
        rows.extend(range(off, off + keep))
        positions.extend(range(s.start_pos, s.start_pos + keep))
    if not rows:
        return
    index = torch.tensor(rows, device=aux.device)
    spec.add_context(aux[index], torch.tensor(positions, device=aux.device), meta.slot_mapping[index])


def _draft(runner, seqs: list[ScheduledSeq], verify: VerifyResult, result: RunnerOutput) -> None:
    """Draft the next block for every request that sampled and that the scheduler's drafting gate
    kept (``seq.draft``); penalised requests do not speculate (their target distribution inside a
    block would depend on the drafts)."""
    spec: Speculator = runner.speculator
    ids, anchors, starts, tables, temps, gens = [], [], [], [], [], []
    for r, s in enumerate(seqs):
        state = runner.requests[s.request_id]
        if state.params.needs_penalties or not s.draft:
            spec.drop(s.request_id)
            continue
        ids.append(s.request_id)
        anchors.append(verify.emitted[r][-1])
        starts.append(s.end_pos - s.num_spec_tokens + verify.num_accepted[r])
        tables.append(s.block_table)
        temps.append(0.0 if state.params.greedy else state.params.temperature)
        gens.append(state.generator)
    if not ids:
        return
    device = runner.device
    histories = None
    if spec.needs_token_history:
        histories = [
            list(runner.requests[rid].prompt_token_ids) + runner.requests[rid].output_token_ids for rid in ids
        ]
    proposals = spec.propose(
        ids, torch.tensor(anchors, dtype=torch.int64, device=device), starts, tables,
        torch.tensor(temps, dtype=torch.float32, device=device), gens, histories,
    )
    result.drafts.update(proposals)
