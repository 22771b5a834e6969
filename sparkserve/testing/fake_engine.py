"""A fake engine with the ``AsyncEngine`` interface, for fast server tests (no torch, no model).

:class:`FakeTokenizer` is byte-level (ids 0-255 are bytes) with three merged tokens and ChatML
special tokens, so multi-byte UTF-8 characters really are split across tokens and stop strings can
span tokens. :class:`FakeEngine` replies deterministically: the text between ``[[`` and ``]]`` in
the prompt (else :data:`DEFAULT_REPLY`), then EOS. Directives in the prompt change its behaviour:
``{delay=S}`` seconds between outputs, ``{spec=K}`` tokens per output (like speculative decoding),
``{error=N}`` the request fails (finish_reason "error", as after a failed engine step) after N outputs,
``{die=N}`` the engine loop dies after N outputs. Prompt logprobs, when asked, are ``-1.0`` for every
prompt token after the first (top: the token itself, then EOS at ``-3.0``), on the first output.

Run as a module it serves the fake through ``sparkserve.server.http_server.serve`` (graceful-shutdown tests).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from sparkserve.engine.chat_template import encode_chat_markup_only
from sparkserve.engine.outputs import EngineDeadError, QueueFullError, RequestOutput
from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.scheduler.sampling_params import SamplingParams

DEFAULT_REPLY = "Hello, world! Café ☕ 🎉 done."
EOS, IM_START, IM_END = 256, 257, 258
_SPECIALS = {EOS: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
_MERGES = {259: b"Hello", 260: b", wor", 261: b"ld!"}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in _SPECIALS.values()) + ")")


class FakeTokenizer:
    """Byte-level tokenizer: 256 byte tokens, 3 specials (EOS, ``<|im_start|>``, ``<|im_end|>``)
    and 3 merges (``Hello``, ``, wor``, ``ld!``)."""

    eos_token_id = EOS
    bos_token_id = None
    chat_template = None  # the ChatML markup is built in (apply_chat_template)
    stop_token_ids = (EOS, IM_END)
    all_special_ids = tuple(_SPECIALS)
    special_tokens = {v: k for k, v in _SPECIALS.items()}
    vocab_size = 262
    max_token_bytes = max(len(m) for m in _MERGES.values())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(text):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            else:
                ids += self.encode_text(piece)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Bytes and merges only: special-token strings are text."""
        ids: list[int] = []
        data, i = text.encode(), 0
        while i < len(data):
            merge = next((t for t, b in _MERGES.items() if data.startswith(b, i)), None)
            ids.append(data[i] if merge is None else merge)
            i += 1 if merge is None else len(_MERGES[merge])
        return ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat_markup_only(
            lambda ms: self.apply_chat_template(ms, add_generation_prompt),
            self.encode, self.encode_text, self.special_tokens, messages,
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in ids:
            if t in _SPECIALS:
                out += b"" if skip_special_tokens else _SPECIALS[t].encode()
            else:
                out += _MERGES[t] if t in _MERGES else bytes([t])
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if messages[-1]["content"] == "RAISE":
            raise ValueError("template says no")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass
class FakeEngine:
    """Deterministic engine stand-in; records every request, its params and every abort."""

    model_name: str = "fake-model"
    max_model_len: int = 256
    max_num_seqs: int = 4
    max_waiting_requests: int = 4
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    params: dict[str, SamplingParams] = field(default_factory=dict)
    prompts: dict[str, list[int]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    ready_checks: int = 0
    dead: bool = False
    admitting: bool = True
    _active: dict[str, bool] = field(default_factory=dict)  # request id -> aborted flag, FIFO order

    @classmethod
    def from_args(cls, args: object) -> FakeEngine:
        return cls()

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.dead = True

    @property
    def is_healthy(self) -> bool:
        return not self.dead

    @property
    def num_running(self) -> int:
        return min(len(self._active), self.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return len(self._active) - self.num_running

    def stop_admitting(self) -> None:
        self.admitting = False

    async def drain(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._active

    async def check_ready(self, timeout_s: float) -> bool:
        self.ready_checks += 1
        outputs = await self.add_request(
            f"ready-{self.ready_checks}", [IM_START], SamplingParams(max_tokens=1)
        )
        async for _ in outputs:
            pass
        return True

    async def abort(self, request_id: str) -> None:
        if request_id in self._active:
            self._active.pop(request_id)
            self.aborted.append(request_id)

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.dead or not self.admitting:
            raise EngineDeadError("engine is not accepting requests")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejectedError("prompt + max_tokens exceeds max_model_len", "max_tokens", "context_length_exceeded")
        if len(self._active) >= self.max_num_seqs + self.max_waiting_requests:
            raise QueueFullError("waiting queue full", retry_after_s=1.5)
        self.params[request_id] = params
        self.prompts[request_id] = list(prompt_token_ids)
        self._active[request_id] = False
        return self._generate(request_id, prompt_token_ids, params, time.monotonic())

    def _script(self, prompt_token_ids: list[int]) -> tuple[list[int], dict[str, float]]:
        text = self.tokenizer.decode(prompt_token_ids)
        replies = re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)
        directives = {k: float(v) for k, v in re.findall(r"\{(\w+)=([\d.]+)\}", text)}
        return self.tokenizer.encode(replies[-1] if replies else DEFAULT_REPLY), directives

    async def _generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, arrival: float
    ) -> AsyncIterator[RequestOutput]:
        reply, directives = self._script(prompt)
        delay, per_step = directives.get("delay", 0.0), int(directives.get("spec", 1))
        die_after = int(directives.get("die", 0))
        error_after = int(directives.get("error", 0))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        produced: list[int] = []
        steps = 0
        while request_id in self._active and list(self._active).index(request_id) >= self.max_num_seqs:
            await asyncio.sleep(0.01)  # waiting for a running slot
        times = {"arrival_time": arrival, "first_scheduled_time": time.monotonic()}
        while True:
            await asyncio.sleep(delay)
            if self.dead:
                raise EngineDeadError("engine loop died")
            if request_id not in self._active:
                yield RequestOutput(request_id, (), None, "abort", None, len(prompt), len(produced), **times)
                return
            if error_after and steps >= error_after:
                self._active.pop(request_id, None)
                yield RequestOutput(request_id, (), None, "error", None, len(prompt), len(produced), **times)
                return
            new, finish, stop_reason = self._step(reply + [EOS], produced, per_step, params, stops)
            produced += new
            steps += 1
            logprobs = None
            prompt_logprobs = None
            if params.prompt_logprobs is not None and steps == 1:
                prompt_logprobs = tuple(TokenLogprob(t, -1.0, ((t, -1.0), (EOS, -3.0))[: params.prompt_logprobs])
                                        for t in prompt[1:])
            if params.logprobs is not None:
                logprobs = tuple(
                    TokenLogprob(t, -0.5, ((t, -0.5), (EOS, -2.0))[: params.logprobs]) for t in new
                )
            if finish is not None:
                self._active.pop(request_id, None)
            yield RequestOutput(
                request_id, tuple(new), logprobs, finish, stop_reason, len(prompt), len(produced), **times,
                prompt_logprobs=prompt_logprobs,
            )
            if finish is not None:
                return
            if die_after and steps >= die_after:
                self.dead = True

    @staticmethod
    def _step(
        script: list[int], produced: list[int], per_step: int, params: SamplingParams, stops: set[int]
    ) -> tuple[list[int], str | None, int | None]:
        new: list[int] = []
        for _ in range(per_step):
            pos = len(produced) + len(new)
            token = script[:-1][pos % (len(script) - 1)] if params.ignore_eos else script[pos]
            new.append(token)
            if token in stops:
                return new, "stop", token
            if len(produced) + len(new) >= params.max_tokens:
                return new, "length", None
        return new, None, None


def main() -> None:
    """Serve a FakeEngine with the real CLI serving loop (used by the graceful-shutdown test)."""
    from sparkserve.server.app import build_app
    from sparkserve.server.http_server import serve
    from sparkserve.server.metrics import ServerMetrics

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    args = parser.parse_args()
    engine = FakeEngine(max_num_seqs=args.max_num_seqs)
    app = build_app(engine, metrics=ServerMetrics(engine.model_name))
    serve(app, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout, log_level="warning")


if __name__ == "__main__":
    main()
