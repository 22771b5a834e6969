"""The lazy context feed (engine/spec_decode/context_feed.py) against the eager one on simulated requests.

Each row's feature is a distinct number (step, position), the store a dict slot -> (position, feature),
so a test sees which rows reach the drafter's cache and when. Whenever a request drafts, the lazy feed must
leave the eager feed's row at every position it stored before the anchor, and at every position of the
catch-up window before it; it must store nothing in steps where nobody drafts (nor when the arena fills,
nor at release), and never store a rejected draft's row after its step.
"""

from __future__ import annotations

import random

import pytest
import torch

from sparkserve.engine.spec_decode.context_feed import FeedRows, LazyContextFeed

SLOTS_PER_REQUEST = 1000


class Cache:
    """slot -> (position, feature) of the rows stored so far, and the number of store calls."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, float]] = {}
        self.calls = 0

    def store(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.calls += 1
        assert features.shape[0] == positions.shape[0] == slots.shape[0]
        assert len(set(slots.tolist())) == slots.shape[0], "one slot twice in a call: which write wins is undefined"
        for f, p, s in zip(features[:, 0].tolist(), positions.tolist(), slots.tolist(), strict=True):
            self.rows[s] = (p, f)


def _run(seed: int, capacity: int, draft_prob: float, window: int, num_requests: int = 3, num_steps: int = 60):
    """Decode ``num_requests`` requests with random verify lengths / acceptances / drafting decisions,
    feeding an eager and a lazy cache. Returns (eager, lazy, feed, computed rows per request, number of steps
    nobody drafted, stores the lazy feed made in those steps)."""
    rng = random.Random(seed)
    eager, lazy = Cache(), Cache()
    feed = LazyContextFeed(lazy.store, capacity=capacity, window=window)
    computed = {f"r{i}": rng.randrange(3, 9) for i in range(num_requests)}  # prompt rows, fed at prefill
    first = [FeedRows(rid, 0, n, True) for rid, n in computed.items()]
    _feed_step(first, eager, feed, step=0)
    quiet_steps = quiet_stores = 0
    for step in range(1, num_steps):
        seqs = []
        for rid, n in computed.items():
            if rng.random() < 0.1:
                continue  # not scheduled this step (budget)
            seqs.append(FeedRows(rid, n, 1 + rng.randrange(0, 4), rng.random() < draft_prob))
        calls = lazy.calls
        _feed_step(seqs, eager, feed, step)
        if seqs and not any(s.eager for s in seqs):
            quiet_steps += 1
            quiet_stores += lazy.calls - calls
        for seq in seqs:  # accepted drafts: the rest were rejected
            accepted = rng.randrange(0, seq.num_rows)
            computed[seq.request_id] = seq.start_pos + 1 + accepted
            feed.truncate(seq.request_id, computed[seq.request_id])
            if seq.eager:  # the drafter reads every context row before the anchor
                exact_from = 0 if window >= num_steps * 4 else computed[seq.request_id] - window
                _assert_context(eager, lazy, seq.request_id, computed[seq.request_id],
                                exact_from if capacity > 1000 else computed[seq.request_id])
    return eager, lazy, feed, computed, quiet_steps, quiet_stores


def _slot(rid: str, pos: int) -> int:
    return int(rid[1:]) * SLOTS_PER_REQUEST + pos


def _feed_step(seqs: list[FeedRows], eager: Cache, feed: LazyContextFeed, step: int) -> None:
    pos = [s.start_pos + k for s in seqs for k in range(s.num_rows)]
    slots = [_slot(s.request_id, s.start_pos + k) for s in seqs for k in range(s.num_rows)]
    feats = torch.tensor([[step * 10_000.0 + p, 0.0] for p in pos])  # [T, 2]
    positions, slot_mapping = torch.tensor(pos, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)
    if pos:
        eager.store(feats, positions, slot_mapping)
        feed.step(seqs, feats, positions, slot_mapping)


def _assert_context(eager: Cache, lazy: Cache, rid: str, anchor: int, exact_from: int) -> None:
    """The rows at positions ``exact_from .. anchor - 1`` are the eager feed's (older positions may hold a stale
    row: a dropped row leaves its slot unwritten, lossless as it only shapes the drafts)."""
    for p in range(max(0, exact_from), anchor):
        s = _slot(rid, p)
        assert lazy.rows.get(s) == eager.rows.get(s), (rid, p)


@pytest.mark.parametrize("capacity", [4096, 7])
@pytest.mark.parametrize("window", [1_000_000, 5])
@pytest.mark.parametrize("draft_prob", [0.0, 0.3, 1.0])
def test_lazy_feed_gives_the_drafter_the_eager_context_in_its_window(capacity, window, draft_prob) -> None:
    """An unbounded window (and an arena that never fills) gives exactly the eager context; a window of 5
    gives it at the 5 positions before the anchor; neither projects a row while nobody drafts."""
    for seed in range(4):
        eager, lazy, feed, computed, quiet_steps, quiet_stores = _run(seed, capacity, draft_prob, window)
        calls = lazy.calls
        feed.release(list(computed))  # finished: pending rows dropped, not projected
        assert feed.num_pending_rows == 0 and lazy.calls == calls
        assert quiet_stores == 0  # nobody drafts: nothing projected, whether the arena fills or not
        if draft_prob == 0.0:
            assert quiet_steps > 0 and lazy.calls == 1  # only the prefill step's eager call
        if draft_prob == 1.0:
            assert lazy.calls == eager.calls  # drafting every step: the eager feed's one call per step


def test_rejected_rows_are_never_stored_after_their_step() -> None:
    """A rejected draft's slot may be given back with its block: a later catch-up must not write it."""
    lazy = Cache()
    feed = LazyContextFeed(lazy.store, capacity=64)
    seq = FeedRows("r0", 10, 4, False)  # anchor + 3 drafts at 10..13, none accepted
    feed.step([seq], torch.arange(4.0)[:, None], torch.arange(10, 14), torch.arange(10, 14))
    assert feed.pending_positions("r0") == [10, 11, 12, 13]
    feed.truncate("r0", 11)
    assert feed.pending_positions("r0") == [10]
    feed.flush_all()
    assert sorted(lazy.rows) == [10]


