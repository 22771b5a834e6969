"""The verify component (engine/spec_decode/verifier.py + rejection.py) on a flattened ragged batch:
exact cases, keyed-coupling identities, and distributional losslessness with negative controls."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from sparkserve.engine.sampling import draw as draw_module
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode import rejection
from sparkserve.engine.spec_decode.rejection import DraftProbs, RaggedDrafts
from sparkserve.engine.spec_decode.verifier import Verifier, VerifyInput, emitted_tokens
from sparkserve.kernels.keyed_random import Draw, keyed_gumbel, request_key
from sparkserve.scheduler.sampling_params import SamplingParams

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


GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)


def verify_flat(probs: Tensor, drafts: Tensor, lengths: list[int], params: list[SamplingParams],
                q: DraftProbs | None, keys: list[int], first_positions: list[int], attempt: int = 0):
    """Verify R requests from flat tensors: ``probs`` ``[sum(1 + l_r), V]`` target distributions
    (logits = log p), ``drafts`` ``[sum l_r]``, ``q`` their distributions."""
    n = len(params)
    meta = SamplingMetadata.build(params, keys, [[] for _ in params], probs.shape[-1], attempts=[attempt] * n)
    inp = VerifyInput(tuple(f"r{i}" for i in range(n)), probs.log(), RaggedDrafts(drafts, tuple(lengths)), q, meta,
                      torch.tensor(first_positions), [[] for _ in params])
    out = Verifier().verify(inp)
    accepted = out.num_accepted.tolist()
    return SimpleNamespace(token_ids=emitted_tokens(out.token_ids.tolist(), accepted), num_accepted=accepted)


def verify(probs_rows: list[Tensor], drafts: list[list[int]], params: list[SamplingParams], q: list[Tensor | None] | None = None,
           keys: list[int] | None = None, first_positions: list[int] | None = None, attempt: int = 0):
    """Verify R requests: ``probs_rows[r]`` ``[1 + l_r, V]`` target distributions, ``drafts[r]`` the l_r
    drafts, ``q[r]`` ``[l_r, V]`` their q (None = one-hot)."""
    n = len(params)
    keys = keys if keys is not None else [request_key(p.seed, f"r{i}") for i, p in enumerate(params)]
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
    probs = None
    if q is not None and any(x is not None for x in q):
        vocab = probs_rows[0].shape[-1]
        rows = [x if x is not None else torch.zeros(len(d), vocab) for x, d in zip(q, drafts, strict=True)]
        one_hot = torch.tensor([x is None for x, d in zip(q, drafts, strict=True) for _ in d])
        probs = DraftProbs(torch.cat(rows), one_hot)
    return verify_flat(torch.cat(probs_rows), flat, [len(d) for d in drafts], params, probs, keys,
                       first_positions or [10] * n, attempt)


def one_hot(ids: list[int], vocab: int) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float().clamp_min(1e-30)


# ---------------------------------------------------------------- exact cases


def test_greedy_rows_accept_matching_prefix_ragged() -> None:
    vocab = 10
    target = one_hot([4, 5, 6, 7], vocab)  # argmax chain 4 5 6 7
    drafts = [[4, 5, 1], [4, 5, 6], [4], [], [9, 5, 6]]
    rows = [target[: len(d) + 1] for d in drafts]
    out = verify(rows, drafts, [GREEDY] * 5)
    assert out.token_ids == [[4, 5, 6], [4, 5, 6, 7], [4, 5], [4], [4]]
    assert out.num_accepted == [2, 3, 1, 0, 0]


def test_random_rows_exact_cases() -> None:
    vocab = 8
    uniform = torch.full((3, vocab), 1.0 / vocab)
    for attempt in range(20):
        # row 0: p(x_i) = 1 everywhere -> all accepted, bonus from p_3 (one-hot 7)
        # row 1: p_1(x_1) = 0 -> rejected at 1; residual max(p_1 - q_1, 0) is one-hot 6
        # row 2: l_r = 2; all accepted -> bonus from p_2 (not p_3)
        out = verify([one_hot([1, 2, 3, 7], vocab), one_hot([1, 6, 3, 7], vocab), one_hot([1, 2, 5], vocab)],
                     [[1, 2, 3], [1, 2, 3], [1, 2]], [SAMPLED] * 3, [uniform, uniform, uniform[:2]], attempt=attempt)
        assert out.token_ids[0] == [1, 2, 3, 7]
        assert out.token_ids[1] == [1, 6]
        assert out.token_ids[2] == [1, 2, 5]
    # q(x_0) = 0 but p(x_0) > 0 -> always accepted (p / max(q, 1e-8)); p_1(x_1) = 0 rejects
    q = torch.zeros(2, vocab)
    q[0, 2:4] = 0.5
    q[1] = 1.0 / vocab
    p0 = torch.tensor([1e-30, 1e-3, 0.5, 0.499, 1e-30, 1e-30, 1e-30, 1e-30])
    out = verify([torch.stack([p0, one_hot([4], vocab)[0]])], [[1]], [SAMPLED], [q[:1]])
    assert out.num_accepted == [1] and out.token_ids == [[1, 4]]


def test_deterministic_drafts_one_hot_q() -> None:
    """One-hot q (no stored q): acceptance probability is p(x) and the residual is p without x; the
    first emitted token follows p_0."""
    n, vocab = 20_000, 5
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    out = verify([p0.expand(2, vocab)] * n, [[2]] * n, [SAMPLED] * n, [None] * n)
    first = torch.tensor([t[0] for t in out.token_ids])
    assert chi2_stat(first, p0) < chi2_critical(vocab - 1)
    assert abs(sum(out.num_accepted) / n - 0.3) < 0.02


def test_no_drafts_is_plain_sampling() -> None:
    n, vocab = 20_000, 6
    p0 = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(12)), dim=-1)
    for params in (SAMPLED, SamplingParams(temperature=1.0, seed=3)):
        keys = [request_key(None, f"k{i}") for i in range(n)]  # distinct streams (a seed fixes one key)
        out = verify([p0[None]] * n, [[]] * n, [params] * n, keys=keys)
        assert all(len(t) == 1 for t in out.token_ids)
        assert chi2_stat(torch.tensor([t[0] for t in out.token_ids]), p0) < chi2_critical(vocab - 1)


def test_seeded_rows_emit_the_same_tokens_at_any_verify_length_and_batch() -> None:
    """Coupling: a seeded row's emitted tokens equal its no-speculation samples (l = 0 at every
    position), whatever drafts it verifies and whatever else is in the batch."""
    vocab = 30
    gen = torch.Generator().manual_seed(0)
    seeded = SamplingParams(temperature=1.0, seed=42)
    key = request_key(42, "")
    p = torch.softmax(torch.randn(8, vocab, generator=gen), dim=-1)  # one p per position (context-free world)
    plain = [verify([p[k: k + 1]], [[]], [seeded], keys=[key], first_positions=[100 + k]).token_ids[0][0]
             for k in range(8)]
    for length in range(1, 8):
        for drafts in ([plain[:length]], [torch.randint(0, vocab, (length,), generator=gen).tolist()]):
            others = torch.softmax(torch.randn(3, vocab, generator=gen), dim=-1)
            out = verify([others[:2], p[: length + 1], others[2:]], [[5], drafts[0], []], [SAMPLED, seeded, SAMPLED],
                         [None, None, None], keys=[1, key, 2], first_positions=[7, 100, 3])
            emitted = out.token_ids[1]
            assert emitted == plain[: len(emitted)]
    assert len(set(plain)) > 3


# ---------------------------------------------------------------- losslessness on a Markov "world"

VOCAB, GAMMA, N_RANDOM, N_GREEDY = 6, 3, 40_000, 500


def world() -> tuple[Tensor, Tensor]:
    """Target and draft next-token tables ``P, Q: [V, V]`` (row = previous token)."""
    g = torch.Generator().manual_seed(2023)
    P = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    Q = torch.softmax(1.5 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    return P, Q


def verify_round(anchor: Tensor, kinds: list[str], P: Tensor, Q: Tensor, Q_verify: Tensor, keys: list[int],
                 first_positions: Tensor, attempt: int, gen: torch.Generator) -> list[list[int]]:
    """Drafts GAMMA tokens from Q (free rows: multinomial; greedy rows: argmax; coupled rows: Gumbel-max
    keyed like the target), verifies a random l_r of them against P. ``Q_verify`` is the table the
    verifier is told the free drafts came from."""
    n = anchor.numel()
    prev, drafts, q_rows = anchor, [], []
    key_t = torch.tensor(keys)
    coupled = torch.tensor([k == "coupled" for k in kinds])
    greedy = torch.tensor([k == "greedy" for k in kinds])
    for j in range(GAMMA):
        q_k = Q[prev]  # [n, V]
        noise = keyed_gumbel(key_t, first_positions + j, int(Draw.TOKEN), VOCAB)
        x = torch.multinomial(q_k, 1, generator=gen).squeeze(1)
        x = torch.where(coupled, (q_k.log() + noise).argmax(-1), x)
        x = torch.where(greedy, q_k.argmax(-1), x)
        drafts.append(x)
        q_rows.append(Q_verify[prev])
        prev = x
    draft_ids = torch.stack(drafts, dim=1)  # [n, GAMMA]
    contexts = torch.cat([anchor[:, None], draft_ids], dim=1)  # token before each position
    lengths = torch.randint(0, GAMMA + 1, (n,), generator=gen)
    params = {"free": SAMPLED, "greedy": GREEDY, "coupled": SamplingParams(temperature=1.0, seed=1)}
    rows = torch.arange(GAMMA + 1)[None, :] <= lengths[:, None]  # [n, GAMMA + 1] verified rows
    verified = torch.arange(GAMMA)[None, :] < lengths[:, None]  # [n, GAMMA] verified drafts
    q = DraftProbs(torch.stack(q_rows, dim=1)[verified], torch.zeros(int(verified.sum()), dtype=torch.bool))
    out = verify_flat(P[contexts[rows]], draft_ids[verified], lengths.tolist(), [params[k] for k in kinds], q, keys,
                      first_positions.tolist(), attempt)
    return out.token_ids


def lossless_stats(Q_verify_is_wrong: bool = False, kind: str = "free") -> tuple[float, float, float, float]:
    """Chi-square of first tokens and of (first, second) pairs vs the target, with their bounds."""
    gen = torch.Generator().manual_seed(7)
    P, Q = world()
    Q_verify = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen), dim=-1) if Q_verify_is_wrong else Q
    kinds = [kind] * N_RANDOM + ["greedy"] * N_GREEDY  # greedy rows mixed into the batch
    keys = [request_key(None, f"w{i}") for i in range(len(kinds))]
    n = len(kinds)
    out1 = verify_round(torch.zeros(n, dtype=torch.int64), kinds, P, Q, Q_verify, keys, torch.ones(n, dtype=torch.int64), 1, gen)
    last = torch.tensor([t[-1] for t in out1])
    out2 = verify_round(last, kinds, P, Q, Q_verify, keys, 1 + torch.tensor([len(t) for t in out1]), 2, gen)
    first = torch.tensor([t[0] for t in out1])
    second = torch.tensor([t1[1] if len(t1) >= 2 else t2[0] for t1, t2 in zip(out1, out2, strict=True)])
    g1 = int(P[0].argmax())  # greedy rows: exactly the greedy target chain
    assert bool((first[N_RANDOM:] == g1).all()) and bool((second[N_RANDOM:] == P[g1].argmax()).all())
    first, second = first[:N_RANDOM], second[:N_RANDOM]
    joint = (P[0][:, None] * P).flatten()  # P(t1 | 0) * P(t2 | t1)
    return (chi2_stat(first, P[0]), chi2_critical(VOCAB - 1), chi2_stat(first * VOCAB + second, joint),
            chi2_critical(VOCAB * VOCAB - 1))


@pytest.mark.parametrize("kind", ["free", "coupled"])
def test_lossless_first_and_joint_distribution(kind: str) -> None:
    stat1, bound1, stat2, bound2 = lossless_stats(kind=kind)
    assert stat1 < bound1, (stat1, bound1)
    assert stat2 < bound2, (stat2, bound2)


def test_negative_control_wrong_q_fails() -> None:
    stat1, bound1, stat2, bound2 = lossless_stats(Q_verify_is_wrong=True)
    assert stat1 > bound1 or stat2 > bound2, (stat1, bound1, stat2, bound2)


def test_negative_control_residual_p_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rejection, "_residual", lambda p, q, draft_ids, index: p.clone())
    stat1, bound1, stat2, bound2 = lossless_stats()
    assert stat1 > bound1 or stat2 > bound2, (stat1, bound1, stat2, bound2)


def test_negative_control_coupling_noise_reused_across_positions_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong coupling whose noise does not depend on the position (the target reuses one draw for
    every token of a block) makes consecutive tokens dependent: the joint test catches it."""
    real = draw_module.keyed_gumbel
    monkeypatch.setattr(draw_module, "keyed_gumbel", lambda keys, positions, draws, vocab: real(
        keys, torch.zeros_like(positions), draws, vocab))
    stat1, bound1, stat2, bound2 = lossless_stats(kind="coupled")
    assert stat1 > bound1 or stat2 > bound2, (stat1, bound1, stat2, bound2)
