"""Per-request and per-run serving metrics from client-side timestamps (``sparkserve bench``).

Every request is a :class:`RequestRecord`: the time it was sent, the arrival time of each streamed
content chunk (a chunk whose delta carries non-empty text) with the number of tokens it carried,
and the server's ``usage``. All times are seconds from one monotonic clock
(``time.perf_counter``); reported latencies are in milliseconds.

Definitions (docs/benchmarks.md, "How `sparkserve bench` measures"; the same as vLLM's
``vllm bench serve`` and SGLang's ``bench_serving`` where those define a quantity):

- TTFT = first content chunk - send.
- E2E = end of the stream (``[DONE]`` or connection close) - send.
- TPOT = (E2E - TTFT) / (n_out - 1), per request with n_out >= 2 output tokens (usage's
  ``completion_tokens``).
- ITL = every gap between consecutive content chunks (one entry per chunk after the first).
- ITL per token: a chunk carrying k tokens after a gap g counts as k gaps of g / k (speculative
  decoding streams several tokens per chunk; its ITL per chunk overstates the wait per token).
  The tokens of the first chunk beyond the first get no gap (they arrived with the first token).
- Tokens per chunk: k of each content chunk.
- Request throughput = completed requests / duration; output-token throughput = sum of n_out /
  duration, where duration runs from the first send to the last end of a level.
- Per-user speed = (n_out - 1) / (E2E - TTFT) = 1 / TPOT, the decode speed one user sees.
- Goodput = requests meeting every SLO (TTFT, TPOT, E2E in ms; each optional) / duration.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One benchmark request as the client saw it.

    Attributes:
        send_s: when the request was sent (perf_counter seconds).
        chunk_times_s: arrival time of each content chunk, ascending.
        chunk_tokens: tokens per content chunk (same length as ``chunk_times_s``); exact when the
            server streams cumulative usage per chunk, else estimated (``tokens_exact`` False).
        end_s: end of the stream.
        output_tokens: completion tokens from the server's usage (0 when it sent none).
        prompt_tokens: prompt tokens from the server's usage.
        ok: the request completed with HTTP 200 and no error.
        error: what went wrong when not ``ok``.
        tokens_exact: ``chunk_tokens`` came from the server.
        usage_reported: the server sent a usage object.
        target: name of the server measured; ``turn``: 0 = first turn, 1 = follow-up.
    """

    send_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[float] = field(default_factory=list)
    end_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: bool = True
    error: str = ""
    tokens_exact: bool = False
    usage_reported: bool = False
    text: str = ""
    target: str = ""
    turn: int = 0

    @property
    def ttft_s(self) -> float:
        """First content chunk - send (NaN without content)."""
        return self.chunk_times_s[0] - self.send_s if self.chunk_times_s else math.nan

    @property
    def e2e_s(self) -> float:
        """End of the stream - send."""
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float:
        """(E2E - TTFT) / (n_out - 1); NaN below two output tokens."""
        if self.output_tokens < 2 or not self.chunk_times_s:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        """Every gap between consecutive content chunks."""
        t = self.chunk_times_s
        return [b - a for a, b in pairwise(t)]

    def itl_per_token_s(self) -> list[float]:
        """Chunk gaps split per token: a chunk of k tokens after gap g gives k entries g / k."""
        out: list[float] = []
        for gap, k in zip(self.itl_s(), self.chunk_tokens[1:], strict=False):
            n = max(1, round(k))
            out.extend([gap / n] * n)
        return out


def estimate_chunk_tokens(num_chunks: int, output_tokens: int) -> list[float]:
    """Tokens per chunk when the server does not say: ``output_tokens`` spread evenly (1 each
    when the counts agree, as for servers that stream one token per chunk)."""
    if num_chunks == 0:
        return []
    if output_tokens <= 0:
        return [1.0] * num_chunks
    return [output_tokens / num_chunks] * num_chunks


def chunk_tokens_from_cumulative(cumulative: Sequence[int | None]) -> list[float] | None:
    """Tokens per chunk from the cumulative ``completion_tokens`` each chunk carried; None when a
    chunk carried none. The first chunk's count includes tokens whose text was held back before it."""
    if not cumulative or any(c is None for c in cumulative):
        return None
    counts = [float(cumulative[0])] + [float(b - a) for a, b in pairwise(cumulative)]
    if any(c < 0 for c in counts):
        return None
    return counts  # tokens after the last content chunk (a stop token, no text) belong to none


def summarize(values: Iterable[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p90, p99, std, min, max of ``values`` times ``scale`` (NaNs dropped; NaN
    everywhere when empty). Percentiles interpolate linearly (numpy's default, as vLLM)."""
    xs = sorted(v * scale for v in values if not math.isnan(v))
    if not xs:
        return {k: math.nan for k in ("mean", "median", "p90", "p99", "std", "min", "max")} | {"count": 0}
    out = {"mean": statistics.fmean(xs), "median": percentile(xs, 50)}
    out |= {f"p{p}": percentile(xs, p) for p in PERCENTILES if p != 50}
    out |= {"std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "min": xs[0], "max": xs[-1], "count": len(xs)}
    return out


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile ``p`` (0-100) of ascending ``sorted_xs``."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds).

    Raises:
        ValueError: unknown metric (allowed: ttft, tpot, e2e) or a non-positive / non-numeric bound.
    """
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        name = name.strip().lower()
        if name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"unknown SLO metric {name!r} in {item!r}: use ttft:MS, tpot:MS or e2e:MS")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"SLO {item!r}: the bound must be a number of milliseconds") from None
        if not bound > 0:
            raise ValueError(f"SLO {item!r}: the bound must be > 0 ms")
        slos[name] = bound
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (a request with one output token has no TPOT
    and meets a TPOT SLO, as in vLLM)."""
    if not r.ok:
        return False
    values = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2e": r.e2e_s}
    for name, bound_ms in slos.items():
        v = values[name]
        if math.isnan(v):
            if name == "tpot":
                continue
            return False
        if v * 1000.0 > bound_ms:
            return False
    return True


def aggregate(records: Sequence[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """Run-level metrics of ``records`` measured over ``duration_s`` seconds (module docstring).

    Returns a JSON-ready dict: counts, throughputs (per second), latency summaries in ms, tokens per
    chunk, per-user speed (tokens/s) and, with ``slos``, goodput.
    """
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    dur = duration_s if duration_s > 0 else math.nan
    per_user = [(r.output_tokens - 1) / (r.e2e_s - r.ttft_s) for r in ok
                if r.output_tokens > 1 and r.e2e_s > r.ttft_s]
    result = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / dur,
        "ttft_ms": summarize(r.ttft_s for r in ok),
        "tpot_ms": summarize(r.tpot_s for r in ok),
        "itl_ms": summarize(x for r in ok for x in r.itl_s()),
        "itl_per_token_ms": summarize(x for r in ok for x in r.itl_per_token_s()),
        "e2e_ms": summarize(r.e2e_s for r in ok),
        "tokens_per_chunk": summarize((k for r in ok for k in r.chunk_tokens), scale=1.0),
        "per_user_tokens_per_s": summarize(per_user, scale=1.0),
        "tokens_per_chunk_exact": bool(ok) and all(r.tokens_exact for r in ok),
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        result["goodput"] = {"slos_ms": dict(slos), "good_requests": good, "request_goodput": good / dur}
    return result
