"""Tests for engine/sampling/: exact filters, statistical sampling checks, keyed randomness, penalties,
logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sparkserve.engine.sampling.draw import inverse_cdf, sample
from sparkserve.engine.sampling.logprobs import token_logprobs
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.sampling.transforms import apply_penalties_and_bias, sampling_probs
from sparkserve.kernels import keyed_random
from sparkserve.kernels.keyed_random import Draw, fmix32, keyed_gumbel, keyed_uniform, request_key
from sparkserve.scheduler.sampling_params import SamplingParams

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
    keys: list[int] | None = None,
    attempts: list[int] | None = None,
) -> SamplingMetadata:
    return SamplingMetadata.build(
        params, keys if keys is not None else list(range(len(params))),
        outputs if outputs is not None else [[] for _ in params], vocab, "cpu", attempts,
    )


def draw(logits: Tensor, meta: SamplingMetadata, positions: Tensor | None = None) -> Tensor:
    positions = torch.zeros(logits.shape[0], dtype=torch.int64) if positions is None else positions
    return sample(apply_penalties_and_bias(logits, meta), meta, positions)


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
    probs = sampling_probs(LOGITS.expand(len(params), -1).clone(), meta_for(params))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_greedy_is_argmax_in_mixed_batch() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0) if r % 2 == 0 else SamplingParams(top_k=5) for r in range(8)]
    out = draw(logits, meta_for(params, vocab=50))
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))
    greedy_only = draw(logits, meta_for([SamplingParams(temperature=0.0)] * 8, vocab=50))
    assert torch.equal(greedy_only, logits.argmax(-1))


@pytest.mark.parametrize("case", [1, 2, 3, 5, 6, 7])
@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_matches_filtered_distribution(case: int, seeded: bool) -> None:
    """20k samples follow the exact filtered distribution, by CDF inversion (unseeded) and by keyed
    Gumbel-max (seeded); the bound rejects a wrong filter."""
    params, expected = EXACT_CASES[case]
    if seeded:
        params = dataclasses.replace(params, seed=case)
    n = 20_000
    assert (expected > 0).sum() < 6  # some filter is active
    keys = [request_key(None, f"r{i}", case) for i in range(n)]
    samples = draw(LOGITS.expand(n, -1).clone(), meta_for([params] * n, keys=keys))
    bound = chi2_critical(int((expected > 0).sum()) - 1)
    assert chi2_stat(samples, expected) < bound
    # negative controls: the unfiltered distribution, and the filter keeping one token more
    assert chi2_stat(samples, BASE) > bound
    wider = BASE * (torch.arange(6) <= int((expected > 0).sum())).float()
    assert chi2_stat(samples, wider / wider.sum()) > bound


def test_seeded_rows_independent_of_batch_and_position_keyed() -> None:
    """A seeded row's token depends on (seed, position) only: the same alone or in any batch; other
    positions give other tokens (really random); another seed gives other tokens."""
    seeded = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.3, top_p=0.9)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    key = request_key(7, "any-id")
    alone, mixed = [], []
    for pos in range(30):
        p = torch.tensor([pos])
        alone.append(int(draw(logits.clone(), meta_for([seeded], 1000, keys=[key]), p)[0]))
        batch = torch.cat([torch.randn(2, 1000), logits, torch.randn(1, 1000)])
        meta = meta_for([other, other, seeded, other], 1000, keys=[1, 2, key, 3])
        mixed.append(int(draw(batch, meta, torch.tensor([5, 9, pos, 2]))[2]))
    assert alone == mixed
    assert len(set(alone)) > 5  # really random, not constant
    other_seed = [int(draw(logits.clone(), meta_for([seeded], 1000, keys=[request_key(8, "x")]),
                           torch.tensor([pos]))[0]) for pos in range(30)]
    assert other_seed != alone
    assert request_key(7, "a") == request_key(7, "b") != request_key(None, "a") != request_key(None, "b")
    with pytest.raises(ValueError, match="int64"):
        request_key(2**63, "a")


def test_keyed_hash_matches_python_reference_and_is_uniform() -> None:
    """The tensor hash equals the pure-Python fmix32 reference on random states (no int64 overflow
    surprises), and keyed uniforms / Gumbel noise have the right distribution."""
    states = torch.randint(0, 2**32, (1000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([fmix32(int(h)) for h in states])
    assert torch.equal(keyed_random._fmix32(states), expected)
    n = 50_000
    keys = torch.full((n,), request_key(3, ""), dtype=torch.int64)
    u = keyed_uniform(keys, torch.arange(n), int(Draw.ACCEPT))
    assert bool(((u > 0) & (u < 1)).all())
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert chi2_stat(torch.repeat_interleave(torch.arange(20), counts.long()), torch.full((20,), 0.05)) < chi2_critical(19)
    # streams differ: another draw index or position gives unrelated numbers
    assert not torch.equal(u, keyed_uniform(keys, torch.arange(n), int(Draw.RECOVER)))
    g = keyed_gumbel(keys[:8], torch.arange(8), int(Draw.TOKEN), 4096)
    assert abs(float(g.mean()) - 0.5772) < 0.02 and abs(float(g.var()) - math.pi**2 / 6) < 0.05
    assert torch.equal(g[:, :100], keyed_gumbel(keys[:8], torch.arange(8), int(Draw.TOKEN), 100))  # vocab prefix


def test_inverse_cdf_never_picks_zero_weight() -> None:
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([1e-7, 0.5, 0.9999999, 1.0])
    chosen = inverse_cdf(weights, u)
    assert chosen[:3].tolist() == [1, 3, 3] and bool((weights[0, chosen] > 0).all())  # u = 1: a positive one


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


def test_expand_counts_include_earlier_drafts() -> None:
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.5)]
    meta = meta_for(params, vocab=6, outputs=[[2], []])
    wide = meta.expand((3, 1), torch.tensor([5, 5, 2, 1]))  # ragged: l = 3 and 1
    assert wide.output_token_counts is not None and wide.temperature.shape == (6,)
    counts = wide.output_token_counts
    assert counts[:4].tolist() == [
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 1],
        [0, 0, 1, 0, 0, 2],
        [0, 0, 2, 0, 0, 2],
    ]
    assert counts[5].tolist() == [0, 1, 0, 0, 0, 0]
    assert wide.temperature.tolist() == [1.0] * 4 + [0.5] * 2


def test_logprobs_are_log_softmax_of_adjusted_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.8, logprobs=4, logit_bias=((7, 2.0),))]
    meta = meta_for(params, vocab=20)
    adjusted = apply_penalties_and_bias(logits[:2], meta)
    tokens = draw(logits[:2], meta).tolist()
    reference = torch.log_softmax(adjusted, dim=-1)
    for row, k in ((0, 2), (1, 4)):
        (lp,) = token_logprobs(adjusted[row: row + 1], [tokens[row]], k)
        assert lp.token_id == tokens[row] and lp.logprob == pytest.approx(float(reference[row, tokens[row]]), abs=1e-6)
        top_vals, top_ids = reference[row].topk(k)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-6)
    assert tokens[0] == int(logits[0].argmax())


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
    probs = sampling_probs(row[None].clone(), meta_for([params], vocab=vocab))[0]
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
