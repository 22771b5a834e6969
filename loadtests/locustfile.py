"""Locust scenarios against a sparkserve (or any OpenAI-compatible) server.

Run (headless, bounded):
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s

Each simulated user streams chat completions of MT-bench first turns and reports TTFT and the whole
stream as separate locust entries. Environment: SPARKSERVE_MODEL (model name), SPARKSERVE_MAX_TOKENS.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

from loadtests.prompts import load_prompts

_PROMPTS = load_prompts("mt_bench")
_MAX_TOKENS = int(os.environ.get("SPARKSERVE_MAX_TOKENS", "128"))


class ChatUser(HttpUser):
    """A user who streams chat completions, pausing 0.1-1 s between them."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        self.model = os.environ.get("SPARKSERVE_MODEL") or self.client.get("/v1/models").json()["data"][0]["id"]

    @task(4)
    def stream_chat(self) -> None:
        body = {
            "model": self.model, "stream": True, "max_tokens": _MAX_TOKENS, "temperature": 0.7,
            "messages": [{"role": "user", "content": random.choice(_PROMPTS)}],
        }
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="chat (stream)") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            for line in resp.iter_lines():
                if line and line.startswith(b"data: ") and line != b"data: [DONE]":
                    json.loads(line[6:])
                    if first is None:
                        first = time.perf_counter()
                        self.environment.events.request.fire(
                            request_type="TTFT", name="chat", response_time=(first - start) * 1000,
                            response_length=0, exception=None, context={},
                        )
            resp.success()

    @task(1)
    def short_completion(self) -> None:
        body = {"model": self.model, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0.0}
        self.client.post("/v1/completions", json=body, name="completion (short)")
