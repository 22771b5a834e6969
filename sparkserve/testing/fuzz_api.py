"""Fuzz a running sparkserve through its served OpenAPI schema (schemathesis + hypothesis).

Every operation of ``/openapi.json`` gets positive cases (bodies that fit the schema) and negative
ones (bodies that do not). A case fails when the server answers 5xx, does not answer within
``--timeout`` seconds (a hang), or answers 4xx with a body that is not an OpenAI error object
``{"error": {"message", "type", "param", "code"}}``. ``max_tokens`` / ``max_completion_tokens`` / ``n``
in generated bodies are capped (``--max-tokens``) so a run stays bounded on a CPU model, and a
string ``model`` is set to the served model so cases reach validation and the engine instead of
stopping at the 404. The cases go to the POST operations (GETs get a few each). After the run
``/health`` must still answer 200. Writes a JSON summary.

    python -m sparkserve.testing.fuzz_api --url http://127.0.0.1:8000 --cases 1000 --out fuzz.json

``tests/server/test_fuzz_api.py`` runs :func:`fuzz` for about 200 cases against the fake engine in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from sparkserve.testing.results import emit

_CAPPED = ("max_tokens", "max_completion_tokens")


@dataclass
class FuzzResult:
    """Summary of one run: cases sent, status counts, failures (at most 50 kept), seconds, health after."""

    url: str
    num_cases: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    num_failures: int = 0
    duration_s: float = 0.0
    healthy_after: bool = False

    @property
    def ok(self) -> bool:
        return self.num_failures == 0 and self.healthy_after and self.num_cases > 0


def _cap(case: Any, max_tokens: int, model: str) -> Any:
    """Bound the work a case asks for, and name the served model (so cases get past the 404)."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = model
        for key in _CAPPED:
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > max_tokens:
                body[key] = max_tokens
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) and body["n"] > 2:
            body["n"] = 2
    return case


def _error_shape_problem(response: Any) -> str | None:
    """Why a 4xx body is not an OpenAI error object, or None."""
    try:
        error = response.json()["error"]
    except Exception:  # noqa: BLE001 - any parse failure is the finding
        return f"not an OpenAI error body: {response.text[:200]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"} or not error["message"]:
        return f"malformed error object: {error!r}"[:300]
    return None


class _Recorder:
    def __init__(self, result: FuzzResult, base_url: str, timeout_s: float) -> None:
        self.result, self.base_url, self.timeout_s = result, base_url, timeout_s
        self.statuses: Counter[str] = Counter()

    def __call__(self, case: Any) -> None:
        self.result.num_cases += 1
        label = f"{case.method} {case.path}"
        try:
            response = case.call(base_url=self.base_url, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a timeout or reset is a failure, never a crash
            size = len(json.dumps(case.body, default=str)) if case.body is not None else 0
            self._fail(f"{label}: no answer ({type(exc).__name__}) for a {size}-byte body: "
                       f"{json.dumps(case.body, default=str)[:150]}")
            return
        status = response.status_code
        self.statuses[str(status)] += 1
        if status >= 500:
            self._fail(f"{label}: {status} for body {json.dumps(case.body, default=str)[:200]}")
        elif status >= 400 and (problem := _error_shape_problem(response)) is not None:
            self._fail(f"{label}: {status} {problem}")

    def _fail(self, message: str) -> None:
        self.result.num_failures += 1
        if len(self.result.failures) < 50:
            self.result.failures.append(message)


def fuzz(base_url: str, num_cases: int = 200, seed: int = 0, timeout_s: float = 30.0, max_tokens: int = 4) -> FuzzResult:
    """Run about ``num_cases`` cases, spread over the operations and both generation modes."""
    result = FuzzResult(base_url)
    start = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    operations = [op.ok() for op in schema.get_all_operations()]
    num_posts = sum(op.method.upper() == "POST" for op in operations)
    per_run = max(1, num_cases // (2 * max(1, num_posts)))
    recorder = _Recorder(result, base_url, timeout_s)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode).map(lambda case: _cap(case, max_tokens, model))
            examples = per_run if operation.method.upper() == "POST" else 3

            @hypothesis_seed(seed)
            @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                recorder(case)

            try:
                run()
            except Unsatisfiable:  # e.g. no negative case exists for a GET without parameters
                continue
    result.statuses = dict(sorted(recorder.statuses.items()))
    result.duration_s = round(time.monotonic() - start, 1)
    try:
        result.healthy_after = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        result.healthy_after = False
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL of a running server")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as a hang")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON summary path (default: stdout only)")
    ns = parser.parse_args(argv)
    result = fuzz(ns.url, ns.cases, ns.seed, ns.timeout, ns.max_tokens)
    emit({**asdict(result), "ok": result.ok}, ns.out)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
