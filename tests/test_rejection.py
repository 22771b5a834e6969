"""Tests for engine/spec/rejection.py: exact cases and distributional losslessness (with negative controls)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from engine.spec import rejection
from engine.spec.rejection import rejection_sample

torch.set_num_threads(1)


def chi2_critical(dof: int, z: float = 4.265) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof); z = 4.265 is the 1e-5 normal tail."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_stat(samples: Tensor, expected: Tensor) -> float:
    """Pearson chi-square of category ids ``samples`` against probabilities ``expected`` (inf off-support)."""
    counts = torch.bincount(samples.flatten(), minlength=expected.numel()).double()
    support = expected > 0
    if counts[~support].sum() > 0:
        return math.inf
    exp = expected[support].double() * samples.numel()
    return float(((counts[support] - exp) ** 2 / exp).sum())


def one_hot(ids: list[int], vocab: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def emitted(out: rejection.RejectionOutput, row: int) -> list[int]:
    return out.output_token_ids[row, : int(out.num_emitted[row])].tolist()


# ---------------------------------------------------------------- exact cases


def test_greedy_rows_accept_matching_prefix() -> None:
    argmax = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7]])
    drafts = torch.tensor([[4, 5, 1], [4, 5, 6], [4, 5, 6], [9, 5, 6]])
    num_draft = torch.tensor([3, 3, 1, 0])
    out = rejection_sample(drafts, num_draft, None, None, argmax, torch.ones(4, dtype=torch.bool), [None] * 4)
    assert emitted(out, 0) == [4, 5, 6]  # 2 accepted + recovered argmax
    assert emitted(out, 1) == [4, 5, 6, 7]  # all accepted + bonus
    assert emitted(out, 2) == [4, 5]  # l_r = 1: padded drafts ignored, bonus at position 1
    assert emitted(out, 3) == [4]  # plain decode
    assert out.num_accepted.tolist() == [2, 3, 1, 0]
    assert out.output_token_ids[3].tolist() == [4, 0, 0, 0]  # padding after the emitted tokens


def test_random_rows_exact_cases() -> None:
    vocab, gamma = 8, 3
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    num_draft = torch.tensor([3, 3, 2, 3, 3])
    q = torch.full((5, gamma, vocab), 1.0 / vocab)
    target = torch.full((5, gamma + 1, vocab), 1.0 / vocab)
    # row 0: p(x_i) = 1 everywhere -> all accepted, bonus from p_3 (one-hot 7)
    target[0] = one_hot([1, 2, 3, 7], vocab)
    # row 1: p_1(x_1) = 0 -> rejected at 1; residual max(p_1 - q_1, 0) is one-hot 6
    target[1] = one_hot([1, 6, 3, 7], vocab)
    # row 2: l_r = 2 < gamma; all accepted -> bonus from p_2 (not p_3)
    target[2] = one_hot([1, 2, 5, 7], vocab)
    # row 3: q(x_0) = 0 but p(x_0) > 0 -> always accepted (ratio uses max(q, 1e-8)); p_1(x_1) = 0 rejects
    q[3, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    target[3, 0] = torch.tensor([0.0, 1e-3, 0.5, 0.499, 0.0, 0.0, 0.0, 0.0])
    target[3, 1] = one_hot([4], vocab)
    # row 4: p_0 = q_0 with x_0 outside both supports -> rejected, residual mass 0 -> fall back to p_0
    q[4, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    target[4, 0] = q[4, 0]
    argmax = torch.zeros(5, gamma + 1, dtype=torch.int64)
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed) for _ in range(5)]
        out = rejection_sample(drafts, num_draft, q, target, argmax, torch.zeros(5, dtype=torch.bool), gens)
        assert emitted(out, 0) == [1, 2, 3, 7]
        assert emitted(out, 1) == [1, 6]
        assert emitted(out, 2) == [1, 2, 5]
        assert emitted(out, 3) == [1, 4]
        assert out.num_accepted[4] == 0 and int(out.output_token_ids[4, 0]) in (6, 7)


def test_deterministic_drafts_without_draft_probs() -> None:
    """draft_probs=None: q is one-hot at the draft, so acceptance probability is p(x) and the residual
    is p with x removed; the first emitted token must still follow p_0."""
    n, vocab = 20_000, 5
    torch.manual_seed(11)
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    drafts = torch.full((n, 1), 2)
    target = p0.expand(n, 2, vocab).clone()
    out = rejection_sample(
        drafts,
        torch.ones(n, dtype=torch.int64),
        None,
        target,
        torch.zeros(n, 2, dtype=torch.int64),
        torch.zeros(n, dtype=torch.bool),
        [None] * n,
    )
    assert chi2_stat(out.output_token_ids[:, 0], p0) < chi2_critical(vocab - 1)
    assert abs(float(out.num_accepted.float().mean()) - 0.3) < 0.02


def test_num_draft_zero_is_plain_sampling() -> None:
    n, vocab = 20_000, 6
    torch.manual_seed(12)
    p0 = torch.softmax(torch.randn(vocab), dim=-1)
    target = p0.expand(n, 1, vocab).clone()
    out = rejection_sample(
        torch.zeros(n, 0, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
        None,
        target,
        torch.zeros(n, 1, dtype=torch.int64),
        torch.zeros(n, dtype=torch.bool),
        [None] * n,
    )
    assert out.output_token_ids.shape == (n, 1) and bool((out.num_emitted == 1).all())
    assert chi2_stat(out.output_token_ids[:, 0], p0) < chi2_critical(vocab - 1)


def test_seeded_row_independent_of_batch() -> None:
    vocab, gamma = 50, 4
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(3, gamma + 1, vocab, generator=g), dim=-1)
    q = torch.softmax(torch.randn(3, gamma, vocab, generator=g), dim=-1)
    drafts = torch.randint(0, vocab, (3, gamma), generator=g)
    args = dict(
        target_argmax=torch.zeros(3, gamma + 1, dtype=torch.int64), is_greedy=torch.zeros(3, dtype=torch.bool)
    )
    results = []
    for _ in range(2):
        gens = [None, torch.Generator().manual_seed(42), None]
        torch.manual_seed(len(results))  # unseeded rows differ between the two calls
        out = rejection_sample(drafts, torch.full((3,), gamma), q, target, generators=gens, **args)
        alone = rejection_sample(
            drafts[1:2],
            torch.full((1,), gamma),
            q[1:2],
            target[1:2],
            target_argmax=args["target_argmax"][1:2],
            is_greedy=args["is_greedy"][1:2],
            generators=[torch.Generator().manual_seed(42)],
        )
        assert emitted(out, 1) == emitted(alone, 0)
        results.append(emitted(out, 1))
    assert results[0] == results[1]


# ---------------------------------------------------------------- losslessness on a Markov "world"

VOCAB, GAMMA, N_RANDOM, N_GREEDY = 6, 3, 40_000, 500


def world() -> tuple[Tensor, Tensor]:
    """Target and draft next-token tables ``P, Q: [V, V]`` (row = previous token)."""
    g = torch.Generator().manual_seed(2023)
    P = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    Q = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    return P, Q


def verify_round(
    anchor: Tensor, is_greedy: Tensor, P: Tensor, Q: Tensor, Q_verify: Tensor
) -> rejection.RejectionOutput:
    """Drafts GAMMA tokens from Q (random rows; greedy rows draft argmax Q), verifies a random l_r of them
    against P. ``Q_verify`` is the table the verifier is told the drafts came from."""
    n = anchor.numel()
    prev, drafts, q_rows = anchor, [], []
    for _ in range(GAMMA):
        q_k = Q[prev]  # [n, V]
        x = torch.where(is_greedy, q_k.argmax(-1), torch.multinomial(q_k, 1).squeeze(1))
        drafts.append(x)
        q_rows.append(Q_verify[prev])
        prev = x
    draft_ids = torch.stack(drafts, dim=1)  # [n, GAMMA]
    contexts = torch.cat([anchor[:, None], draft_ids], dim=1)  # [n, GAMMA + 1]: token before each position
    target = P[contexts]  # [n, GAMMA + 1, V]
    num_draft = torch.randint(0, GAMMA + 1, (n,))
    return rejection_sample(
        draft_ids, num_draft, torch.stack(q_rows, dim=1), target, target.argmax(-1), is_greedy, [None] * n
    )


def first_two_tokens(P: Tensor, Q: Tensor, Q_verify: Tensor, is_greedy: Tensor) -> tuple[Tensor, Tensor]:
    anchor = torch.zeros(is_greedy.numel(), dtype=torch.int64)
    out1 = verify_round(anchor, is_greedy, P, Q, Q_verify)
    last = out1.output_token_ids.gather(1, out1.num_accepted[:, None]).squeeze(1)
    out2 = verify_round(last, is_greedy, P, Q, Q_verify)
    first = out1.output_token_ids[:, 0]
    second = torch.where(out1.num_emitted >= 2, out1.output_token_ids[:, 1], out2.output_token_ids[:, 0])
    return first, second


def lossless_stats(Q_verify_is_wrong: bool = False) -> tuple[float, float, float, float]:
    """Chi-square of first tokens and of (first, second) pairs vs the target, with their bounds."""
    torch.manual_seed(7)
    P, Q = world()
    Q_verify = torch.softmax(torch.randn(VOCAB, VOCAB), dim=-1) if Q_verify_is_wrong else Q
    is_greedy = torch.arange(N_RANDOM + N_GREEDY) >= N_RANDOM  # greedy rows mixed into the batch
    first, second = first_two_tokens(P, Q, Q_verify, is_greedy)
    # greedy rows: exactly the greedy target chain
    g1 = int(P[0].argmax())
    assert bool((first[is_greedy] == g1).all()) and bool((second[is_greedy] == P[g1].argmax()).all())
    first, second = first[~is_greedy], second[~is_greedy]
    joint = (P[0][:, None] * P).flatten()  # P(t1 | 0) * P(t2 | t1)
    return (
        chi2_stat(first, P[0]),
        chi2_critical(VOCAB - 1),
        chi2_stat(first * VOCAB + second, joint),
        chi2_critical(VOCAB * VOCAB - 1),
    )


def test_lossless_first_and_joint_distribution() -> None:
    stat1, bound1, stat2, bound2 = lossless_stats()
    assert stat1 < bound1, (stat1, bound1)
    assert stat2 < bound2, (stat2, bound2)


def test_negative_control_wrong_q_fails() -> None:
    stat1, bound1, stat2, bound2 = lossless_stats(Q_verify_is_wrong=True)
    assert stat1 > bound1 or stat2 > bound2, (stat1, bound1, stat2, bound2)


def test_negative_control_residual_p_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rejection, "_residual_distribution", lambda p, q: p)
    stat1, bound1, stat2, bound2 = lossless_stats()
    assert stat1 > bound1 or stat2 > bound2, (stat1, bound1, stat2, bound2)
