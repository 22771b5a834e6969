"""The lazy context feed (engine/spec_decode/context_feed.py) against the eager one on simulated requests.

Each row's feature is a distinct number (step, position), the store a dict slot -> (position, feature),
so a test sees which rows reach the drafter's cache and when. The lazy feed must leave, whenever a
request drafts, exactly the context rows the eager feed leaves at its positions before the anchor, must
store nothing in steps where nobody drafts, and never store a rejected draft's row after its step.
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


def _run(seed: int, capacity: int, draft_prob: float, num_requests: int = 3, num_steps: int = 60):
    """Decode ``num_requests`` requests with random verify lengths / acceptances / drafting decisions,
    feeding an eager and a lazy cache. Returns (eager, lazy, feed, number of steps nobody drafted, stores
    the lazy feed made in those steps)."""
    rng = random.Random(seed)
    eager, lazy = Cache(), Cache()
    feed = LazyContextFeed(lazy.store, capacity=capacity)
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
                _assert_context(eager, lazy, seq.request_id, computed[seq.request_id])
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


def _assert_context(eager: Cache, lazy: Cache, rid: str, anchor: int) -> None:
    for p in range(anchor):
        s = _slot(rid, p)
        assert lazy.rows.get(s) == eager.rows.get(s), (rid, p)


@pytest.mark.parametrize("capacity", [4096, 7])
@pytest.mark.parametrize("draft_prob", [0.0, 0.3, 1.0])
def test_lazy_feed_gives_the_drafter_the_eager_context(capacity, draft_prob) -> None:
    for seed in range(4):
        eager, lazy, feed, computed, quiet_steps, quiet_stores = _run(seed, capacity, draft_prob)
        feed.release(list(computed))  # finished: pending rows caught up (prefix cache)
        assert feed.num_pending_rows == 0
        for rid, n in computed.items():
            _assert_context(eager, lazy, rid, n)
        if draft_prob == 0.0 and capacity > 1000:
            assert quiet_steps > 0 and quiet_stores == 0  # nobody drafts: nothing projected
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


def test_release_drops_without_prefix_cache_and_arena_resets() -> None:
    lazy = Cache()
    feed = LazyContextFeed(lazy.store, capacity=4, flush_on_release=False)
    for step in range(3):
        feed.step([FeedRows("a", step, 1, False)], torch.zeros(1, 2), torch.tensor([step]), torch.tensor([step]))
    feed.release(["a"])
    assert lazy.calls == 0 and feed.num_pending_rows == 0
    for step in range(6):  # the arena was emptied: 6 rows through a 4-row arena catch up once, in one call
        feed.step([FeedRows("b", step, 1, False)], torch.zeros(1, 2), torch.tensor([step]), torch.tensor([step]))
    assert lazy.calls == 1 and sorted(lazy.rows) == [0, 1, 2, 3] and feed.pending_positions("b") == [4, 5]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LazyContextFeed(lambda f, p, s: None, capacity=0)
