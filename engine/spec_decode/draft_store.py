"""The runner's store of pending drafts: q stays here, under a draft id, until it is verified.

Draft token ids and confidences travel to the scheduler (``DraftProposal``) and come back through
``ScheduledSeq`` (the one source of truth for what is verified); q (a tensor) never leaves the runner.
At verification the scheduler's drafts are checked against the stored ones: a mismatch raises instead of
verifying the wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


class DraftMismatchError(RuntimeError):
    """The drafts a step verifies are not the drafts the runner proposed."""


@dataclass(frozen=True)
class StoredDraft:
    """A request's pending drafts.

    Attributes:
        draft_id: unique id (``ScheduledSeq.spec_draft_id``).
        token_ids: the gamma draft tokens proposed.
        probs: ``[gamma, V']`` fp32 q of a freely sampled row (a view into its batch's output); None when
            the row was greedy or Gumbel-coupled (verified by agreement, q is never read).
    """

    draft_id: int
    token_ids: tuple[int, ...]
    probs: Tensor | None


class DraftStore:
    """At most one pending draft per request."""

    def __init__(self) -> None:
        self._pending: dict[str, StoredDraft] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, request_id: str, token_ids: tuple[int, ...], probs: Tensor | None) -> int:
        """Store a request's new drafts (replacing older ones); returns their draft id."""
        self._next_id += 1
        self._pending[request_id] = StoredDraft(self._next_id, token_ids, probs)
        return self._next_id

    def take(self, request_id: str, draft_id: int, token_ids: tuple[int, ...]) -> StoredDraft:
        """Remove and return the drafts ``draft_id`` of ``request_id``, checking that ``token_ids`` (the
        drafts the scheduler sends to verify) are a prefix of them.

        Raises:
            DraftMismatchError: no such pending draft, another id, or other tokens.
        """
        stored = self._pending.pop(request_id, None)
        if stored is None or stored.draft_id != draft_id:
            found = None if stored is None else stored.draft_id
            raise DraftMismatchError(f"request {request_id!r}: verifying draft {draft_id}, the runner holds {found}")
        if stored.token_ids[: len(token_ids)] != token_ids:
            raise DraftMismatchError(
                f"request {request_id!r}: scheduled drafts {token_ids} are not a prefix of the proposed "
                f"{stored.token_ids}")
        return stored

    def drop(self, request_id: str) -> None:
        """Forget a request's pending drafts (no-op without any)."""
        self._pending.pop(request_id, None)
