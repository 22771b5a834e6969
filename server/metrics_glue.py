"""Feeding :class:`sparkserve.server.metrics.ServerMetrics` from the engine: step listener and profile publisher.

``AsyncEngine.step_listeners`` run on the event loop after every engine step (and after a batch of
aborts that ran no step) with ``(stats, outputs)``: ``stats`` is the engine's typed snapshot
(``sparkserve.engine.outputs.EngineStats``: scheduler gauges, the step's record or None when no step ran,
the speculation controller's stats). :class:`EngineMetricsListener` records it, republishing the
throughput profile the verification policy uses every ``profile_every`` steps (the online profile
drifts as measured step times come in). A metrics failure is logged, never raised: an exception in a
step listener would kill the engine loop.
"""

from __future__ import annotations

import logging

from sparkserve.engine.outputs import EngineStats
from sparkserve.server.engine_client import StatsEngine
from sparkserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def publish_profile(metrics: ServerMetrics, stats: EngineStats) -> bool:
    """``metrics.set_profile`` from the controller's current profile; False when there is none."""
    profile = stats.controller.profile if stats.controller is not None else None
    if profile is None:
        return False
    metrics.set_profile(profile.batch_tokens, profile.num_requests, profile.step_time_s)
    return True


class EngineMetricsListener:
    """A step listener: ``listener(stats, outputs)`` records one engine step into ``metrics``.

    Args:
        metrics: where to record.
        profile_every: republish the (online-corrected) profile every this many steps.
    """

    def __init__(self, metrics: ServerMetrics, profile_every: int = 100) -> None:
        if profile_every < 1:
            raise ValueError("profile_every must be >= 1")
        self.metrics = metrics
        self.profile_every = profile_every
        self.num_steps = 0
        self._num_failures = 0

    def __call__(self, stats: EngineStats, outputs: object = None) -> None:
        try:
            self._record(stats)
        except Exception:  # noqa: BLE001 - metrics must never take the engine loop down
            self._num_failures += 1
            if self._num_failures <= 5 or self._num_failures % 1000 == 0:
                logger.exception("recording engine step metrics failed (%d times)", self._num_failures)

    def _record(self, stats: EngineStats) -> None:
        usage = min(1.0, max(0.0, float(stats.kv_cache_usage)))
        if stats.step is not None:
            step = stats.step.scheduler
            drafting = stats.num_speculative_tokens > 0
            self.metrics.on_step(
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                kv_cache_usage=usage,
                num_preemptions=step.num_preemptions,
                num_batched_tokens=step.num_batched_tokens,
                spec_decoding=step.spec_decoding,
                num_drafting=step.num_drafting if drafting else 0,
                num_drafting_skipped=max(0, step.num_decode_requests - step.num_drafting) if drafting else 0,
            )
        else:
            self.metrics.on_step(num_running=stats.num_running, num_waiting=stats.num_waiting, kv_cache_usage=usage)
        guard = stats.controller.guard if stats.controller is not None else None
        if guard is not None:
            self.metrics.on_guard(guard.backing_off)
        self.metrics.on_totals(stats.prefix_cache_queries, stats.prefix_cache_hits,
                               stats.controller.calibration if stats.controller is not None else ())
        self.num_steps += 1
        if self.num_steps % self.profile_every == 0:
            publish_profile(self.metrics, stats)


def attach_metrics(engine: StatsEngine, metrics: ServerMetrics, profile_every: int = 100) -> EngineMetricsListener:
    """Publish the start-up profile and register a step listener on ``engine``."""
    publish_profile(metrics, engine.stats())
    listener = EngineMetricsListener(metrics, profile_every)
    engine.step_listeners.append(listener)
    return listener


def build_metrics(engine: StatsEngine, max_num_batched_tokens: int, profile_every: int = 100) -> ServerMetrics:
    """``ServerMetrics`` sized for ``engine`` (gamma, context, step budget) and attached to it."""
    metrics = ServerMetrics(
        engine.model_name,
        engine.stats().num_speculative_tokens,
        engine.max_model_len,
        max_num_batched_tokens,
    )
    attach_metrics(engine, metrics, profile_every)
    return metrics
