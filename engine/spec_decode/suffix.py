"""Training-free suffix drafts (after SuffixDecoding, Oliaro et al. 2024, and vLLM's ``suffix`` method).

Much real traffic repeats itself: summaries and RAG answers quote their input, code edits rewrite given
code, agents echo tool output. The suffix drafter looks for the longest suffix of a request's text
(prompt + output so far) that occurred before, in the request itself or (opt-in, ``global_index``) in
recent outputs of other requests, and proposes what followed it.

Index: for every position, the n-grams ending there (n in ``NGRAM_SIZES``) map to their end positions
(the most recent ``max_occurrences``). A lookup takes the longest indexed n-gram of the current suffix
that has earlier occurrences, ranks them by how far the match extends backwards (up to ``max_match``)
and recency, and walks forward: at draft slot k the candidates still consistent with the drafts so far
vote on the next token; the majority token is the draft and its raw confidence is the vote share with
one pseudo-count against (``votes / (candidates + 1)``). ``SuffixCalibration`` maps raw confidences to
conditional survival per position (fitted on held-out data: ``train/calibrate_suffix.py``); the engine
corrects it online (``scheduler/policy/calibration.py``).

Drafts are deterministic: q is one-hot (verification accepts with probability p(x) and draws the
recovered token from p without x, ``engine/spec_decode/rejection.py``).
"""

from __future__ import annotations

import bisect
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput, TokenDrafter

NGRAM_SIZES = (8, 4, 2)
"""Indexed n-gram lengths, longest first (a match of 3 is found through its 2-gram)."""


@dataclass(frozen=True)
class SuffixCalibration:
    """Per draft position, a monotone map raw confidence -> conditional survival (isotonic fit).

    Attributes:
        knots: per position, increasing raw-confidence knots.
        values: per position, the calibrated survival at each knot (non-decreasing); linear in between.
    """

    knots: tuple[tuple[float, ...], ...] = ()
    values: tuple[tuple[float, ...], ...] = ()

    def __call__(self, position: int, raw: float) -> float:
        if not self.knots:
            return raw
        k = min(position, len(self.knots) - 1)
        xs, ys = self.knots[k], self.values[k]
        i = bisect.bisect_left(xs, raw)
        if i == 0:
            return ys[0]
        if i == len(xs):
            return ys[-1]
        t = (raw - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])

    @classmethod
    def load(cls, path: str | Path) -> SuffixCalibration:
        data = json.loads(Path(path).read_text())
        return cls(tuple(map(tuple, data["knots"])), tuple(map(tuple, data["values"])))

    def save(self, path: str | Path, **extra: object) -> None:
        Path(path).write_text(json.dumps({"knots": self.knots, "values": self.values, **extra}, indent=1) + "\n")


DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "weights" / "suffix_calibration.json"


