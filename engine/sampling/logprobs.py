"""Logprobs of emitted tokens.

Reported logprobs are ``log_softmax`` of the *adjusted* logits (after penalties and ``logit_bias``,
before temperature and the truncation filters). They are finite for every token, defined for greedy
rows, and do not change with temperature; vLLM's default ("raw_logprobs") is the unadjusted model output
instead, so penalties and biases show up in ours but not in vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparkserve.scheduler.outputs import RunnerOutput, ScheduledSeq, TokenLogprob


def compute_logprobs(adjusted_logits: Tensor, token_ids: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logprobs of chosen tokens and the ``num_top`` best alternatives.

    Args:
        adjusted_logits: ``[N, V]`` fp32 logits after penalties and bias.
        token_ids: ``[N]`` int64 chosen tokens.
    Returns:
        ``(chosen [N], top_ids [N, num_top], top_values [N, num_top])``.
    """
    logprobs = torch.log_softmax(adjusted_logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen, top_ids, top_values


def token_logprobs(adjusted_logits: Tensor, token_ids: Sequence[int], num_top: int) -> list[TokenLogprob]:
    """``TokenLogprob`` per row of ``adjusted_logits`` ``[n, V]`` for the emitted ``token_ids`` (n of
    them), with the ``num_top`` best alternatives; one host transfer per tensor."""
    if not token_ids:
        return []
    chosen, top_ids, top_values = compute_logprobs(
        adjusted_logits, torch.tensor(list(token_ids), device=adjusted_logits.device), max(num_top, 1))
    chosen_l, ids_l, vals_l = chosen.tolist(), top_ids.tolist(), top_values.tolist()
    return [TokenLogprob(t, chosen_l[i], tuple(zip(ids_l[i][:num_top], vals_l[i][:num_top], strict=True)))
            for i, t in enumerate(token_ids)]


PROMPT_LOGPROBS_ROWS_PER_SLICE = 256
"""Prompt rows turned into ``[rows, V]`` fp32 log-softmax at a time (the memory bound: 256 x V x 4 bytes,
about 50 MB for a 49k vocabulary, whatever the chunk length)."""


class PromptLogprobs:
    """Prompt logprobs (vLLM's ``prompt_logprobs``, the completions API's ``echo`` + ``logprobs``) from the
    hidden states a prefill already computed: no second forward pass.

    The hidden state at position ``p`` predicts the prompt token at ``p + 1``, so a prompt of ``L``
    tokens has ``L - 1`` entries (the first token has none). Each prefill chunk scores its own positions;
    the entries are kept here until the step that samples the request's first token, whose
    :class:`RunnerOutput` carries them all. They are ``log_softmax`` of the raw target logits (no
    penalties, bias or temperature: the prompt was not sampled), as vLLM reports them; with speculation
    the prompt goes through the target only, so they are the target's. A request re-added after a
    preemption with outputs already sent does not score its prompt again. Only requests that ask pay
    anything: the runner calls :meth:`compute` only while :attr:`active` is non-empty.
    """

    def __init__(self) -> None:
        self.active: dict[str, tuple[int, int, list[TokenLogprob]]] = {}  # rid -> (k, prompt_len, entries)

    def observe(self, seqs: Sequence[ScheduledSeq]) -> None:
        """Start collecting for the newly added requests that ask for prompt logprobs."""
        for seq in seqs:
            new = seq.new_request
            # Only from position 0 (the scheduler bypasses the prefix cache for these requests): a later
            # start could not score the prompt's beginning, and the request then gets no entries.
            if (new is not None and new.sampling_params.prompt_logprobs is not None and not new.output_token_ids
                    and seq.start_pos == 0):
                self.active[seq.request_id] = (new.sampling_params.prompt_logprobs, len(new.prompt_token_ids), [])

    def drop(self, request_id: str) -> None:
        self.active.pop(request_id, None)

    def compute(self, seqs: Sequence[ScheduledSeq], hidden: Tensor, compute_logits: Callable[[Tensor], Tensor],
                token_ids: Tensor, rows: Sequence[int], result: RunnerOutput) -> None:
        """Score the prompt positions of this step's collecting sequences.

        Args:
            seqs: the step's sequences, in the order of the flat inputs.
            hidden: ``[T, H]`` final hidden states of the step's ``T`` input tokens.
            compute_logits: ``[n, H] -> [n, V]`` fp32 logits (the model's head).
            token_ids: ``[max_num_seqs, max_len]`` the runner's token buffer (prompts included).
            rows: each sequence's row in ``token_ids``.
            result: receives, for each collecting sequence that samples this step, all its entries.
        """
        first = 0
        for seq, row in zip(seqs, rows, strict=True):
            state = self.active.get(seq.request_id)
            if state is not None:
                k, prompt_len, entries = state
                end = min(seq.start_pos + seq.num_new_tokens, prompt_len - 1)  # positions p < L - 1
                for lo in range(seq.start_pos, end, PROMPT_LOGPROBS_ROWS_PER_SLICE):
                    hi = min(lo + PROMPT_LOGPROBS_ROWS_PER_SLICE, end)
                    logits = compute_logits(hidden[first + lo - seq.start_pos: first + hi - seq.start_pos])  # [n, V]
                    entries += token_logprobs(logits, token_ids[row, lo + 1: hi + 1].tolist(), k)
                if seq.sample:
                    result.prompt_logprobs[seq.request_id] = entries
                    del self.active[seq.request_id]
            first += seq.num_new_tokens
