"""Prometheus metrics of one sparkserve process.

Names follow vLLM v1 with ``sparkserve:`` in place of ``vllm:``, so vLLM dashboards port by
substitution; every series carries a ``model_name`` label. Each ``ServerMetrics`` owns its own
``CollectorRegistry`` (never the process-global one), so tests can build several side by side.

Who calls what:
    engine, once per step         on_step(...)        scheduler gauges, preemptions, batch size, drafts
    engine, at start-up and when  set_profile(...)    the throughput profile SPS(B, R) in use
      the profile is re-measured
    server, per request           on_prompt_tokens(n) once, when the request's first token is sent
                                  on_generation_tokens(n) per delivered delta (the tokens usage counts)
                                  on_request_finished(...) once, after the last event
    server, before admission      on_request_rejected(reason) for 400 / 401 / 429 / 503 answers
    GET /metrics                  render()

Units: durations in seconds, computed from ``time.monotonic()`` stamps; counts in tokens;
``kv_cache_usage_perc`` is a fraction in [0, 1] (as in vLLM, despite the name).

Speculative decoding terms, per decode request and step:
    verified tokens l_r   drafts sent to the target for verification (0 <= l_r <= gamma; the
                          verification policy may choose 0 under load)
    accepted tokens a_r   the leading drafts the rejection sampler accepted (0 <= a_r <= l_r); the
                          request then emits a_r + 1 tokens (accepted drafts + recovered or bonus token)
Position k (0-based) of a request's draft block is verified when l_r > k and accepted when a_r > k,
so ``accepted_per_pos[k] / verified_per_pos[k]`` is the acceptance rate at position k, unbiased even
when verify lengths vary. ``num_drafts`` counts decode request-steps (including l_r = 0), so the
mean accepted length tau = 1 + accepted / drafts is tokens emitted per request per decode step.
The counts come from the step's record (``sparkserve.scheduler.stats.SpecDecodingStats``), made once by
the scheduler; this module only publishes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from sparkserve.scheduler.stats import SpecDecodingStats

FINISHED_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("invalid_request", "unauthorized", "queue_full", "draining")


def _decade_buckets(low: float, high: float, steps: Sequence[float] = (1.0, 2.5, 5.0)) -> list[float]:
    """``steps`` times powers of ten, from ``low`` up to the first value >= ``high``."""
    buckets: list[float] = []
    scale = low
    while True:
        for step in steps:
            buckets.append(round(step * scale, 10))
            if buckets[-1] >= high:
                return buckets
        scale *= 10


def _token_buckets(max_tokens: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... capped at ``max_tokens`` (token-count histograms)."""
    return [b for b in _decade_buckets(1, max_tokens, (1, 2, 5)) if b < max_tokens] + [max_tokens]