class SuffixIndex:
    """n-gram occurrences of one growing token sequence (the module docstring's index).

    Args:
        max_occurrences: end positions kept per n-gram (the most recent ones; bounded memory).
    """

    def __init__(self, max_occurrences: int = 32) -> None:
        self.tokens: list[int] = []
        self.max_occurrences = max_occurrences
        self.table: dict[tuple[int, ...], deque[int]] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens and index the n-grams that end at each of them."""
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1
            for n in NGRAM_SIZES:
                if end + 1 >= n:
                    key = tuple(self.tokens[end - n + 1: end + 1])
                    slot = self.table.get(key)
                    if slot is None:
                        slot = self.table[key] = deque(maxlen=self.max_occurrences)
                    slot.append(end)

    def occurrences(self, suffix: Sequence[int], before: int) -> tuple[int, list[int]]:
        """(n, end positions < ``before``) of the longest indexed n-gram ending ``suffix`` that occurred."""
        for n in NGRAM_SIZES:
            if len(suffix) < n:
                continue
            ends = [e for e in self.table.get(tuple(suffix[-n:]), ()) if e < before]
            if ends:
                return n, ends
        return 0, []


@dataclass
class _Candidate:
    """An earlier occurrence of the current suffix: its token list, end index, backward match length."""

    tokens: list[int]
    end: int
    match: int


class GlobalSuffixIndex:
    """Opt-in index over recent outputs of finished requests (bounded by ``max_tokens`` in all).

    Documents are kept whole in a FIFO; the oldest are evicted (with their index) past ``max_tokens``.
    It lets one request's text raise another's acceptance, so it is off by default (tenants share it).
    """

    def __init__(self, max_tokens: int = 200_000, max_occurrences: int = 8) -> None:
        self.max_tokens = max_tokens
        self.max_occurrences = max_occurrences
        self.docs: deque[SuffixIndex] = deque()
        self.num_tokens = 0

    def add(self, tokens: Sequence[int]) -> None:
        if not tokens:
            return
        doc = SuffixIndex(self.max_occurrences)
        doc.extend(list(tokens)[-self.max_tokens:])
        self.docs.append(doc)
        self.num_tokens += len(doc.tokens)
        while self.num_tokens > self.max_tokens and self.docs:
            self.num_tokens -= len(self.docs.popleft().tokens)

    def candidates(self, suffix: Sequence[int], max_match: int, limit: int) -> list[_Candidate]:
        found: list[_Candidate] = []
        for doc in reversed(self.docs):  # most recent documents first
            n, ends = doc.occurrences(suffix, len(doc.tokens))
            found += [_Candidate(doc.tokens, e, _backward_match(doc.tokens, e, suffix, max_match)) for e in ends]
            if len(found) >= limit:
                break
        return found


def _backward_match(tokens: Sequence[int], end: int, suffix: Sequence[int], limit: int) -> int:
    """How many trailing tokens of ``suffix`` equal ``tokens[.. end]`` (at most ``limit``)."""
    n = 0
    while n < limit and n < len(suffix) and end - n >= 0 and tokens[end - n] == suffix[-1 - n]:
        n += 1
    return n


@dataclass
class SuffixDrafter(TokenDrafter):
    """The suffix drafter (``Drafter`` Protocol; module docstring).

    Attributes:
        num_speculative_tokens: gamma, most drafts per step.
        max_match: longest backward match considered when ranking occurrences.
        max_candidates: occurrences that vote.
        min_confidence: stop the block when a slot's raw confidence falls below this.
        calibration: raw confidence -> conditional survival per position.
        global_index: the shared index over recent outputs, or None (off by default).
    """

    num_speculative_tokens: int = 7
    max_match: int = 32
    max_candidates: int = 16
    min_confidence: float = 0.1
    calibration: SuffixCalibration = field(default_factory=SuffixCalibration)
    global_index: GlobalSuffixIndex | None = None
    name: str = "suffix"
    _indexes: dict[str, SuffixIndex] = field(default_factory=dict)

    def release(self, request_id: str) -> None:
        """Forget the request's index; a finished request's output joins the global index (if on)."""
        index = self._indexes.pop(request_id, None)
        if index is not None and self.global_index is not None:
            self.global_index.add(index.tokens)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._indexes)

    def propose(self, batch: DraftBatch) -> DraftOutput:
        """Suffix drafts per row; rows without a match get none (``num_tokens`` 0)."""
        histories = batch.token_histories
        if histories is None:
            raise ValueError("the suffix drafter needs token histories")
        gamma = self.num_speculative_tokens
        tokens = torch.zeros(batch.num_rows, gamma, dtype=torch.int64)
        confidences = torch.zeros(batch.num_rows, gamma, dtype=torch.float32)
        num_tokens = []
        for row, history in enumerate(histories):
            rid = batch.request_ids[row] if batch.request_ids else str(row)
            drafts, conf = self.draft(rid, history)
            drafts, conf = _cut_by_mask(batch, row, drafts, conf)
            num_tokens.append(len(drafts))
            if drafts:
                tokens[row, : len(drafts)] = torch.tensor(drafts)
                confidences[row, : len(conf)] = torch.tensor(conf)
        return DraftOutput(tokens.to(batch.anchor_ids.device), None, confidences.to(batch.anchor_ids.device),
                           num_tokens, q_rows=[])

    def draft(self, request_id: str, history: Sequence[int]) -> tuple[list[int], list[float]]:
        """Drafts and calibrated conditional confidences for one request's text (anchor last)."""
        index = self._indexes.get(request_id)
        if index is None or len(index.tokens) > len(history):
            index = self._indexes[request_id] = SuffixIndex()
        index.extend(history[len(index.tokens):])
        suffix = history[-self.max_match:]
        _, ends = index.occurrences(suffix, len(history) - 1)
        candidates = [_Candidate(index.tokens, e, _backward_match(index.tokens, e, suffix, self.max_match)) for e in ends]
        if self.global_index is not None:
            candidates += self.global_index.candidates(suffix, self.max_match, self.max_candidates)
        candidates.sort(key=lambda c: (c.match, c.end), reverse=True)
        return self._walk(candidates[: self.max_candidates])

    def _walk(self, candidates: list[_Candidate]) -> tuple[list[int], list[float]]:
        drafts: list[int] = []
        conf: list[float] = []
        for k in range(self.num_speculative_tokens):
            votes: dict[int, int] = {}
            for c in candidates:
                if c.end + 1 + k < len(c.tokens):
                    token = c.tokens[c.end + 1 + k]
                    votes[token] = votes.get(token, 0) + 1
            if not votes:
                break
            token, count = max(votes.items(), key=lambda kv: kv[1])
            raw = count / (len(candidates) + 1)
            if raw < self.min_confidence:
                break
            drafts.append(token)
            conf.append(self.calibration(k, raw))
            candidates = [c for c in candidates if c.end + 1 + k < len(c.tokens) and c.tokens[c.end + 1 + k] == token]
        return drafts, conf


def _cut_by_mask(batch: DraftBatch, row: int, drafts: list[int], conf: list[float]) -> tuple[list[int], list[float]]:
    """Drafts up to the first one a logits mask forbids (a forbidden draft is never verified)."""
    if batch.mask is None:
        return drafts, conf
    for k, token in enumerate(drafts):
        allowed = batch.mask(row, drafts[:k])
        if allowed is not None and not bool(allowed[token]):
            return drafts[:k], conf[:k]
    return drafts, conf


def load_suffix_drafter(num_speculative_tokens: int = 7, global_index: bool = False,
                        calibration: str | Path | None = None) -> SuffixDrafter:
    """The suffix drafter with the shipped calibration (or ``calibration``), global index opt-in."""
    path = Path(calibration) if calibration is not None else DEFAULT_CALIBRATION
    table = SuffixCalibration.load(path) if path.exists() else SuffixCalibration()
    return SuffixDrafter(num_speculative_tokens=num_speculative_tokens, calibration=table,
                         global_index=GlobalSuffixIndex() if global_index else None)
