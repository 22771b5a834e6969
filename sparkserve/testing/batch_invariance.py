"""The batch-invariance checks of issue 24 on one loaded model: the same request's tokens in every setting.

:func:`check_invariance` runs a greedy and a seeded T = 1 request against its own first run (alone, cold
prefix cache) in the settings below. Near-tie tolerance zero, and stricter: each output token is compared
with its logprob (the fp32 log-softmax of the target's logits), so a change of the logits' bits that does
not flip a token is caught too.

* ``warm``: sent again, its full prompt blocks now from the prefix cache;
* ``batch``: inside a batch of 8 different requests;
* ``chunked``: on an engine whose step budget prefills the prompt in chunks of 16 tokens;
* ``stream``: streamed from the ``AsyncEngine`` while other requests run (the reference is not streamed);
* ``dspark`` / ``hybrid``: with speculation on (the shipped DSpark drafter; DSpark + suffix drafts).

Each engine shares the loaded model (and its one weight copy); the mode is an engine argument.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from sparkserve.engine.async_engine import AsyncEngine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import LoadedModel
from sparkserve.scheduler.sampling_params import SamplingParams

QUESTIONS = (
    "Explain in two sentences why the sky is blue and why sunsets are red, for a curious child.",
    "Name three fruits.", "What is the capital of France?", "Write a haiku about rain.",
    "What do bees make?", "Name a programming language.", "What is the opposite of cold?",
    "Count from one to five.", "Why do cats purr?",
)
SETTINGS = ("warm", "batch", "chunked", "stream", "dspark", "hybrid")


@dataclass(frozen=True)
class InvarianceResult:
    """One comparison: ``setting`` for the ``kind`` request ("greedy" / "seeded"), equal or not."""

    setting: str
    kind: str
    reference: tuple[tuple[int, float], ...]  # (token id, logprob) per output token
    tokens: tuple[tuple[int, float], ...]

    @property
    def equal(self) -> bool:
        """Same tokens with the same logprob bits."""
        return self.reference == self.tokens

    @property
    def same_tokens(self) -> bool:
        return [t for t, _ in self.reference] == [t for t, _ in self.tokens]


def base_args(dtype: str, batch_invariant: bool | None, **kw: object) -> EngineArgs:
    """Small-cache engine arguments for the checks (speculation off unless ``kw`` says otherwise);
    ``batch_invariant`` None: the default configuration's choice (``EngineArgs.batch_invariant_on``)."""
    defaults: dict[str, object] = {"num_kv_blocks": 256, "block_size": 16, "max_num_batched_tokens": 256,
                                   "max_num_seqs": 16, "drafter": "none", "cpu_plan": False}
    defaults.update(kw)
    return EngineArgs(dtype=dtype, batch_invariant=batch_invariant, **defaults)  # type: ignore[arg-type]


def check_invariance(loaded: LoadedModel, dtype: str, batch_invariant: bool | None, max_tokens: int = 5,
                     settings: tuple[str, ...] = SETTINGS) -> list[InvarianceResult]:
    """Run the checks of the module docstring on ``loaded``; returns one result per setting and kind."""
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    stops = tuple(tok.stop_token_ids)
    kinds = {"greedy": SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stops, logprobs=0),
             "seeded": SamplingParams(temperature=1.0, seed=1234, max_tokens=max_tokens, stop_token_ids=stops,
                                      logprobs=0)}
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens) for i in range(len(prompts))]
    args = base_args(dtype, batch_invariant)
    core = EngineCore(args, loaded=loaded)
    reference = {k: _generate(core, [prompts[0]], p, request_prefix=f"ref-{k}")[0] for k, p in kinds.items()}
    runs: dict[str, dict[str, Emitted]] = {}
    if "warm" in settings:
        runs["warm"] = {k: _generate(core, [prompts[0]], p, request_prefix=f"warm-{k}")[0] for k, p in kinds.items()}
    if "batch" in settings:
        batch = _generate(core, [prompts[0], prompts[0], *prompts[1:8]], [*kinds.values(), *others[:7]],
                                    request_prefix="batch")
        runs["batch"] = dict(zip(kinds, batch[:2], strict=True))
    if "chunked" in settings:
        chunked = EngineCore(replace(args, max_num_batched_tokens=16), loaded=loaded)
        runs["chunked"] = {k: _generate(chunked, [prompts[0]], p)[0] for k, p in kinds.items()}
    if "stream" in settings:
        runs["stream"] = asyncio.run(_streamed(EngineCore(args, loaded=loaded), prompts, kinds, others))
    for method in ("dspark", "hybrid"):
        if method in settings:
            spec = EngineCore(replace(args, drafter=None, speculative_method=method, verify_policy="fixed:3"),
                              loaded=loaded)
            runs[method] = {k: _generate(spec, [prompts[0]], p)[0] for k, p in kinds.items()}
    return [InvarianceResult(setting, kind, tuple(reference[kind]), tuple(tokens))
            for setting in settings for kind, tokens in runs[setting].items()]


