"""Suffix drafts, the hybrid drafter and online calibration (issue "Speculation that pays without more
training"): proposals on hand-built histories, losslessness (greedy and T = 1 with one-hot q), bounded
global memory, the hybrid's choice, the calibration's convergence."""

from __future__ import annotations

import random

import pytest
import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode import rejection
from sparkserve.engine.spec_decode.drafter import DraftBatch, Drafter
from sparkserve.engine.spec_decode.hybrid import HybridDrafter, expected_accepted
from sparkserve.engine.spec_decode.suffix import (
    GlobalSuffixIndex,
    SuffixCalibration,
    SuffixDrafter,
    load_suffix_drafter,
)
from sparkserve.scheduler.policy.calibration import OnlineCalibration, pool_adjacent_violators
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.spec_records import generate_recorded, spec_totals
from sparkserve.testing.spec_stats import chi2, chi2_bound, exact_joint, sampled_joint
from sparkserve.testing.tiny import random_dspark, tiny_target


def _batch(histories: list[list[int]], rids: tuple[str, ...] | None = None, temps: list[float] | None = None) -> DraftBatch:
    n = len(histories)
    temps = temps or [0.0] * n
    meta = SamplingMetadata.build([SamplingParams(temperature=t) for t in temps], list(range(n)), [[]] * n, 64)
    starts = torch.tensor([len(h) - 1 for h in histories])
    return DraftBatch(torch.tensor([h[-1] for h in histories]), starts, int(starts.max()), [[0]] * n, 4, [], meta,
                      (False,) * n, token_histories=histories, request_ids=rids or tuple(f"r{i}" for i in range(n)))


