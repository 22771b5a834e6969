"""Lazy feeding of the drafter's context cache: a request's context rows are projected only when it drafts.

A feature drafter (DSpark / DFlash) reads, for each context row at position p, the K/V that
``Drafter.add_context`` projects from the target's features at p (``speculator.py``). Projecting every
row of every step costs a drafter pass (fc, norm, per-layer k/v projections, RoPE, cache store) even in
steps where nobody drafts, which makes a server whose policy gates speculation off slower than
``--drafter none`` (issue 25). Instead, the rows of requests that do not draft after the step are kept
*pending*: their features, positions and cache slots are copied into an *arena* (one preallocated buffer
of ``capacity`` rows), and projected in one batched ``add_context`` call (the *catch-up*) only when the
request drafts again (its pending rows go with the step's own rows, before the drafter runs).

The catch-up projects only a bounded *window*: the request's latest ``window`` pending rows (older ones are
dropped), and nothing pending is ever projected for its own sake:

- a finished or preempted request's pending rows are dropped (``release``), never projected;
- when the arena is full, each request's latest rows are compacted to its front (a copy, no projection;
  at most ``window`` each, fewer when many requests share the arena); if they and the step's rows still do
  not fit, everything pending is dropped.

So a server in which nobody drafts projects no context row after the prefill chunks, whatever the run's
length. A dropped row leaves its slot in the drafter's cache unwritten (whatever an earlier occupant of
the block left there): the drafter then attends to a stale row at that position. That is lossless, since
the drafter's context only shapes the drafts, which the target verifies; it costs draft quality only for
a request that drafts again after more than ``window`` rows without drafting (or whose prefix-cached
blocks come from a request that was not drafting), and only through rows further than ``window``
positions behind its anchor (docs/benchmarks.md, "The catch-up window"). Within the window the drafter
holds exactly the rows eager feeding gives: the same features at the same positions and slots, projected
row by row (``add_context`` has no cross-row terms). A pending row is always valid: rows at positions a
request recomputes or rejected drafts are discarded (``truncate``), so the catch-up never writes into a
block the request gave back. Prefill chunks are fed eagerly (their full blocks may be shared through the
prefix cache while the request still runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

StoreFn = Callable[[Tensor, Tensor, Tensor], None]
"""``(features [N, F], positions [N] int64, slot_mapping [N] int64) -> None``: project and store rows."""


@dataclass(frozen=True)
class FeedRows:
    """One scheduled sequence's rows in a step (the step's rows are the sequences' rows in order).

    Attributes:
        request_id: the request.
        start_pos: position of its first row.
        num_rows: rows it has in the step (known tokens + drafts verified).
        eager: project its rows (and its pending ones) in this step: it drafts after the step, or the
            rows are a prefill chunk.
    """

    request_id: str
    start_pos: int
    num_rows: int
    eager: bool


@dataclass
class _Span:
    """Pending rows ``arena[lo : lo + n]`` of one request at positions ``pos .. pos + n - 1``."""

    lo: int
    pos: int
    n: int


DEFAULT_WINDOW = 64
"""Pending rows kept per request (the catch-up window): the rows eager feeding gives within the last 64
positions before the anchor; measured on acceptance in docs/benchmarks.md ("The catch-up window")."""


class LazyContextFeed:
    """The pending context rows of every request and the arena holding them (module docstring).

    Args:
        store: projects and stores rows in the drafter's cache (``Drafter.add_context`` on its pools).
        capacity: arena rows; when it is full the kept rows are compacted to its front, each request keeping
            at most ``capacity // (2 * pending requests)`` of its latest rows (everything is dropped when that
            is 0).
        window: pending rows kept per request, its latest ones (``DEFAULT_WINDOW``).

    Raises:
        ValueError: ``capacity`` or ``window`` below 1.
    """

    def __init__(self, store: StoreFn, capacity: int = 2048, window: int = DEFAULT_WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 row, got {capacity}")
        if window < 1:
            raise ValueError(f"window must be >= 1 row, got {window}")
        self.store = store
        self.capacity = capacity
        self.window = window
        self.num_dropped_rows = 0  # pending rows dropped unprojected (window, release, full arena)
        self._arena: tuple[Tensor, Tensor, Tensor] | None = None  # ([C, F] features, [C] positions, [C] slots)
        self._used = 0
        self._pending: dict[str, list[_Span]] = {}

    @property
    def num_pending_rows(self) -> int:
        return sum(s.n for spans in self._pending.values() for s in spans)

    def pending_positions(self, request_id: str) -> list[int]:
        """Positions of a request's pending rows, in order (tests, diagnostics)."""
        return [s.pos + k for s in self._pending.get(request_id, ()) for k in range(s.n)]

    def step(self, seqs: Sequence[FeedRows], features: Tensor, positions: Tensor, slot_mapping: Tensor) -> None:
        """Feed one step's rows: ``features`` ``[T', F]`` (T' >= T rows; the first T are the sequences' rows in
        order), ``positions`` / ``slot_mapping`` ``[T']`` int64. Eager sequences are projected now together
        with their latest ``window`` pending rows (one ``store`` call); the others' rows become pending."""
        eager_rows: list[int] = []
        lazy: list[tuple[FeedRows, int]] = []  # (sequence, first step row)
        catch_up: list[int] = []
        row = 0
        for seq in seqs:
            self.truncate(seq.request_id, seq.start_pos)
            if seq.eager:
                eager_rows.extend(range(row, row + seq.num_rows))
                catch_up.extend(self._take(seq.request_id))
            elif seq.num_rows:
                lazy.append((seq, row))
            row += seq.num_rows
        if not lazy and not catch_up:  # everybody eager, nothing pending: the eager feed's one call
            if row:
                self.store(features[:row], positions[:row], slot_mapping[:row])
        elif eager_rows or catch_up:
            self._store_mixed(features, positions, slot_mapping, eager_rows, catch_up)
        self._append(lazy, features, positions, slot_mapping)

    def truncate(self, request_id: str, end: int) -> None:
        """Discard a request's pending rows at positions >= ``end`` (recomputed, or rejected drafts)."""
        spans = self._pending.get(request_id)
        while spans and spans[-1].pos + spans[-1].n > end:
            last = spans[-1]
            if last.pos >= end:
                spans.pop()
            else:
                last.n = end - last.pos
        if spans is not None and not spans:
            del self._pending[request_id]
            self._reset_if_empty()

    def release(self, request_ids: Iterable[str]) -> None:
        """Requests finished or were preempted: their pending rows are dropped, never projected."""
        for rid in request_ids:
            self.num_dropped_rows += sum(s.n for s in self._pending.pop(rid, ()))
        self._reset_if_empty()

    def flush_all(self) -> None:
        """Catch up every request's window of pending rows in one call and empty the arena (tests, diagnostics)."""
        rows = [r for rid in list(self._pending) for r in self._take(rid)]
        if rows:
            self._store_arena(rows)
        self._reset_if_empty()

    # ---------------------------------------------------------------- internals
    def _take(self, request_id: str) -> list[int]:
        """Arena rows of a request's latest ``window`` pending rows (all removed from pending; the older ones
        are dropped)."""
        spans = self._pending.pop(request_id, [])
        self.num_dropped_rows += _trim_front(spans, self.window)
        return [s.lo + k for s in spans for k in range(s.n)]

    def _reset_if_empty(self) -> None:
        if not self._pending:
            self._used = 0

    def _store_arena(self, rows: list[int]) -> None:
        """Project the arena's ``rows`` in one call."""
        assert self._arena is not None
        index = torch.tensor(rows, dtype=torch.int64, device=self._arena[0].device)
        self.store(*(t.index_select(0, index) for t in self._arena))

    def _store_mixed(self, features: Tensor, positions: Tensor, slots: Tensor, step_rows: list[int],
                     arena_rows: list[int]) -> None:
        """One store of this step's ``step_rows`` and the arena's ``arena_rows``."""
        parts = []
        device = features.device
        if arena_rows:
            assert self._arena is not None
            index = torch.tensor(arena_rows, dtype=torch.int64, device=device)
            parts.append(tuple(t.index_select(0, index) for t in self._arena))
        if step_rows:
            index = torch.tensor(step_rows, dtype=torch.int64, device=device)
            parts.append(tuple(t.index_select(0, index) for t in (features, positions, slots)))
        f, p, s = (torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts, strict=True))
        self.store(f, p, s)

    def _append(self, lazy: list[tuple[FeedRows, int]], features: Tensor, positions: Tensor, slots: Tensor) -> None:
        """Copy the lazy sequences' rows into the arena (compacting it first when full; dropping everything
        pending when even the compacted rows and these do not fit)."""
        count = sum(seq.num_rows for seq, _ in lazy)
        if not count:
            return
        if self._used + count > self.capacity:
            self._compact()
        if self._used + count > self.capacity:
            self.num_dropped_rows += self.num_pending_rows + count
            self._pending.clear()
            self._used = 0
            return
        if self._arena is None or self._arena[0].shape[1] != features.shape[1]:
            self._arena = (features.new_empty(self.capacity, features.shape[1]),
                           positions.new_empty(self.capacity), slots.new_empty(self.capacity))
        lo = self._used
        first_row = lazy[0][1]
        if lazy[-1][1] + lazy[-1][0].num_rows - first_row == count:  # rows in order, so no gap means one run
            for dst, src in zip(self._arena, (features, positions, slots), strict=True):
                dst[lo : lo + count].copy_(src[first_row : first_row + count])
        else:
            index = torch.tensor([r for seq, first in lazy for r in range(first, first + seq.num_rows)],
                                 dtype=torch.int64, device=features.device)
            for dst, src in zip(self._arena, (features, positions, slots), strict=True):
                dst[lo : lo + count] = src.index_select(0, index)
        for seq, _ in lazy:
            spans = self._pending.setdefault(seq.request_id, [])
            last = spans[-1] if spans else None
            if last is not None and last.lo + last.n == lo and last.pos + last.n == seq.start_pos:
                last.n += seq.num_rows
            else:
                spans.append(_Span(lo, seq.start_pos, seq.num_rows))
            lo += seq.num_rows
        self._used = lo

    def _compact(self) -> None:
        """Move the kept rows to the arena's front, each request keeping at most its latest
        ``capacity // (2 * pending requests)`` rows (a copy, no projection)."""
        if not self._pending or self._arena is None:
            self._used = 0
            return
        limit = min(self.window, self.capacity // (2 * len(self._pending)))
        rows: list[int] = []
        for spans in self._pending.values():
            self.num_dropped_rows += _trim_front(spans, limit)
        self._pending = {rid: spans for rid, spans in self._pending.items() if spans}
        for spans in self._pending.values():
            for span in spans:
                rows.extend(range(span.lo, span.lo + span.n))
                span.lo = len(rows) - span.n
        if rows:
            index = torch.tensor(rows, dtype=torch.int64, device=self._arena[0].device)
            for t in self._arena:
                t[: len(rows)] = t.index_select(0, index)
        self._used = len(rows)


def _trim_front(spans: list[_Span], limit: int) -> int:
    """Drop the oldest rows of one request's spans so that at most ``limit`` remain; returns the rows dropped."""
    excess = sum(s.n for s in spans) - limit
    dropped = max(0, excess)
    while excess > 0:
        first = spans[0]
        if first.n <= excess:
            spans.pop(0)
            excess -= first.n
        else:
            first.lo, first.pos, first.n = first.lo + excess, first.pos + excess, first.n - excess
            excess = 0
    return dropped
