"""The sampling transforms, implemented once (plain sampling, the verifier and every drafter use them).

Pipeline for logits ``[N, V]`` (fp32) and N rows of ``SamplingMetadata``:

1. ``apply_penalties_and_bias``: OpenAI presence / frequency penalties over the row's generated tokens
   and the dense ``logit_bias``. The result is the *adjusted logits*: greedy rows take their argmax and
   reported logprobs are their log-softmax.
2. ``process_logits``: temperature, then top-k, top-p and min-p as ``-inf`` masks. ``softmax`` of the
   result is the distribution a sampled row draws from: the target distribution p of speculative
   verification, and a drafter's q when applied to drafter logits.

A drafter with a reduced draft vocabulary passes logits ``[N, V']`` (V' < V, a prefix of the token ids):
the filters then act on that prefix, and ``logit_bias`` is cut to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparkserve.engine.sampling.metadata import SamplingMetadata


def apply_penalties_and_bias(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """``l - presence * [count > 0] - frequency * count + bias`` (OpenAI semantics).

    Args:
        logits: ``[N, V']`` fp32 (V' <= V: a vocabulary prefix); not modified.
    Returns:
        ``[N, V']`` fp32 adjusted logits (the input itself when nothing applies).
    """
    vocab = logits.shape[-1]
    if meta.output_token_counts is not None:
        assert meta.presence_penalty is not None and meta.frequency_penalty is not None
        counts = meta.output_token_counts[:, :vocab].to(logits.dtype)  # [N, V']
        logits = logits - meta.frequency_penalty[:, None] * counts
        logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    if meta.logit_bias is not None:
        logits = logits + meta.logit_bias[:, :vocab]
    return logits


def process_logits(adjusted: Tensor, meta: SamplingMetadata) -> Tensor:
    """Temperature, then top-k, top-p and min-p (as ``-inf``), on adjusted logits.

    * top-k keeps the k largest logits (every token tied with the k-th is kept);
    * top-p keeps the smallest set of most likely tokens whose mass (under the top-k distribution)
      reaches ``top_p`` (the most likely token always survives);
    * min-p then removes tokens whose probability is below ``min_p * max probability``.
    Greedy rows (temperature 0) are scaled at temperature 1; they are never sampled.

    Args:
        adjusted: ``[N, V']`` fp32.
    Returns:
        ``[N, V']`` fp32 processed logits; ``softmax`` of a row is its sampling distribution.
    """
    temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
    logits = adjusted / temperature[:, None]
    if meta.top_k is not None or meta.top_p is not None:
        logits = _apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    if meta.min_p is not None:
        # p_v < min_p * p_max  <=>  logit_v - max logit < log(min_p)
        floor = logits.amax(dim=-1, keepdim=True) + torch.log(meta.min_p)[:, None]  # [N, 1]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sampling_probs(adjusted: Tensor, meta: SamplingMetadata) -> Tensor:
    """``softmax(process_logits(adjusted))``: ``[N, V']`` fp32 rows summing to 1."""
    return torch.softmax(process_logits(adjusted, meta), dim=-1)


def _apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Masks logits outside top-k / top-p with -inf using one ascending sort. ``logits``: ``[N, V']``."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending, [N, V']
    vocab = logits.shape[-1]
    if top_k is not None:
        k = top_k.clamp(1, vocab)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [N, 1] k-th largest logit
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V'] mass of tokens <= this one
        drop = cum <= (1.0 - top_p)[:, None]
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
