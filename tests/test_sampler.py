"""Tests for engine/sampler.py: exact filters, statistical sampling checks, seeds, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from engine.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties_and_bias,
    processed_probs,
    to_token_logprobs,
)
from scheduler.sampling_params import SamplingParams

torch.set_num_threads(1)

BASE = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # distinct probabilities, no filter boundary ties
LOGITS = BASE.log()


def chi2_critical(dof: int, z: float = 4.265) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof); z = 4.265 is the 1e-5 normal tail."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_stat(samples: Tensor, expected: Tensor) -> float:
    """Pearson chi-square of integer samples against probabilities ``expected`` ``[V]``.

    Returns inf when a sample falls where the expected probability is 0.
    """
    n = samples.numel()
    counts = torch.bincount(samples.flatten(), minlength=expected.numel()).double()
    support = expected > 0
    if counts[~support].sum() > 0:
        return math.inf
    exp = expected[support].double() * n
    return float(((counts[support] - exp) ** 2 / exp).sum())


def meta_for(
    params: list[SamplingParams],
    vocab: int = 6,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    return SamplingMetadata.build(
        params,
        generators if generators is not None else [None] * len(params),
        outputs if outputs is not None else [[] for _ in params],
        vocab,
        "cpu",
    )


def renorm(mask: list[int], base: Tensor = BASE) -> Tensor:
    p = base * torch.tensor(mask, dtype=base.dtype)
    return p / p.sum()


EXACT_CASES = [
    (SamplingParams(temperature=2.0), BASE.sqrt() / BASE.sqrt().sum()),
    (SamplingParams(top_k=3), renorm([1, 1, 1, 0, 0, 0])),
    (SamplingParams(top_p=0.7), renorm([1, 1, 1, 0, 0, 0])),
    (SamplingParams(top_p=0.6), renorm([1, 1, 0, 0, 0, 0])),
    (SamplingParams(top_p=0.3), renorm([1, 0, 0, 0, 0, 0])),
    (SamplingParams(min_p=0.3), renorm([1, 1, 1, 0, 0, 0])),  # threshold 0.12
    # top-p over the top-k-renormalised distribution: top-3 = (.5, .3125, .1875); .8125 >= .8
    (SamplingParams(top_k=3, top_p=0.8), renorm([1, 1, 0, 0, 0, 0])),
    (SamplingParams(top_k=4, min_p=0.5), renorm([1, 1, 0, 0, 0, 0])),  # threshold 0.2
    (SamplingParams(), BASE),
]


def test_processed_probs_exact_per_row() -> None:
    params = [p for p, _ in EXACT_CASES]
    expected = torch.stack([e for _, e in EXACT_CASES])
    probs = processed_probs(LOGITS.expand(len(params), -1).clone(), meta_for(params))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_greedy_is_argmax_in_mixed_batch() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0) if r % 2 == 0 else SamplingParams(top_k=5) for r in range(8)]
    out = Sampler()(logits, meta_for(params, vocab=50))
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    greedy_only = Sampler()(logits, meta_for([SamplingParams(temperature=0.0)] * 8, vocab=50))
    assert torch.equal(greedy_only.token_ids, logits.argmax(-1))
    assert out.logprobs is None


@pytest.mark.parametrize("case", [1, 2, 3, 5, 6, 7])
def test_sampling_matches_filtered_distribution(case: int) -> None:
    """20k samples follow the exact filtered distribution; the bound rejects a wrong filter."""
    params, expected = EXACT_CASES[case]
    n = 20_000
    torch.manual_seed(1234 + case)
    assert (expected > 0).sum() < 6  # some filter is active
    samples = Sampler()(LOGITS.expand(n, -1).clone(), meta_for([params] * n)).token_ids
    bound = chi2_critical(int((expected > 0).sum()) - 1)
    assert chi2_stat(samples, expected) < bound
    # negative controls: the unfiltered distribution, and the filter keeping one token more
    assert chi2_stat(samples, BASE) > bound
    wider = BASE * (torch.arange(6) <= int((expected > 0).sum())).float()
    assert chi2_stat(samples, wider / wider.sum()) > bound


def test_seeded_rows_independent_of_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.3, top_p=0.9)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    alone_gen = torch.Generator().manual_seed(7)
    mixed_gen = torch.Generator().manual_seed(7)
    alone, mixed = [], []
    for _ in range(30):
        alone.append(Sampler()(logits.clone(), meta_for([seeded], 1000, generators=[alone_gen])).token_ids[0])
        batch = torch.cat([torch.randn(2, 1000), logits, torch.randn(1, 1000)])
        gens = [torch.Generator().manual_seed(99), None, mixed_gen, None]
        meta = meta_for([other, other, seeded, other], 1000, generators=gens)
        mixed.append(Sampler()(batch, meta).token_ids[2])
    assert torch.equal(torch.stack(alone), torch.stack(mixed))
    assert len(set(torch.stack(alone).tolist())) > 5  # really random, not constant


def test_penalties_and_logit_bias_exact() -> None:
    logits = torch.zeros(2, 5)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((2, 3.0), (4, -1.5))),
        SamplingParams(),
    ]
    out = apply_penalties_and_bias(logits, meta_for(params, vocab=5, outputs=[[1, 1, 3], [0, 0]]))
    expected = torch.tensor([[0.0, -1.0, 3.0, -0.75, -1.5], [0.0] * 5])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert torch.equal(logits, torch.zeros(2, 5))  # input untouched
    with pytest.raises(ValueError):
        meta_for([SamplingParams(logit_bias=((9, 1.0),))], vocab=5)


def test_expand_for_verify_counts_include_earlier_drafts() -> None:
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.5)]
    meta = meta_for(params, vocab=6, outputs=[[2], []])
    drafts = torch.tensor([[5, 5, 2], [1, 0, 0]])
    wide = meta.expand_for_verify(drafts)
    assert wide.output_token_counts is not None and wide.temperature.shape == (8,)
    counts = wide.output_token_counts.view(2, 4, 6)
    assert counts[0].tolist() == [
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 1],
        [0, 0, 1, 0, 0, 2],
        [0, 0, 2, 0, 0, 2],
    ]
    assert counts[1, 3].tolist() == [2, 1, 0, 0, 0, 0]
    assert wide.temperature.tolist() == [1.0] * 4 + [0.5] * 4


def test_logprobs_are_log_softmax_of_adjusted_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.8, logprobs=4, logit_bias=((7, 2.0),)),
        SamplingParams(temperature=1.0),
    ]
    meta = meta_for(params, vocab=20)
    out = Sampler()(logits, meta)
    reference = torch.log_softmax(apply_penalties_and_bias(logits, meta), dim=-1)
    assert out.logprobs is not None and out.top_token_ids is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.token_ids[:, None])[:, 0])
    top_vals, top_ids = reference.topk(4, dim=-1)
    assert torch.equal(out.top_token_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top_vals)
    converted = to_token_logprobs(out, [p.logprobs for p in params])
    assert converted[2] is None and converted[0] is not None and converted[1] is not None
    assert converted[0].token_id == int(logits[0].argmax()) and len(converted[0].top) == 2
    assert len(converted[1].top) == 4 and converted[1].top[0][0] == int(top_ids[1, 0])


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=40),
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.none(), st.integers(1, 40)),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
)
def test_processed_probs_properties(
    logits: list[float], temperature: float, top_k: int | None, top_p: float, min_p: float
) -> None:
    vocab = len(logits)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    row = torch.tensor(logits)
    probs = processed_probs(row[None].clone(), meta_for([params], vocab=vocab))[0]
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    kept = probs > 0
    assert float(row[kept].max()) == float(row.max())  # a most likely token always survives
    if top_k is not None and top_k < vocab:
        kth = row.sort(descending=True).values[top_k - 1]
        assert bool((row[kept] >= kth).all())
    tempered = torch.softmax(row / temperature, dim=-1)
    assert bool((probs[kept] >= min_p * probs.max() * (1 - 1e-5)).all())
    # top-p minimality: dropping the least likely kept token leaves top-k mass below top_p
    if top_k is None or top_k >= vocab:
        kept_mass = tempered[kept].sum()
        without_smallest = kept_mass - tempered[kept].min()
        if min_p == 0.0:
            assert float(kept_mass) >= top_p - 1e-5
        assert float(without_smallest) < top_p + 1e-5
