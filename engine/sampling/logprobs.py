"""Logprobs of emitted tokens.

Reported logprobs are ``log_softmax`` of the *adjusted* logits (after penalties and ``logit_bias``,
before temperature and the truncation filters). They are finite for every token, defined for greedy
rows, and do not change with temperature; vLLM's default ("raw_logprobs") is the unadjusted model output
instead, so penalties and biases show up in ours but not in vLLM's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparkserve.scheduler.outputs import TokenLogprob


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
