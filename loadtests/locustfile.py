"""Locust scenarios against sparkserve or any OpenAI-compatible server (``--host``).

Run headless, bounded, with CSV out:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s \\
        --csv bench_results/locust --only-summary
    SPARKSERVE_SHAPE=burst SPARKSERVE_USERS=32 SPARKSERVE_DURATION=120 \\
        locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless --csv bench_results/locust

Users (their mix: ``SPARKSERVE_WEIGHTS``, default ``chat=6,completions=3,disconnect=1,bad=1``; a weight
of 0 removes the user type):
    ChatStreamUser        streaming chat completions of MT-bench first turns
    CompletionStreamUser  streaming text completions of the same prompts
    DisconnectUser        starts a streaming chat and closes the connection after a few chunks
                          (the server must abort it and free its KV cache)
    BadRequestUser        sends invalid requests; the expected 400 is a success under the name
                          "bad request (expected 400)", anything else a failure

Entries besides the HTTP requests: request_type ``TTFT`` (send to first content chunk, ms) and
``ITL`` (each gap between content chunks, ms), named by endpoint, so the CSV has their percentiles.

Shapes (``SPARKSERVE_SHAPE``; unset = locust's own ``-u/-r/-t``), peak ``SPARKSERVE_USERS`` (16) over
``SPARKSERVE_DURATION`` seconds (60):
    steady  the peak for the whole duration
    ramp    linear ramp up over 40% of the time, hold 40%, ramp down over the last 20%
    burst   a quarter of the peak, with bursts to the peak during the first fifth of each third
Other environment: SPARKSERVE_MODEL (default: /v1/models), SPARKSERVE_MAX_TOKENS (64),
SPARKSERVE_IGNORE_EOS (1 = send ignore_eos), SPARKSERVE_DISCONNECT_AFTER (chunks, 3).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, LoadTestShape, between, task

try:
    from sparkserve.loadtests.prompts import load_prompts

    _PROMPTS = load_prompts("mt_bench")
except (FileNotFoundError, KeyError):  # no shared data here: synthetic prompts still exercise the server
    from sparkserve.loadtests.bench.workload import random_prompt

    _rng = random.Random(0)
    _PROMPTS = [random_prompt(_rng, 64) for _ in range(64)]

_MAX_TOKENS = int(os.environ.get("SPARKSERVE_MAX_TOKENS", "64"))
_IGNORE_EOS = os.environ.get("SPARKSERVE_IGNORE_EOS", "0") == "1"
_DISCONNECT_AFTER = int(os.environ.get("SPARKSERVE_DISCONNECT_AFTER", "3"))


def _weights() -> dict[str, int]:
    weights = {"chat": 6, "completions": 3, "disconnect": 1, "bad": 1}
    for item in filter(None, os.environ.get("SPARKSERVE_WEIGHTS", "").split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"SPARKSERVE_WEIGHTS: unknown user type {name!r}; known: {sorted(weights)}")
        weights[name.strip()] = int(value)
    return weights


_WEIGHTS = _weights()


class _OpenAIUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.model = os.environ.get("SPARKSERVE_MODEL") or self.client.get(
            "/v1/models", name="/v1/models").json()["data"][0]["id"]

    def _body(self, endpoint: str, max_tokens: int) -> dict:
        prompt = random.choice(_PROMPTS)
        body = {"model": self.model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if _IGNORE_EOS:
            body["ignore_eos"] = True
        return body

    def _fire(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=ms,
                                             response_length=0, exception=None, context={})

    def stream(self, endpoint: str, max_tokens: int = _MAX_TOKENS, stop_after: int | None = None) -> None:
        """Stream one request; report TTFT and ITL entries; with ``stop_after``, close the
        connection after that many content chunks (a client disconnect)."""
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        name = f"{endpoint} (stream)" if stop_after is None else f"{endpoint} (disconnect after {stop_after} chunks)"
        start = time.perf_counter()
        last = None
        chunks = 0
        done = False
        with self.client.post(path, json=self._body(endpoint, max_tokens), stream=True, catch_response=True,
                              name=name) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines():
                    if not line or not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        resp.failure(f"stream error: {chunk['error']}")
                        return
                    text = "".join(((c.get("delta") or {}).get("content") or "") if endpoint == "chat"
                                   else (c.get("text") or "") for c in chunk.get("choices") or ())
                    if not text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        self._fire("TTFT", endpoint, (now - start) * 1000)
                    else:
                        self._fire("ITL", endpoint, (now - last) * 1000)
                    last = now
                    chunks += 1
                    if stop_after is not None and chunks >= stop_after:
                        break
            except Exception as exc:  # noqa: BLE001 - a broken stream is a failure to report
                resp.failure(f"stream broke: {exc!r}")
                return
            if stop_after is None and not done:
                resp.failure("the stream ended without [DONE]")
                return
            resp.success()
            if stop_after is not None:
                resp.close()  # drop the connection mid-stream


class ChatStreamUser(_OpenAIUser):
    """Streams chat completions."""

    weight = _WEIGHTS["chat"]

    @task
    def chat(self) -> None:
        self.stream("chat")


class CompletionStreamUser(_OpenAIUser):
    """Streams text completions."""

    weight = _WEIGHTS["completions"]

    @task
    def completions(self) -> None:
        self.stream("completions")


class DisconnectUser(_OpenAIUser):
    """Starts long streams and disconnects after a few chunks."""

    weight = _WEIGHTS["disconnect"]

    @task
    def disconnect(self) -> None:
        self.stream("chat", max_tokens=max(_MAX_TOKENS, 256), stop_after=_DISCONNECT_AFTER)


_BAD_BODIES = (
    lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}], "temperature": 5.0},
    lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    lambda m: {"model": m, "messages": []},
    lambda m: {"model": m, "messages": [{"role": "wizard", "content": "hi"}]},
    lambda m: {"model": m, "prompt": "hi", "n": 0},
)


class BadRequestUser(_OpenAIUser):
    """Sends invalid requests; a 400 with an OpenAI error object is the expected answer."""

    weight = _WEIGHTS["bad"]

    @task
    def bad(self) -> None:
        make = random.choice(_BAD_BODIES)
        body = make(self.model)
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        with self.client.post(path, json=body, catch_response=True, name="bad request (expected 400)") as resp:
            try:
                error = resp.json().get("error") or {}
            except ValueError:
                error = {}
            if resp.status_code == 400 and error.get("message"):
                resp.success()
            else:
                resp.failure(f"expected 400 with an error object, got {resp.status_code}: {resp.text[:200]}")


for _name, _cls in (("chat", ChatStreamUser), ("completions", CompletionStreamUser),
                    ("disconnect", DisconnectUser), ("bad", BadRequestUser)):
    if _WEIGHTS[_name] <= 0:
        del globals()[_cls.__name__]  # locust picks user types from the module namespace
del _name, _cls  # (every global bound to a user class counts as one)


_SHAPE = os.environ.get("SPARKSERVE_SHAPE", "").strip().lower()
if _SHAPE:
    if _SHAPE not in ("steady", "ramp", "burst"):
        raise ValueError(f"SPARKSERVE_SHAPE={_SHAPE!r}: use steady, ramp or burst")

    class SparkserveShape(LoadTestShape):
        """steady / ramp / burst (module docstring); stops after SPARKSERVE_DURATION seconds."""

        peak = int(os.environ.get("SPARKSERVE_USERS", "16"))
        duration = float(os.environ.get("SPARKSERVE_DURATION", "60"))

        def tick(self):
            t = self.get_run_time()
            if t >= self.duration:
                return None
            peak, dur = self.peak, self.duration
            if _SHAPE == "steady":
                return peak, peak
            if _SHAPE == "ramp":
                if t < 0.4 * dur:
                    users = 1 + (peak - 1) * t / (0.4 * dur)
                elif t < 0.8 * dur:
                    users = peak
                else:
                    users = max(1.0, peak * (dur - t) / (0.2 * dur))
                return max(1, round(users)), max(1.0, peak / max(1.0, 0.1 * dur))
            period = dur / 3
            in_burst = (t % period) < 0.2 * period
            return (peak if in_burst else max(1, peak // 4)), peak  # spawn a burst at once
