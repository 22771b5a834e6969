"""Token sampler: penalties, temperature / top-k / top-p / min-p, seeded sampling and logprobs.

Pipeline for one step over R requests (logits ``[R, V]`` fp32, V = vocabulary size):

1. ``apply_penalties_and_bias``: OpenAI presence / frequency penalties over the request's generated
   tokens and the dense ``logit_bias``. The result is the *adjusted logits*.
2. Greedy rows (temperature 0) take ``argmax`` of the adjusted logits.
3. Random rows sample from ``processed_probs`` (temperature, then top-k, top-p, min-p, renormalised),
   which is also the target distribution p that speculative verification uses
   (``engine/spec/rejection.py``; DeepSpec section 2 step 11).
4. Sampling is an *exponential race*: ``argmax_v p_v / e_v`` with ``e_v ~ Exp(1)`` i.i.d. picks v with
   probability p_v (``e_v / p_v ~ Exp(p_v)`` and the minimum of independent exponentials lands on v
   with probability proportional to its rate). A request with a seed draws its V exponentials from
   its own generator, so its tokens do not depend on the other requests in the batch; rows without a
   generator share one batched draw from the global RNG.

Logprobs choice: reported logprobs are ``log_softmax`` of the *adjusted* logits (after penalties and
``logit_bias``, before temperature and the truncation filters). They are finite for every token, defined
for greedy rows, and do not change with temperature; vLLM's default ("raw_logprobs") is the unadjusted
model output instead, so penalties and biases show up in ours but not in vLLM's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from scheduler.outputs import TokenLogprob
from scheduler.sampling_params import SamplingParams

_EXP_FLOOR = 1e-20  # exponential draws are clamped above 0 so that 0 / e never becomes NaN


@dataclass(frozen=True)
class SamplingMetadata:
    """Batched per-step view of R requests' ``SamplingParams`` (built once per step).

    Optional tensors are ``None`` when no request in the batch uses the feature, so the common
    case skips the work entirely.

    Attributes:
        temperature: ``[R]`` fp32; 0 for greedy rows.
        top_p: ``[R]`` fp32 in (0, 1] (1 = off), or None.
        top_k: ``[R]`` int64 in [1, V] (V = off), or None.
        min_p: ``[R]`` fp32 in [0, 1] (0 = off), or None.
        presence_penalty / frequency_penalty: ``[R]`` fp32, or None (both set or both None).
        output_token_counts: ``[R, V]`` int32 count of each token among the generated tokens
            (needed by the penalties), or None.
        logit_bias: ``[R, V]`` fp32 dense additive bias, or None.
        generators: per row, the request's seeded generator, or None for the global RNG (always
            None for greedy rows, which draw nothing).
        all_greedy / all_random: every row is greedy / no row is greedy (host-side flags, no sync).
        max_num_logprobs: largest ``SamplingParams.logprobs`` in the batch, None if nobody asked.
    """

    temperature: Tensor
    top_p: Tensor | None
    top_k: Tensor | None
    min_p: Tensor | None
    presence_penalty: Tensor | None
    frequency_penalty: Tensor | None
    output_token_counts: Tensor | None
    logit_bias: Tensor | None
    generators: list[torch.Generator | None]
    all_greedy: bool
    all_random: bool
    max_num_logprobs: int | None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Gathers R requests' parameters into tensors on ``device`` (one small copy each).

        ``output_token_ids[r]`` are request r's generated tokens so far (only read when some
        request uses a penalty). Raises ValueError for a ``logit_bias`` token outside the vocabulary.
        """
        num_rows = len(params)
        if len(generators) != num_rows or len(output_token_ids) != num_rows:
            raise ValueError("params, generators and output_token_ids must have the same length")
        greedy = [p.greedy for p in params]

        def column(values: list[float] | list[int], dtype: torch.dtype, used: bool = True) -> Tensor | None:
            return torch.tensor(values, dtype=dtype, device=device) if used else None

        temps = [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        top_p = column([p.top_p for p in params], torch.float32, any(p.top_p < 1.0 for p in params))
        ks = [vocab_size if p.top_k is None else min(p.top_k, vocab_size) for p in params]
        top_k = column(ks, torch.int64, any(k < vocab_size for k in ks))
        min_p = column([p.min_p for p in params], torch.float32, any(p.min_p > 0 for p in params))
        presence = frequency = counts = None
        if any(p.needs_penalties for p in params):
            presence = column([p.presence_penalty for p in params], torch.float32)
            frequency = column([p.frequency_penalty for p in params], torch.float32)
            counts = _token_counts(output_token_ids, vocab_size, device)
        bias = _dense_logit_bias(params, vocab_size, device) if any(p.logit_bias for p in params) else None
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            presence_penalty=presence,
            frequency_penalty=frequency,
            output_token_counts=counts,
            logit_bias=bias,
            generators=[None if g else gen for g, gen in zip(greedy, generators, strict=True)],
            all_greedy=all(greedy),
            all_random=not any(greedy),
            max_num_logprobs=max(asked) if asked else None,
        )

    def expand_for_verify(self, draft_token_ids: Tensor) -> SamplingMetadata:
        """Repeats every row ``gamma + 1`` times for the target positions of a verify step.

        Row ``r * (gamma + 1) + k`` describes target position k of request r (k = 0 follows the
        anchor, k = j + 1 follows draft j). Its penalty counts include drafts ``0 .. k-1``: the target
        distribution at position k is conditioned on those drafts having been generated.

        Args:
            draft_token_ids: ``[R, gamma]`` int64 drafts (padding must be valid token ids; padded
                positions are never used by the verifier).
        """
        num_rows, gamma = draft_token_ids.shape
        width = gamma + 1

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(width, dim=0)

        counts = None
        if self.output_token_counts is not None:
            counts = self.output_token_counts.unsqueeze(1).repeat(1, width, 1)  # [R, gamma+1, V]
            if gamma > 0:
                pos = torch.arange(width, device=counts.device)
                before = (pos[None, :] < pos[:, None]).to(counts.dtype)[:, :gamma]  # [gamma+1, gamma]: j < k
                index = draft_token_ids.unsqueeze(1).expand(num_rows, width, gamma)
                counts.scatter_add_(2, index, before.unsqueeze(0).expand(num_rows, width, gamma))
            counts = counts.flatten(0, 1)
        return replace(
            self,
            temperature=rep(self.temperature),
            top_p=rep(self.top_p),
            top_k=rep(self.top_k),
            min_p=rep(self.min_p),
            presence_penalty=rep(self.presence_penalty),
            frequency_penalty=rep(self.frequency_penalty),
            output_token_counts=counts,
            logit_bias=rep(self.logit_bias),
            generators=[g for g in self.generators for _ in range(width)],
        )