def _quiet_step(feed: LazyContextFeed, rid: str, pos: int, n: int = 1) -> None:
    """``n`` rows of ``rid`` at ``pos ..`` in a step where it does not draft (feature = position)."""
    rows = torch.arange(pos, pos + n)
    feed.step([FeedRows(rid, pos, n, False)], rows[:, None].float(), rows, rows + 1000 * int(rid[1:]))


def test_release_drops_and_arena_resets() -> None:
    lazy = Cache()
    feed = LazyContextFeed(lazy.store, capacity=4)
    for step in range(3):
        _quiet_step(feed, "r0", step)
    feed.release(["r0"])
    assert lazy.calls == 0 and feed.num_pending_rows == 0 and feed.num_dropped_rows == 3
    for step in range(4):  # the arena was emptied: 4 rows fit without compaction
        _quiet_step(feed, "r1", step)
    assert lazy.calls == 0 and feed.pending_positions("r1") == [0, 1, 2, 3] and feed.num_dropped_rows == 3


def test_the_catch_up_projects_only_the_window_of_latest_rows() -> None:
    lazy = Cache()
    feed = LazyContextFeed(lazy.store, capacity=64, window=4)
    for pos in range(0, 10, 2):  # 10 rows in 5 quiet steps of 2 (an anchor and an accepted draft)
        _quiet_step(feed, "r0", pos, 2)
    _quiet_step(feed, "r0", 10, 7)  # a verify block of 7 rows, 5 of them rejected
    feed.truncate("r0", 12)
    assert feed.pending_positions("r0") == list(range(12)) and lazy.calls == 0
    rows = torch.tensor([12])
    feed.step([FeedRows("r0", 12, 1, True)], rows[:, None].float(), rows, rows)  # drafts again: the catch-up
    assert lazy.calls == 1 and sorted(lazy.rows) == [8, 9, 10, 11, 12] and feed.num_dropped_rows == 8
    assert all(lazy.rows[s] == (s, float(s)) for s in lazy.rows)


def test_full_arena_compacts_the_latest_rows_without_projecting() -> None:
    """8 rows, two requests: when full, each keeps its latest 8 // (2 * 2) = 2 rows, moved to the front."""
    lazy = Cache()
    feed = LazyContextFeed(lazy.store, capacity=8, window=100)
    for pos in range(4):
        _quiet_step(feed, "r1", pos)
        _quiet_step(feed, "r2", pos)
    _quiet_step(feed, "r1", 4)
    assert lazy.calls == 0
    assert feed.pending_positions("r1") == [2, 3, 4] and feed.pending_positions("r2") == [2, 3]
    rows = torch.tensor([5])
    feed.step([FeedRows("r1", 5, 1, True)], rows[:, None].float(), rows, rows + 1000)
    assert {s - 1000: f for s, (_, f) in lazy.rows.items()} == {2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"window": 0}])
def test_capacity_and_window_must_be_positive(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LazyContextFeed(lambda f, p, s: None, **kwargs)
