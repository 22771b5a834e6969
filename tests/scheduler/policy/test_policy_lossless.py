"""Losslessness of the verify-length policies (DSpark paper, Appendix A), statistically.

A tiny target/drafter over the vocabulary {0, 1}: the target emits i.i.d. tokens with
p = (0.7, 0.3); the drafter proposes three i.i.d. drafts d1, d2, d3 with q = (0.5, 0.5). Its
confidence for a slot depends on the previous *sampled draft*, as DSpark's head does
(c_k = sigmoid(w . [h_k ; W1[x_{k-1}]])): c1 = 0.9, c2 = 0.5, c3 = 0.95 if d2 == 0 else 0.05.

On a jagged profile (step time 1, 1.5, 2, 2 s at B = 1..4, one request), verifying d1 pays,
verifying d2 alone does not, but d2 + d3 together do when c3 is high. So:
- the early-stopping greedy (Algorithm 1) stops at slot 2: l = 1 always -> lossless;
- a full search picks l = 3 when d2 = 0 and l = 1 when d2 = 1: whether d2 is verified depends on
  d2 itself. A verified d2 = 0 is always accepted (p/q = 1.4), an unverified position is sampled
  from p, so after an accepted d1 the second token is 0 with probability 0.5 + 0.5 * 0.7 = 0.85:
  the output becomes (0.85, 0.15) instead of (0.7, 0.3), the paper's example.
- dspark-async is lossless with K from an earlier step (independent drafts) and biased when K is
  searched on the current drafts (negative control).
The rejection sampler is the standard one (DEEPSPEC_FORMAT.md section 2, step 11), in numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import pytest

from sparkserve.scheduler.policy import (
    VerifyRequest,
    plan_budget_k,
    survival,
    verify_dspark,
    verify_dspark_async,
)
from sparkserve.scheduler.profile import ThroughputProfile

P = np.array([0.7, 0.3])  # target distribution, every position
Q = np.array([0.5, 0.5])  # draft distribution, every position
RESIDUAL = np.maximum(P - Q, 0) / np.maximum(P - Q, 0).sum()  # = (1, 0)
JAGGED = ThroughputProfile((1, 2, 3, 4), (1,), ((1.0,), (1.5,), (2.0,), (2.0,)))
LINEAR = ThroughputProfile((1, 4), (1,), ((1.2,), (1.8,)))  # t = 1 + 0.2 B: greedy l = 3 iff d2 = 0
NUM_SAMPLES = 40_000
NUM_TOKENS = 3
CHI2_DF7_P1E4 = 29.88  # chi-square critical value, 7 degrees of freedom, p = 1e-4

Policy = Callable[[tuple[int, ...], np.random.Generator], int]  # (drafts, rng) -> verify length


def confidences(drafts: tuple[int, ...]) -> tuple[float, ...]:
    return (0.9, 0.5, 0.95 if drafts[1] == 0 else 0.05)


@cache
def greedy(profile: ThroughputProfile, drafts: tuple[int, ...]) -> int:
    return verify_dspark([VerifyRequest(confidences(drafts), 3)], profile, 0, 100).lengths[0]


@cache
def full_search(profile: ThroughputProfile, drafts: tuple[int, ...]) -> int:
    """The biased rule: argmax over every l of (1 + sum_{j<=l} a_j) / t(1 + l)."""
    a = survival(confidences(drafts))
    thetas = [(1 + sum(a[:length])) / profile.step_time(1 + length, 1) for length in range(4)]
    return int(np.argmax(thetas))


def budget_k(drafts: tuple[int, ...]) -> int:
    return plan_budget_k([VerifyRequest(confidences(drafts), 3)], JAGGED, 0, 100)


def async_top_k(drafts: tuple[int, ...], k: int) -> int:
    return verify_dspark_async([VerifyRequest(confidences(drafts), 3)], JAGGED, 0, 100, k).lengths[0]


POLICIES: dict[str, Policy] = {
    "greedy-jagged": lambda d, rng: greedy(JAGGED, d),
    "greedy-linear": lambda d, rng: greedy(LINEAR, d),
    "async-earlier-k": lambda d, rng: async_top_k(d, budget_k(tuple(rng.integers(0, 2, size=3)))),
    "full-search": lambda d, rng: full_search(JAGGED, d),
    "async-current-k": lambda d, rng: async_top_k(d, budget_k(d)),
}


def generate(policy: Policy, rng: np.random.Generator) -> tuple[int, ...]:
    """The first NUM_TOKENS output tokens: one speculative step, then plain target sampling."""
    drafts = tuple(int(x) for x in rng.choice(2, size=3, p=Q))
    length = policy(drafts, rng)
    out: list[int] = []
    for d in drafts[:length]:
        if rng.random() < min(1.0, P[d] / Q[d]):
            out.append(d)  # accepted draft
        else:
            out.append(int(rng.choice(2, p=RESIDUAL)))  # recovered token; the step ends
            break
    else:
        out.append(int(rng.choice(2, p=P)))  # bonus token
    while len(out) < NUM_TOKENS:
        out.append(int(rng.choice(2, p=P)))  # later steps (no speculation)
    return tuple(out[:NUM_TOKENS])


def empirical(policy: Policy, seed: int = 0) -> np.ndarray:
    """Counts of the 8 possible 3-token outputs, indexed by x1 * 4 + x2 * 2 + x3."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(8)
    for _ in range(NUM_SAMPLES):
        x1, x2, x3 = generate(policy, rng)
        counts[x1 * 4 + x2 * 2 + x3] += 1
    return counts


TARGET = np.array([P[a] * P[b] * P[c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])


def chi2(counts: np.ndarray) -> float:
    expected = TARGET * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def second_token_given_first_is_one(counts: np.ndarray) -> float:
    """P(x2 = 0 | x1 = 1): 0.7 for a lossless policy, 0.85 under the full search."""
    return counts[4:6].sum() / counts[4:].sum()


def test_setup_is_the_appendix_a_situation() -> None:
    assert greedy(JAGGED, (0, 0, 0)) == greedy(JAGGED, (0, 1, 0)) == 1  # greedy stops at slot 2
    assert full_search(JAGGED, (0, 0, 0)) == 3 and full_search(JAGGED, (0, 1, 0)) == 1  # leak
    assert budget_k((0, 0, 0)) == 3 and budget_k((0, 1, 0)) == 1
    assert greedy(LINEAR, (0, 0, 0)) == 3 and greedy(LINEAR, (0, 1, 0)) == 2  # legit: depends on d2 only


@pytest.mark.parametrize("name", ["greedy-jagged", "greedy-linear", "async-earlier-k"])
def test_policy_is_lossless(name: str) -> None:
    counts = empirical(POLICIES[name])
    assert chi2(counts) < CHI2_DF7_P1E4
    assert second_token_given_first_is_one(counts) == pytest.approx(0.7, abs=0.02)


@pytest.mark.parametrize("name", ["full-search", "async-current-k"])
def test_full_search_is_biased_negative_control(name: str) -> None:
    counts = empirical(POLICIES[name])
    assert chi2(counts) > 10 * CHI2_DF7_P1E4
    assert second_token_given_first_is_one(counts) == pytest.approx(0.85, abs=0.02)
    # Marginal of x2: 0.8 * 0.85 + 0.2 * 0.7 = 0.82 (d1 accepted w.p. 0.8).
    assert (counts[0:2].sum() + counts[4:6].sum()) / counts.sum() == pytest.approx(0.82, abs=0.01)