class ServerMetrics:
    """Owns the registry and every metric; methods translate engine/server events into observations.

    Args:
        model_name: value of the ``model_name`` label (the served model name).
        num_speculative_tokens: gamma, drafts per block; per-position counters exist for 0..gamma-1
            (0 = no drafter, no position series).
        max_model_len: upper bucket of the per-request token-count histograms.
        max_num_batched_tokens: upper bucket of the per-step token histograms.
    """

    def __init__(
        self,
        model_name: str,
        num_speculative_tokens: int = 0,
        max_model_len: int = 8192,
        max_num_batched_tokens: int = 8192,
    ) -> None:
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        self.model_name = model_name
        self.num_speculative_tokens = num_speculative_tokens
        self.registry = CollectorRegistry(auto_describe=True)
        fast = _decade_buckets(0.001, 100, (1.0, 2.0, 3.0, 5.0, 7.5))  # seconds
        slow = _decade_buckets(0.01, 5000, (1.0, 2.0, 3.0, 5.0, 7.5))  # seconds
        per_request, per_step = _token_buckets(max_model_len), _token_buckets(max_num_batched_tokens)
        gamma = num_speculative_tokens

        # Scheduler and engine step.
        self.num_requests_running = self._gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = self._gauge("num_requests_waiting", "Waiting requests (incl. preempted).")
        self.kv_cache_usage_perc = self._gauge(
            "kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)."
        )
        self.num_preemptions = self._counter("num_preemptions", "Recompute preemptions.")
        self.prefix_cache_queries = self._counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (as vLLM)."
        )
        self.prefix_cache_hits = self._counter("prefix_cache_hits", "Of them, prompt tokens found cached.")
        calib_labels = ("model_name", "drafter", "temperature", "position")
        self._calibration = {
            name: Counter(f"sparkserve:spec_decode_{name}", doc, calib_labels, registry=self.registry)
            for name, doc in (
                ("calibration_verified", "Drafts reached (all earlier drafts accepted), by drafter / class / position."),
                ("calibration_stated", "Sum of the drafter's stated conditional confidences of those drafts."),
                ("calibration_corrected", "Sum of the online-corrected confidences of those drafts."),
                ("calibration_accepted", "Of those drafts, the accepted ones (realised survival)."),
            )
        }
        self._totals: dict[tuple, float] = {}
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total", "Tokens per engine step (B).", per_step
        )
        self._profile_sps = Gauge(
            "sparkserve:profile_steps_per_second",
            "Throughput profile in use: steps per second at batch_tokens B and num_requests R.",
            ("model_name", "batch_tokens", "num_requests"),
            registry=self.registry,
        )

        # Requests.
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens (as usage reports them).")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens delivered (as usage).")
        self.request_success = self._labelled_counters(
            "request_success", "Finished requests by finish reason.", "finished_reason", FINISHED_REASONS
        )
        self.request_rejected = self._labelled_counters(
            "request_rejected", "Requests answered with an error before admission.", "reason", REJECT_REASONS
        )
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to first output event.", fast)
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Gap between consecutive output events.", fast
        )
        self.tpot = self._histogram(
            "request_time_per_output_token_seconds", "(e2e - TTFT) / (generated tokens - 1).", fast
        )
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to finish.", slow)
        self.queue_time = self._histogram("request_queue_time_seconds", "Queued to first scheduled.", fast)
        self.prefill_time = self._histogram("request_prefill_time_seconds", "Scheduled to first event.", fast)
        self.decode_time = self._histogram("request_decode_time_seconds", "First to last output event.", slow)
        self.inference_time = self._histogram(
            "request_inference_time_seconds", "Scheduled to last event.", slow
        )
        self.request_prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens.", per_request)
        self.request_generation_tokens = self._histogram(
            "request_generation_tokens", "Generated tokens.", per_request
        )

        # Speculative decoding.
        self.spec_num_drafts = self._counter("spec_decode_num_drafts", "Decode request-steps with drafts.")
        self.spec_num_drafter_runs = self._counter(
            "spec_decode_num_drafter_runs", "Request-steps after which the drafter ran (drafting gate: kept)."
        )
        self.spec_num_drafter_skips = self._counter(
            "spec_decode_num_drafter_skips",
            "Request-steps after which the drafter was skipped (drafting gate: not worth its cost at this load).",
        )
        self.spec_num_draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Drafts verified (sum l_r)."
        )
        self.spec_num_accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Drafts accepted (sum a_r)."
        )
        positions = tuple(str(k) for k in range(gamma))
        self.spec_accepted_per_pos = list(
            self._labelled_counters(
                "spec_decode_num_accepted_tokens_per_pos",
                "Accepted drafts by position.",
                "position",
                positions,
            ).values()
        )
        self.spec_verified_per_pos = list(
            self._labelled_counters(
                "spec_decode_num_verified_tokens_per_pos",
                "Verified drafts by position.",
                "position",
                positions,
            ).values()
        )
        self.spec_backoff = self._gauge(
            "spec_decode_backoff",
            "1 while the speculation guard holds speculation off (verify steps measurably lost to plain steps).",
        )
        self.spec_verify_budget = self._histogram(
            "spec_decode_verify_budget_tokens", "Drafts verified per engine step (sum l_r).", [0, *per_step]
        )
        self.spec_verified_per_request = self._histogram(
            "spec_decode_verified_tokens_per_request",
            "Verify length l_r per decode request-step.",
            list(range(max(gamma, 1) + 1)),
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(f"sparkserve:{name}", doc, ("model_name",), registry=self.registry).labels(
            self.model_name
        )

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"sparkserve:{name}", doc, ("model_name",), registry=self.registry).labels(
            self.model_name
        )

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        metric = Histogram(
            f"sparkserve:{name}", doc, ("model_name",), registry=self.registry, buckets=buckets
        )
        return metric.labels(self.model_name)

    def _labelled_counters(
        self, name: str, doc: str, label: str, values: Sequence[str]
    ) -> dict[str, Counter]:
        """One child per label value, created now so every series exists (at 0) from start-up."""
        metric = Counter(f"sparkserve:{name}", doc, ("model_name", label), registry=self.registry)
        return {v: metric.labels(self.model_name, v) for v in values}

    # ---- engine events ------------------------------------------------------------------------

    def on_step(
        self,
        *,
        num_running: int,
        num_waiting: int,
        kv_cache_usage: float,
        num_preemptions: int = 0,
        num_batched_tokens: int = 0,
        spec_decoding: SpecDecodingStats | None = None,
        num_drafting: int = 0,
        num_drafting_skipped: int = 0,
    ) -> None:
        """Record one engine step.

        Args:
            num_running / num_waiting: requests in the running batch / the waiting queue after the step.
            kv_cache_usage: fraction of KV blocks in use, in [0, 1].
            num_preemptions: requests preempted by this step's schedule (a delta, not a total).
            num_batched_tokens: B, tokens the target computed this step (prefill chunks + 1 + l_r
                per decode request); 0 for an empty step (not observed).
            spec_decoding: the step's speculation record (None or no drafts: nothing to count);
                ValueError when its gamma is not this process's.
            num_drafting / num_drafting_skipped: requests that sampled this step and then drafted /
                skipped the drafter (the drafting gate).
        """
        if not 0.0 <= kv_cache_usage <= 1.0:
            raise ValueError(f"kv_cache_usage must be a fraction in [0, 1], got {kv_cache_usage}")
        if min(num_running, num_waiting, num_preemptions, num_batched_tokens, num_drafting, num_drafting_skipped) < 0:
            raise ValueError("step counts must be >= 0")
        if num_drafting:
            self.spec_num_drafter_runs.inc(num_drafting)
        if num_drafting_skipped:
            self.spec_num_drafter_skips.inc(num_drafting_skipped)
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.kv_cache_usage_perc.set(kv_cache_usage)
        if num_preemptions:
            self.num_preemptions.inc(num_preemptions)
        if num_batched_tokens:
            self.iteration_tokens.observe(num_batched_tokens)
        if spec_decoding is not None and spec_decoding.num_drafts:
            self._observe_spec(spec_decoding)

    def on_totals(self, prefix_cache_queries: int, prefix_cache_hits: int, calibration: Sequence = ()) -> None:
        """Advance the counters that the engine keeps as cumulative totals (prefix cache, online
        calibration rows ``sparkserve.scheduler.policy.calibration.CalibrationRow``) by what is new since the last call."""
        self._advance(self.prefix_cache_queries, ("q",), prefix_cache_queries)
        self._advance(self.prefix_cache_hits, ("h",), prefix_cache_hits)
        for row in calibration:
            labels = (self.model_name, row.drafter or "unknown", "greedy" if row.greedy else "sampled", str(row.position))
            for name, total in (("calibration_verified", row.verified), ("calibration_stated", row.stated),
                                ("calibration_corrected", row.corrected), ("calibration_accepted", row.accepted)):
                self._advance(self._calibration[name].labels(*labels), (name, *labels), total)

    def on_guard(self, backing_off: bool) -> None:
        """The speculation guard's state after a step (``sparkserve:spec_decode_backoff``)."""
        self.spec_backoff.set(1.0 if backing_off else 0.0)

    def _advance(self, counter: Counter, key: tuple, total: float) -> None:
        delta = total - self._totals.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._totals[key] = total

    def _observe_spec(self, stats: SpecDecodingStats) -> None:
        gamma = self.num_speculative_tokens
        if stats.num_spec_tokens != gamma:
            raise ValueError(f"a record for gamma={stats.num_spec_tokens} in metrics for gamma={gamma}")
        self.spec_num_drafts.inc(stats.num_drafts)
        self.spec_num_draft_tokens.inc(stats.num_draft_tokens)
        self.spec_num_accepted_tokens.inc(stats.num_accepted_tokens)
        self.spec_verify_budget.observe(stats.num_draft_tokens)
        for k in range(gamma):
            self.spec_verified_per_pos[k].inc(stats.num_verified_per_pos[k])
            self.spec_accepted_per_pos[k].inc(stats.num_accepted_per_pos[k])
        for draft in stats.drafts:
            self.spec_verified_per_request.observe(draft.num_draft_tokens)

    def set_profile(
        self,
        batch_tokens: Sequence[int],
        num_requests: Sequence[int],
        step_time_s: Sequence[Sequence[float]],
    ) -> None:
        """Publish the throughput profile the verification policy uses, replacing the previous one.

        Takes the fields of ``sparkserve.scheduler.profile.ThroughputProfile``: the B grid, the R grid and
        ``step_time_s[i][k]``, seconds per step at ``batch_tokens[i]`` tokens and ``num_requests[k]``
        decode requests; exported as steps per second SPS(B, R) = 1 / step time.
        """
        if len(step_time_s) != len(batch_tokens) or any(len(row) != len(num_requests) for row in step_time_s):
            raise ValueError("step_time_s must have shape [len(batch_tokens)][len(num_requests)]")
        if any(t <= 0 for row in step_time_s for t in row):
            raise ValueError("step times must be > 0 seconds")
        self._profile_sps.clear()
        for b, row in zip(batch_tokens, step_time_s, strict=True):
            for r, seconds in zip(num_requests, row, strict=True):
                self._profile_sps.labels(self.model_name, str(int(b)), str(int(r))).set(1.0 / seconds)

    # ---- server events ------------------------------------------------------------------------

    def on_prompt_tokens(self, n: int) -> None:
        """Count a request's prompt tokens, once per request (e.g. when its first token is delivered)."""
        self.prompt_tokens.inc(n)

    def on_generation_tokens(self, n: int) -> None:
        """Count generated tokens as they are delivered (the tokens usage will report)."""
        self.generation_tokens.inc(n)

    def on_request_rejected(self, reason: str) -> None:
        """Count a request answered before admission: invalid_request (400), unauthorized (401),
        queue_full (429), draining (503 during shutdown)."""
        if reason not in self.request_rejected:
            raise ValueError(f"reason must be one of {REJECT_REASONS}, got {reason!r}")
        self.request_rejected[reason].inc()

    def on_request_finished(
        self,
        *,
        finished_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        arrival_time: float,
        finished_time: float,
        queued_time: float | None = None,
        first_scheduled_time: float | None = None,
        token_event_times: Sequence[float] = (),
    ) -> None:
        """Record a finished request (any reason). Times are ``time.monotonic()`` seconds.

        Args:
            finished_reason: "stop" | "length" | "abort" | "error".
            num_prompt_tokens / num_generation_tokens: the request's usage numbers.
            arrival_time: when the server received the request.
            finished_time: when the request ended (last event sent, abort or error).
            queued_time: when it entered the waiting queue (None = arrival_time).
            first_scheduled_time: when the scheduler first gave it a step (None = never scheduled).
            token_event_times: when each output event (a delta of one or more tokens) was delivered,
                in order; the first is the first token. Empty if no token was produced.
        """
        if finished_reason not in self.request_success:
            raise ValueError(f"finished_reason must be one of {FINISHED_REASONS}, got {finished_reason!r}")
        queued = arrival_time if queued_time is None else queued_time
        stamps = [arrival_time, queued, first_scheduled_time, *token_event_times, finished_time]
        known = [t for t in stamps if t is not None]
        if any(later < earlier for earlier, later in pairwise(known)):
            raise ValueError("need arrival <= queued <= first scheduled <= token events <= finished")
        self.request_success[finished_reason].inc()
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        self.e2e.observe(finished_time - arrival_time)
        if first_scheduled_time is not None:
            self.queue_time.observe(first_scheduled_time - queued)
        if token_event_times:
            self._observe_token_latencies(
                arrival_time, first_scheduled_time, finished_time, token_event_times, num_generation_tokens
            )

    def _observe_token_latencies(
        self,
        arrival_time: float,
        first_scheduled_time: float | None,
        finished_time: float,
        events: Sequence[float],
        num_generation_tokens: int,
    ) -> None:
        ttft = events[0] - arrival_time
        self.ttft.observe(ttft)
        self.decode_time.observe(events[-1] - events[0])
        for prev, cur in pairwise(events):
            self.itl.observe(cur - prev)
        if num_generation_tokens > 1:
            e2e = finished_time - arrival_time
            self.tpot.observe((e2e - ttft) / (num_generation_tokens - 1))
        if first_scheduled_time is not None:
            self.prefill_time.observe(events[0] - first_scheduled_time)
            self.inference_time.observe(events[-1] - first_scheduled_time)

    # ---- exposition ---------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of a GET /metrics answer (Prometheus text format)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
