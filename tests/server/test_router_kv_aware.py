"""``vllm-router --policy kv_aware`` (the pinned 0.1.17) routing by the KV events sparkserve publishes.

Two real SmolLM2-135M replicas (``--drafter none``, one thread each) publish their prefix cache's KV events
(``--kv-events-endpoint``); the router subscribes to both (static ``--kv-event-source``, set up by
``sparkserve replicas``). A long prompt is first sent to one replica directly, past the router, so only
that replica's events can tell the router where its blocks are; the same prompt plus a new question
through the router must then land on that replica, for prompts warmed on each replica in turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sparkserve.server.replicas import ReplicaSet
from sparkserve.testing.router_harness import replica_set, requests_served
from sparkserve.testing.server_harness import wait_for

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the router colours its log fields
ROUTER_LOG_LEVEL = ("--log-level", "debug")  # the router logs each event batch it applies (see events_applied)


@pytest.fixture(scope="module")
def kv_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReplicaSet, Path]]:
    log_dir = tmp_path_factory.mktemp("kv_aware")
    serve_args = ("--drafter", "none", "--max-model-len", "1024", "--num-kv-blocks", "128")
    with replica_set(2, "kv_aware", log_dir, fake=False, serve_args=serve_args,
                     router_args=ROUTER_LOG_LEVEL) as running:
        yield running, log_dir / "router.log"


def events_applied(router_log: Path, replica_url: str) -> int:
    """Event batches from ``replica_url`` the router has applied to its index: 0.1.17 logs
    "kv_index live sequence advanced source=URL ... seq=N" at debug level for each one."""
    text = ANSI_ESCAPE.sub("", router_log.read_text(errors="replace"))
    return sum(1 for line in text.splitlines() if "live sequence advanced" in line and f"source={replica_url} " in line)


def shared_prefix(topic: str) -> str:
    """A prompt of about 250 tokens (15 full 16-token blocks) that no other test prompt shares."""
    return f"Notes on {topic}. " + " ".join(f"Fact {i} about {topic} is worth remembering." for i in range(25))


@pytest.mark.live_server
@pytest.mark.real_model
def test_kv_aware_routes_to_the_replica_holding_the_prefix(kv_replicas: tuple[ReplicaSet, Path]) -> None:
    running, router_log = kv_replicas
    urls = running.config.replica_urls
    router = openai.OpenAI(base_url=f"{running.config.router_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = router.models.list().data[0].id
    landed: list[tuple[int, int]] = []  # (replica warmed, replica the router chose)
    for k, topic in enumerate(("rivers", "volcanoes", "glaciers", "deserts")):
        holder = k % 2
        direct = openai.OpenAI(base_url=f"{urls[holder]}/v1", api_key="unused", max_retries=0, timeout=120)
        applied = events_applied(router_log, urls[holder])
        direct.completions.create(model=model, prompt=shared_prefix(topic), max_tokens=1, temperature=0)
        assert wait_for(lambda h=holder, a=applied: events_applied(router_log, urls[h]) > a, 30.0), "no events applied"
        before = [requests_served(url) for url in urls]
        reply = router.completions.create(model=model, prompt=shared_prefix(topic) + " Question: what is it?",
                                          max_tokens=1, temperature=0)
        deltas = [requests_served(url) - b for url, b in zip(urls, before, strict=True)]
        assert sorted(deltas) == [0, 1], deltas
        landed.append((holder, deltas.index(1)))
        details = reply.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens >= 15 * 16, details  # the prefix was reused
    assert all(warmed == chosen for warmed, chosen in landed), landed
    assert "KV event must be" not in router_log.read_text(errors="replace")  # every batch decoded