def _token_counts(
    output_token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> Tensor:
    """``[R, V]`` int32 occurrence counts of each request's generated tokens."""
    rows = [r for r, ids in enumerate(output_token_ids) for _ in ids]
    toks = [t for ids in output_token_ids for t in ids]
    counts = torch.zeros(len(output_token_ids), vocab_size, dtype=torch.int32, device=device)
    if toks:
        index = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
        counts.index_put_(index, torch.ones(len(toks), dtype=torch.int32, device=device), accumulate=True)
    return counts


def _dense_logit_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str
) -> Tensor:
    """``[R, V]`` fp32 additive bias from each request's ``(token id, bias)`` pairs."""
    rows, toks, vals = [], [], []
    for r, p in enumerate(params):
        for tok, val in p.logit_bias:
            if not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias token id {tok} outside the vocabulary [0, {vocab_size})")
            rows.append(r)
            toks.append(tok)
            vals.append(val)
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    bias[torch.tensor(rows, device=device), torch.tensor(toks, device=device)] = torch.tensor(
        vals, device=device
    )
    return bias


def apply_penalties_and_bias(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """OpenAI penalties and logit bias: ``l - presence * [count > 0] - frequency * count + bias``.

    Args:
        logits: ``[R, V]`` fp32 target logits (not modified).
    Returns:
        ``[R, V]`` fp32 adjusted logits (the input itself when nothing applies).
    """
    if meta.output_token_counts is not None:
        assert meta.presence_penalty is not None and meta.frequency_penalty is not None
        counts = meta.output_token_counts.to(logits.dtype)  # [R, V]
        logits = logits - meta.frequency_penalty[:, None] * counts
        logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    if meta.logit_bias is not None:
        logits = logits + meta.logit_bias
    return logits


def processed_probs(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Target distribution p: temperature, then top-k, top-p and min-p, renormalised.

    * top-k keeps the k largest logits (all tokens tied with the k-th are kept);
    * top-p keeps the smallest set of most likely tokens whose mass (under the top-k distribution)
      reaches ``top_p``;
    * min-p then removes tokens with probability below ``min_p * max probability``.
    Greedy rows (temperature 0) are computed at temperature 1; their probabilities are never sampled.

    Args:
        logits: ``[N, V]`` fp32 adjusted logits; ``meta`` has N rows (``expand_for_verify`` for verify).
    Returns:
        ``[N, V]`` fp32 probabilities, each row summing to 1.
    """
    temperature = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
    logits = logits / temperature[:, None]
    if meta.top_k is not None or meta.top_p is not None:
        logits = _apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    probs = torch.softmax(logits, dim=-1)
    if meta.min_p is not None:
        threshold = meta.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Masks logits outside top-k / top-p with -inf using one ascending sort. ``logits``: ``[N, V]``."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending, [N, V]
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))  # [N, 1] k-th largest logit
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V] mass of tokens <= this one
        drop = cum <= (1.0 - top_p)[:, None]
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_race(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Samples one token per row: ``argmax(probs / e)``, ``e ~ Exp(1)`` (rows need not be normalised).

    Rows with a generator draw their ``[V]`` exponentials from it (batch-independent); the others
    share one batched draw. ``probs``: ``[N, V]`` non-negative. Returns ``[N]`` int64.
    """
    e = torch.empty_like(probs).exponential_()  # [N, V]
    for row, gen in enumerate(generators):
        if gen is not None:
            e[row].exponential_(generator=gen)
    return (probs / e.clamp_min_(_EXP_FLOOR)).argmax(dim=-1)


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, plus logprobs when requested.

    Attributes:
        token_ids: ``[R]`` int64 sampled tokens.
        logprobs: ``[R]`` fp32 logprob of the sampled token, or None.
        top_token_ids / top_logprobs: ``[R, k]`` the k most likely tokens and their logprobs,
            k = ``max_num_logprobs`` (each request keeps its own first ``logprobs`` columns), or None.
    """

    token_ids: Tensor
    logprobs: Tensor | None = None
    top_token_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


def compute_logprobs(
    adjusted_logits: Tensor, token_ids: Tensor, num_top: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Logprobs of chosen tokens and the ``num_top`` best alternatives (see module docstring).

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


def to_token_logprobs(output: SamplerOutput, num_logprobs: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Converts a ``SamplerOutput`` to per-request ``TokenLogprob`` with one host transfer per tensor."""
    if output.logprobs is None or output.top_token_ids is None or output.top_logprobs is None:
        return [None] * len(num_logprobs)
    ids, chosen = output.token_ids.tolist(), output.logprobs.tolist()
    top_ids, top_vals = output.top_token_ids.tolist(), output.top_logprobs.tolist()
    result: list[TokenLogprob | None] = []
    for r, k in enumerate(num_logprobs):
        top = () if k is None else tuple(zip(top_ids[r][:k], top_vals[r][:k], strict=True))
        result.append(None if k is None else TokenLogprob(ids[r], chosen[r], top))
    return result


class Sampler:
    """Samples one token per request from the target logits of a plain (non-speculative) step."""

    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """``logits``: ``[R, V]`` fp32 last-position target logits; returns ``[R]`` tokens (+ logprobs)."""
        assert logits.ndim == 2 and logits.dtype == torch.float32, (logits.shape, logits.dtype)
        adjusted = apply_penalties_and_bias(logits, meta)  # [R, V]
        if meta.all_greedy:
            token_ids = adjusted.argmax(dim=-1)
        else:
            sampled = exponential_race(processed_probs(adjusted, meta), meta.generators)  # [R]
            if meta.all_random:
                token_ids = sampled
            else:
                token_ids = torch.where(meta.temperature > 0, sampled, adjusted.argmax(dim=-1))
        if meta.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        chosen, top_ids, top_values = compute_logprobs(adjusted, token_ids, meta.max_num_logprobs)
        return SamplerOutput(token_ids, chosen, top_ids, top_values)