Emitted = list[tuple[int, float]]


def _generate(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
              request_prefix: str = "run") -> list[Emitted]:
    """``EngineCore.generate_batch`` keeping each token's logprob (0.0 where none was asked for)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"{request_prefix}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, per_prompt, strict=True):
        core.add_request(core.make_request(rid, prompt, p))
    emitted: dict[str, Emitted] = {rid: [] for rid in ids}
    while core.has_unfinished_requests():
        for out in core.step():
            emitted[out.request_id].extend(_pairs(out.new_token_ids, out.new_logprobs))
    return [emitted[rid] for rid in ids]


def _pairs(tokens: tuple[int, ...] | list[int], logprobs: tuple | None) -> Emitted:
    values = [lp.logprob for lp in logprobs] if logprobs else [0.0] * len(tokens)
    return list(zip(tokens, values, strict=True))


async def _streamed(core: EngineCore, prompts: list[list[int]], kinds: dict[str, SamplingParams],
                    others: list[SamplingParams]) -> dict[str, Emitted]:
    """Each kind streamed (deltas concatenated) while three other requests run beside it."""
    engine = AsyncEngine(core)
    await engine.start()
    try:
        async def stream(request_id: str, params: SamplingParams) -> Emitted:
            emitted: Emitted = []
            async for out in await engine.add_request(request_id, prompts[0], params):
                emitted.extend(_pairs(out.new_token_ids, out.new_logprobs))
            return emitted

        background = [engine.generate(prompts[i], others[i]) for i in (1, 2, 3)]
        streamed = [stream(f"stream-{k}", p) for k, p in kinds.items()]
        results = await asyncio.gather(*streamed, *background)
        return dict(zip(kinds, results[:len(kinds)], strict=True))
    finally:
        await engine.shutdown()


def summary(results: list[InvarianceResult]) -> str:
    """One line: how many comparisons differ (in tokens; else only in logprob bits), and which."""
    differ = [f"{r.setting}/{r.kind}" + ("" if r.same_tokens else " (tokens)") for r in results if not r.equal]
    tokens = sum(not r.same_tokens for r in results)
    return (f"{len(differ)} of {len(results)} differ, {tokens} in their tokens"
            + (f": {', '.join(differ)}" if differ else ""))


def count_fused_attention_rows(monkeypatch) -> list[int]:  # noqa: ANN001 (a pytest MonkeyPatch)
    """Wrap the fused CPU attention op so each call appends its query row count to the returned list (one
    call per layer of a fused step); the wrapper stays until ``monkeypatch`` undoes it."""
    from sparkserve.engine.models import llama
    from sparkserve.kernels import fused_cpu

    calls: list[int] = []
    real = fused_cpu.rope_store_attend

    def counted(*args):  # noqa: ANN002, ANN202
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(llama.fused_cpu, "rope_store_attend", counted)
    return calls
