"""Fault isolation: requests rolled back after a failed engine step run in steps of their own.

``sparkserve.engine.step_faults`` rolls back every request of a failed step (``Scheduler.rollback_request``) and
isolates it here. The scheduler then alternates *solo* steps (one isolated request alone, oldest
failure first) with normal steps (isolated requests left out; solo steps only while there is no
normal work), until each isolated request has sampled ``ISOLATION_SAMPLES`` times alone. So a request
that makes steps fail fails again in a step of its own, where it is the only suspect, and cannot take
the others with it; the innocent ones pass their solo steps and rejoin the batch.
"""

from __future__ import annotations

ISOLATION_SAMPLES = 2
"""Sampling steps an isolated request runs alone before it rejoins normal steps (its re-prefill and
first sample, then one decode step: verification, drafting and the verify policy included)."""


class Isolation:
    """Isolated request ids with their solo sampling steps left, and whose turn the next step is."""

    def __init__(self) -> None:
        self._left: dict[str, int] = {}  # insertion order = failure order
        self._solo_last = False

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._left

    def __bool__(self) -> bool:
        return bool(self._left)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._left)

    def add(self, request_id: str) -> None:
        self._left[request_id] = ISOLATION_SAMPLES

    def discard(self, request_id: str) -> None:
        self._left.pop(request_id, None)

    def next_solo(self, has_normal_work: bool) -> str | None:
        """The request whose solo step this is, or None for a normal step (they alternate while
        normal work exists)."""
        if not self._left or (self._solo_last and has_normal_work):
            self._solo_last = False
            return None
        self._solo_last = True
        return next(iter(self._left))

    def on_sampled(self, request_id: str) -> None:
        """Count a sampling step of ``request_id`` (a no-op unless it is isolated)."""
        left = self._left.get(request_id)
        if left is None:
            return
        if left <= 1:
            del self._left[request_id]
        else:
            self._left[request_id] = left - 1
