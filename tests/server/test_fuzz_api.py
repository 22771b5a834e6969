"""schemathesis against the served OpenAPI schema (bounded: about 200 cases, max_tokens capped at 4):
no 5xx, no hang, every 4xx an OpenAI error object, the server healthy afterwards. The longer run
(>= 1,000 cases, the real model) is ``sparkserve/testing/fuzz_api.py``; its result is in docs/hardening.md."""

from __future__ import annotations

from sparkserve.testing.fake_engine import FakeEngine
from sparkserve.testing.fuzz_api import fuzz
from sparkserve.testing.server_harness import run_server


def test_fuzz_the_openapi_schema() -> None:
    with run_server(FakeEngine(max_waiting_requests=64)) as server:
        result = fuzz(server.url, num_cases=200, timeout_s=30)
    assert result.ok, result.failures
    assert result.num_cases >= 150 and result.statuses.get("200", 0) > 0 and result.statuses.get("400", 0) > 0
