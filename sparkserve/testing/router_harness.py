"""Replicas behind the real ``vllm-router`` for tests (see :mod:`sparkserve.server.replicas`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparkserve.server.replicas import ReplicaSet, ReplicaSetConfig, launch, router_binary
from sparkserve.testing.server_harness import FAKE_ENGINE_COMMAND, free_port, free_port_run


def require_router() -> str:
    """The ``vllm-router`` path; skips the test when it is missing, except under ``CI=true`` where a
    missing router fails (CI installs it with the ``test`` extra)."""
    try:
        return router_binary()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the pinned router: {exc}")
        pytest.skip(str(exc))


def router_flags(*extra: str) -> tuple[str, ...]:
    """Router flags for a test: its own Prometheus port (the default 29000 is shared by every router
    on the machine), one-second health checks, and ``extra``."""
    return ("--prometheus-port", str(free_port()), "--health-check-interval-secs", "1",
            "--health-failure-threshold", "1", *extra)


@contextmanager
def replica_set(num_replicas: int, policy: str, log_dir: Path, *, fake: bool, serve_args: tuple[str, ...] = (),
                router_args: tuple[str, ...] = ()) -> Iterator[ReplicaSet]:
    """``num_replicas`` replicas (fake engines, or ``sparkserve serve`` with one thread each) behind a
    ``policy`` router on free ports; everything is stopped on exit."""
    require_router()
    base = free_port_run(num_replicas)  # replica i listens on base + i
    kv_base = free_port_run(2 * num_replicas, avoid=range(base, base + num_replicas))  # KV events + replay
    config = ReplicaSetConfig(
        num_replicas=num_replicas, serve_args=serve_args, policy=policy, port=free_port(),
        replica_base_port=base, threads_per_replica=None if fake else 1, router_args=router_flags(*router_args),
        replica_command=FAKE_ENGINE_COMMAND if fake else ReplicaSetConfig.replica_command, startup_timeout_s=180,
        kv_events_base_port=kv_base,
    )
    with launch(config, log_dir) as running:
        yield running


def requests_served(replica_url: str) -> int:
    """Finished requests a replica reports on ``/metrics`` (``sparkserve:request_success``, all reasons)."""
    text = httpx.get(f"{replica_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "sparkserve:request_success":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)

