"""The per-step statistics record: made once by ``Scheduler.update_from_output`` where the facts are known.

Everything that counts speculation (Prometheus metrics, ``usage.speculation``, the bench tools, the
drafter evaluation) reads these records; nobody recounts from outputs. Definitions follow DeepSpec
section 3 (and vLLM's ``SpecDecodingStats``): a *draft* is one verify step of one decode request
(l_r = 0 included); ``num_draft_tokens`` sums l_r; an accepted token is a draft the target kept,
never one past a stop; tau = 1 + accepted / drafts (the bonus or recovered token included).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftOutcome:
    """One verify step of one decode request.

    Attributes:
        request_id: the request.
        drafter: the drafter family of the verified drafts ("" when l_r = 0).
        num_draft_tokens: l_r, drafts verified (those at or before a stop).
        num_accepted_tokens: drafts accepted (never past a stop), <= ``num_draft_tokens``.
    """

    request_id: str
    drafter: str
    num_draft_tokens: int
    num_accepted_tokens: int


@dataclass(frozen=True)
class DrafterStats:
    """Drafts of one drafter family with at least one draft token (``usage.speculation`` rows).

    Attributes:
        drafter: the family ("unknown" when a drafter did not name itself).
        num_drafts / num_draft_tokens / num_accepted_tokens: as in ``SpecDecodingStats``.
    """

    drafter: str
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int


@dataclass(frozen=True)
class SpecDecodingStats:
    """Speculation counts of a set of drafts (one step, one request, or a whole run): module docstring.

    Build with ``SpecDecodingStats.of(gamma, outcomes)`` (the counts are computed there, once).

    Attributes:
        num_spec_tokens: gamma, the drafter's block length (positions counted).
        drafts: the verify steps counted, in step order.
        num_draft_tokens / num_accepted_tokens: sum of l_r / of accepted drafts.
        num_verified_per_pos[k] / num_accepted_per_pos[k]: drafts verified / accepted at position k
            (length gamma); accepted / verified at k is unbiased even when l_r varies.
        per_drafter: per drafter family, drafts with l_r > 0, in order of first appearance.
    """

    num_spec_tokens: int
    drafts: tuple[DraftOutcome, ...]
    num_draft_tokens: int
    num_accepted_tokens: int
    num_verified_per_pos: tuple[int, ...]
    num_accepted_per_pos: tuple[int, ...]
    per_drafter: tuple[DrafterStats, ...]

    @classmethod
    def of(cls, num_spec_tokens: int, drafts: Sequence[DraftOutcome]) -> SpecDecodingStats:
        """Count ``drafts``. Raises ValueError unless 0 <= accepted <= l_r <= gamma for each."""
        verified, accepted = [0] * num_spec_tokens, [0] * num_spec_tokens
        for d in drafts:
            if not 0 <= d.num_accepted_tokens <= d.num_draft_tokens <= num_spec_tokens:
                raise ValueError(f"need 0 <= accepted <= verified <= gamma={num_spec_tokens}, got {d}")
            for k in range(d.num_draft_tokens):
                verified[k] += 1
            for k in range(d.num_accepted_tokens):
                accepted[k] += 1
        return cls(
            num_spec_tokens=num_spec_tokens,
            drafts=tuple(drafts),
            num_draft_tokens=sum(d.num_draft_tokens for d in drafts),
            num_accepted_tokens=sum(d.num_accepted_tokens for d in drafts),
            num_verified_per_pos=tuple(verified),
            num_accepted_per_pos=tuple(accepted),
            per_drafter=per_drafter(drafts),
        )

    @classmethod
    def merge(cls, num_spec_tokens: int, records: Iterable[SpecDecodingStats | None]) -> SpecDecodingStats:
        """One record counting the drafts of all ``records`` (None entries: steps without speculation)."""
        return cls.of(num_spec_tokens, [d for r in records if r is not None for d in r.drafts])

    @property
    def num_drafts(self) -> int:
        """Verify steps counted (l_r = 0 included)."""
        return len(self.drafts)

    @property
    def accepted_length(self) -> float:
        """tau: tokens emitted per verify step, bonus / recovered token included (0.0 without drafts)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.drafts else 0.0


def per_drafter(drafts: Iterable[DraftOutcome]) -> tuple[DrafterStats, ...]:
    """Per drafter family, the drafts with l_r > 0 among ``drafts``, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for d in drafts:
        if d.num_draft_tokens:
            row = rows.setdefault(d.drafter or "unknown", [0, 0, 0])
            row[0] += 1
            row[1] += d.num_draft_tokens
            row[2] += d.num_accepted_tokens
    return tuple(DrafterStats(name, *row) for name, row in rows.items())


@dataclass(frozen=True)
class SchedulerStats:
    """What one engine step did, as the scheduler saw it (``Scheduler.update_from_output``).

    Attributes:
        num_batched_tokens: B, tokens fed to the target (prefill chunks + 1 + l_r per decode request).
        num_decode_requests: R, requests that sampled.
        num_preemptions: requests preempted by this step's schedule.
        num_drafting: requests the runner drafted for after the step (the drafting gate's choice).
        spec_decoding: the step's speculation counts, None without a drafter (gamma = 0).
    """

    num_batched_tokens: int = 0
    num_decode_requests: int = 0
    num_preemptions: int = 0
    num_drafting: int = 0
    spec_decoding: SpecDecodingStats | None = None
