"""Throughput profile SPS(B, R) for the load-aware verification policy (DESIGN.md section 1).

- ``grid``: ``ThroughputProfile`` (interpolation, monotone smoothing, JSON), ``StepTimeModel``.
- ``measure``: ``measure_profile`` (start-up timing), ``default_grid``, ``profile_cache_path``.
- ``online``: ``OnlineProfile`` (drift correction from live step timings).
"""

from sparkserve.scheduler.profile.grid import (
    PROFILE_FORMAT_VERSION,
    ProfileKey,
    StepTimeModel,
    ThroughputProfile,
    drafting_step_time,
    isotonic_non_decreasing,
    smooth_monotone,
)
from sparkserve.scheduler.profile.measure import default_grid, measure_profile, profile_cache_path
from sparkserve.scheduler.profile.online import OnlineProfile

__all__ = [
    "PROFILE_FORMAT_VERSION",
    "OnlineProfile",
    "ProfileKey",
    "StepTimeModel",
    "ThroughputProfile",
    "default_grid",
    "drafting_step_time",
    "isotonic_non_decreasing",
    "measure_profile",
    "profile_cache_path",
    "smooth_monotone",
]