# ---------------------------------------------------------------- proposals
def test_suffix_proposals_and_confidences_on_hand_built_histories() -> None:
    drafter = SuffixDrafter(num_speculative_tokens=7)
    assert isinstance(drafter, Drafter) and drafter.name == "suffix"
    # one earlier occurrence of the suffix (1, 2, 3): propose what followed, up to the end of the text
    drafts, conf = drafter.draft("a", [1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert drafts == [4, 5, 9, 1, 2, 3] and conf == [0.5] * 6  # raw 1 / (1 + 1), identity calibration
    # two occurrences agree on the first token (2 votes of 2 + 1), split on the second (the more recent
    # one wins the tie), and then only that one is followed
    drafts, conf = drafter.draft("b", [7, 8, 1, 2, 7, 8, 1, 3, 7, 8])
    assert drafts == [1, 3, 7, 8] and conf == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    # longer matches rank first: (5, 6, 7, 8) matches once, (7, 8) twice
    drafts, _ = drafter.draft("c", [5, 6, 7, 8, 42, 0, 7, 8, 11, 5, 6, 7, 8])
    assert drafts[0] == 42
    assert drafter.draft("d", [1, 2, 3, 4, 5]) == ([], [])  # nothing repeats
    # incremental: the index grows with the history, and release forgets it
    drafter.draft("e", [1, 2, 3])
    drafts, _ = drafter.draft("e", [1, 2, 3, 9, 1, 2])
    assert drafts[:2] == [3, 9] and drafter.num_tracked_requests == 5
    drafter.release("e")
    assert drafter.num_tracked_requests == 4


def test_suffix_calibration_maps_raw_confidences_monotonically(tmp_path) -> None:
    table = SuffixCalibration(((0.1, 0.5, 0.9),), ((0.05, 0.3, 0.8),))
    assert table(0, 0.5) == pytest.approx(0.3) and table(3, 0.7) == pytest.approx(0.55)  # last position reused
    assert table(0, 0.0) == 0.05 and table(0, 1.0) == 0.8
    table.save(tmp_path / "c.json", fitted_on="test")
    assert SuffixCalibration.load(tmp_path / "c.json") == table
    drafter = load_suffix_drafter(calibration=tmp_path / "c.json")
    _, conf = drafter.draft("a", [1, 2, 3, 4, 1, 2, 3])
    assert conf[0] == pytest.approx(table(0, 0.5))


def test_global_index_is_opt_in_and_bounded() -> None:
    assert load_suffix_drafter().global_index is None and not EngineArgs().suffix_global
    shared = GlobalSuffixIndex(max_tokens=1000)
    drafter = SuffixDrafter(global_index=shared)
    drafter.draft("done", [50, 51, 52, 53, 54, 55, 56])
    drafter.release("done")  # its text joins the global index
    drafts, _ = drafter.draft("new", [9, 50, 51, 52])
    assert drafts[:3] == [53, 54, 55]
    rng = random.Random(0)
    for _ in range(200):
        shared.add([rng.randint(0, 99) for _ in range(37)])
        assert shared.num_tokens <= 1000
    assert len(shared.docs) <= 1000 // 37 + 1


def test_suffix_drafts_respect_a_logits_mask() -> None:
    drafter = SuffixDrafter()
    batch = _batch([[1, 2, 3, 4, 5, 1, 2, 3]])
    forbidden = 5
    masked = DraftBatch(**{**batch.__dict__, "mask": lambda row, prefix: torch.arange(64) != forbidden})
    out = drafter.propose(masked)
    assert out.num_tokens == [1] and out.token_ids[0, 0] == 4  # cut before the forbidden 5


# ---------------------------------------------------------------- losslessness
def _core(target, drafter, policy="fixed:7", **kw) -> EngineCore:
    args = EngineArgs(dtype="float32", num_kv_blocks=2048, block_size=4, max_num_batched_tokens=1024,
                      max_num_seqs=kw.pop("max_num_seqs", 32), drafter=None if drafter else "none", verify_policy=policy, **kw)
    return EngineCore(args, loaded=target, drafter=drafter)


def test_suffix_greedy_lossless_with_repetition() -> None:
    target = tiny_target(seed=3)
    repeated = [7, 3, 9, 12, 40, 41, 5, 7, 3, 9, 12, 40, 41, 5, 7, 3]
    prompts = [repeated, repeated[2:] * 2, [4, 5, 6, 4, 5, 6, 4, 5]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    baseline = _core(target, None).generate_batch(prompts, params)
    core = _core(target, SuffixDrafter())
    outputs, stats = generate_recorded(core, prompts, params)
    assert outputs == baseline
    assert stats.num_draft_tokens > 0  # (acceptance on real text: tests/engine/spec_decode/test_spec_end_to_end.py)
    solo = [_core(target, SuffixDrafter()).generate_batch([p], params)[0] for p in prompts]
    assert solo == baseline


@pytest.mark.parametrize("wrong_residual", [False, True])
def test_suffix_sampling_distribution_one_hot_q(wrong_residual: bool, monkeypatch) -> None:
    """T = 1 with deterministic drafts (q one-hot): the output follows the target; a residual that does
    not remove the rejected draft (p instead of p without x) fails the same test."""
    vocab = 8
    small = tiny_target(vocab=vocab, seed=5, scale=0.25)
    prompt = de_bruijn(vocab)  # every 2-gram occurs: whatever is sampled, the suffix matches and drafts
    exact = exact_joint(small, prompt, 1.0)
    if wrong_residual:
        monkeypatch.setattr(rejection, "_residual", lambda p, q, draft_ids, index: p.clone())
    core = _core(small, SuffixDrafter(min_confidence=0.0), max_num_seqs=512)
    steps: list = []
    stat, cells = chi2(sampled_joint(core, prompt, 3000, 1.0, vocab, steps=steps), exact)
    assert spec_totals(core, steps).num_draft_tokens > 0
    if wrong_residual:
        assert stat > chi2_bound(cells), (stat, cells)
    else:
        assert stat < chi2_bound(cells), (stat, cells)


def de_bruijn(k: int) -> list[int]:
    """A sequence over ``range(k)`` in which every ordered pair occurs (de Bruijn B(k, 2), unrolled)."""
    seq, a = [], [0] * 3

    def db(t: int, p: int) -> None:
        if t > 2:
            if 2 % p == 0:
                seq.extend(a[1: p + 1])
            return
        a[t] = a[t - p]
        db(t + 1, p)
        for j in range(a[t - p] + 1, k):
            a[t] = j
            db(t + 1, t)

    db(1, 1)
    return seq + seq[:1]


# ---------------------------------------------------------------- hybrid
class CountingDSpark:
    """A DSpark drafter that counts its forwards."""

    def __init__(self, drafter) -> None:
        self.inner = drafter
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, batch):
        self.calls += 1
        return self.inner.propose(batch)


def test_hybrid_choice_and_skipped_dspark_forwards() -> None:
    target = tiny_target(seed=3)
    dspark = CountingDSpark(random_dspark(target, block_size=4, seed=2))
    hybrid = HybridDrafter(dspark, SuffixDrafter(num_speculative_tokens=4), margin=0.25, min_gain=0.5)
    assert isinstance(hybrid, Drafter) and expected_accepted([0.5, 0.5]) == pytest.approx(0.75)
    # no estimate of DSpark yet: it runs; a strong suffix match keeps the suffix draft when it is better
    hybrid._global_estimate = None
    decide = hybrid._suffix_clearly_better
    assert not decide("x", 3.0)
    hybrid._observe("x", 0.4)  # DSpark gave 0.4 expected drafts for x (and globally)
    assert decide("x", 1.2) and not decide("x", 0.9)  # 1.2 >= 1.25 * 0.4 + 0.5 = 1.0 > 0.9
    assert decide("unseen", 1.2)  # the global estimate stands in
    hybrid._observe("y", 5.0)
    assert not decide("y", 3.0)


def test_hybrid_runs_no_dspark_forward_when_every_request_takes_suffix_drafts() -> None:
    """Rows whose suffix draft clearly beats the DSpark estimate skip the DSpark forward: with every row
    matched, the step runs none (counted); an unmatched row runs DSpark alone and keeps its draft."""
    target = tiny_target(seed=3)
    dspark = CountingDSpark(random_dspark(target, block_size=4, seed=2))
    hybrid = HybridDrafter(dspark, SuffixDrafter(num_speculative_tokens=4))
    caches = dspark.make_kv_caches(64, 4, torch.float32)
    repeated = [7, 3, 9, 12, 40, 41, 5] * 3

    def batch(histories):
        b = _batch(histories, rids=tuple(f"h{i}" for i in range(len(histories))))
        return DraftBatch(**{**b.__dict__, "kv_caches": caches, "block_tables": [list(range(i * 8, i * 8 + 8)) for i in range(len(histories))]})

    hybrid._observe("h0", 0.1)  # DSpark has been giving ~0.1 expected drafts
    hybrid._observe("h1", 0.1)
    out = hybrid.propose(batch([repeated, repeated[1:]]))
    assert dspark.calls == 0 and hybrid.stats.num_steps_without_dspark == 1
    assert out.drafters == ["suffix", "suffix"] and out.num_tokens == [4, 4] and out.q_rows == []
    assert out.token_ids[0].tolist() == [7, 3, 9, 12]
    out = hybrid.propose(batch([repeated, [1, 2, 3, 4, 6]]))  # row 1 has no suffix match
    assert dspark.calls == 1 and out.drafters == ["suffix", "dspark"] and out.num_tokens[1] == 4
    assert hybrid.stats.num_steps == 2 and hybrid.stats.num_steps_without_dspark == 1


# ---------------------------------------------------------------- online calibration
def test_pool_adjacent_violators() -> None:
    assert pool_adjacent_violators([1, 3, 2, 4], [1, 1, 1, 1]) == [1, 2.5, 2.5, 4]
    assert pool_adjacent_violators([3, 2, 1], [1, 2, 1]) == [2, 2, 2]


def test_online_calibration_converges_on_a_stream_accepting_0_8x_the_predicted() -> None:
    """Drafts whose realised conditional survival is 0.8x the stated one: after 4,000 steps of 16 requests
    (64,000 verify blocks) the corrected confidences are within 3% (relative) of the truth at positions
    0-2 for stated values 0.4-0.9 (deeper positions are reached less often: they converge later); stated
    values that were right stay right for another drafter."""
    rng = random.Random(0)
    calib = OnlineCalibration(refit_every=200)
    for _ in range(4000 * 16):
        conf = [rng.uniform(0.3, 0.95) for _ in range(5)]
        accepted = 0
        while accepted < 5 and rng.random() < 0.8 * conf[accepted]:
            accepted += 1
        calib.observe("dspark", True, conf, 5, accepted)
        ok = 0
        while ok < 5 and rng.random() < conf[ok]:
            ok += 1
        calib.observe("exact", True, conf, 5, ok)
    for c in (0.4, 0.6, 0.8, 0.9):
        corrected = calib.correct("dspark", True, [c] * 3)
        for k in range(3):
            assert corrected[k] == pytest.approx(0.8 * c, rel=0.03), (c, k, corrected)
        assert calib.correct("exact", True, [c])[0] == pytest.approx(c, rel=0.03)
    assert calib.correct("dspark", False, [0.5]) == (0.5,)  # another temperature class: untouched
    rows = {(r.drafter, r.position): r for r in calib.report()}
    assert rows[("dspark", 0)].verified == 64000 and rows[("dspark", 0)].accepted < rows[("dspark", 0)].stated
