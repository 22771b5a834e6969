"""Per-request sampling parameters (pure Python, shared by server, scheduler and engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5
"""Below this temperature a request is greedy (argmax), as DeepSpec: the one threshold of the project."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    Token-level stops (EOS, ``stop_token_ids``, ``max_tokens``, the model's context length) are
    applied by the scheduler; stop *strings* are applied by the server's incremental detokenizer,
    which then aborts the request in the engine.

    Attributes:
        n: number of independent completions (the server fans out ``n`` engine requests).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: nucleus mass kept, in (0, 1].
        top_k: number of most likely tokens kept; ``None`` disables the filter.
        min_p: tokens with probability below ``min_p * p_max`` are removed; 0 disables.
        seed: seeds a per-request generator so sampling is reproducible; ``None`` uses the global one.
        presence_penalty / frequency_penalty: OpenAI penalties over the generated tokens, in [-2, 2].
        max_tokens: upper bound on generated tokens (>= 1).
        stop: stop strings (not included in the output text).
        stop_token_ids: extra token ids that end generation (EOS is added unless ``ignore_eos``).
        ignore_eos: keep generating past EOS (benchmarks).
        logprobs: ``None`` = no logprobs; ``k >= 0`` returns the chosen token's logprob plus the top-k.
        prompt_logprobs: ``None`` = none; ``k >= 0`` returns, with the first output, each prompt token's
            logprob (after the first token) plus the top-k; such a request bypasses the prefix cache.
        logit_bias: (token id, bias) pairs added to the logits before sampling.
        target_tpot_ms: optional per-request time-per-output-token goal (vendor extension) used by
            the load-aware verification policy; ``None`` = no goal.
        grammar: a validated llguidance grammar (``sparkserve.engine.structured.grammar.GrammarCompiler.compile``)
            the output must follow (structured outputs, tool calls); ``None`` = unconstrained.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    target_tpot_ms: float | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.target_tpot_ms is not None and not (math.isfinite(self.target_tpot_ms) and self.target_tpot_ms > 0):
            raise ValueError(f"target_tpot_ms must be a finite number > 0, got {self.target_tpot_ms}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature below 1e-5, as DeepSpec)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
