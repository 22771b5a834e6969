"""OpenAI request fields -> engine inputs: ``max_tokens`` resolution and :class:`SamplingParams`.

Default ``max_tokens`` (when a request omits it): ``min(default_max_tokens, max_model_len -
prompt_len)``; ``default_max_tokens`` is a server setting (CLI ``--default-max-tokens``, 1024) so a
forgotten limit cannot tie up a sequence slot for the whole context.
"""

from __future__ import annotations

from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.server.engine_client import Tokenizer
from sparkserve.server.errors import bad_request
from sparkserve.server.protocol import INT64_MAX, INT64_MIN, SamplingRequestFields


def check_text_fits(texts: list[str], tokenizer: Tokenizer, max_model_len: int, param: str) -> None:
    """400 for a text that cannot fit the context whatever its tokenization, before tokenizing it.

    A token stands for at most ``tokenizer.max_token_bytes`` UTF-8 bytes, so a text of more than
    ``max_model_len * max_token_bytes`` bytes has more than ``max_model_len`` tokens. This keeps a
    16 MiB message from being tokenized (seconds of CPU) only to be refused.
    """
    limit = max_model_len * tokenizer.max_token_bytes
    for text in texts:
        size = len(text) if len(text) > limit else len(text.encode("utf-8"))  # chars <= bytes
        if size > limit:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your input "
                f"has at least {size} bytes of text, more than {max_model_len} tokens can hold.",
                param=param,
                code="context_length_exceeded",
            )


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, default: int, param: str
) -> int:
    """``max_tokens`` for one prompt: the request's value, else ``min(default, room left)``.

    Raises:
        ApiError: 400 when the prompt alone fills the context, or prompt + max_tokens exceeds it.
    """
    room = max_model_len - prompt_len
    if prompt_len == 0:
        raise bad_request("The prompt is empty.", param=param)
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {prompt_len} tokens, leaving no room for the completion.",
            param=param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(default, room)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def build_sampling_params(
    req: SamplingRequestFields, tokenizer: Tokenizer, *, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    """Map OpenAI request fields onto :class:`SamplingParams` (one engine request, ``n=1``).

    The model's own stop tokens (e.g. ``<|im_end|>``) are added to ``stop_token_ids`` except EOS,
    which the scheduler handles; with ``ignore_eos`` none are added (as vLLM), so benchmarks run to
    ``max_tokens``.
    """
    vocab_size = tokenizer.vocab_size
    stop_ids = list(req.stop_token_ids or ())
    if any(t >= vocab_size for t in stop_ids):
        raise bad_request(f"stop_token_ids must be < vocab size {vocab_size}.", param="stop_token_ids")
    if not req.ignore_eos:
        stop_ids += [t for t in tokenizer.stop_token_ids if t != tokenizer.eos_token_id and t not in stop_ids]
    bias = req.logit_bias_ids()
    if any(token_id >= vocab_size for token_id, _ in bias):
        raise bad_request(f"logit_bias keys must be token ids < {vocab_size}.", param="logit_bias")
    # top_k >= the vocabulary keeps every token: the same as no filter (and no huge int reaches a tensor).
    top_k = req.top_k if req.top_k is not None and 0 < req.top_k < vocab_size else None
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            stop=req.stop_strings(),
            stop_token_ids=tuple(stop_ids),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logit_bias=bias,
            target_tpot_ms=req.target_tpot_ms,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def check_num_choices(max_choices: int, num_prompts: int, n: int) -> None:
    """400 when ``n * num_prompts`` exceeds the server's limit."""
    if num_prompts * n > max_choices:
        raise bad_request(
            f"n * number of prompts must be <= {max_choices}, got {n} * {num_prompts}.", param="n"
        )


def check_seed(seed: int | None, n: int) -> None:
    """400 unless every choice's seed ``seed + i`` (``i < n``) is an int64.

    The protocol already bounds ``seed`` to int64; this also bounds ``seed + n - 1`` (choices are
    seeded ``seed, seed + 1, ...``; no wrap-around is defined, so the top of the range is refused).
    """
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX - (n - 1):
        raise bad_request(
            f"seed must be in [{INT64_MIN}, {INT64_MAX} - (n - 1)] (choice i uses seed + i, an int64); "
            f"got seed {seed} with n = {n}.",
            param="seed",
        )


def check_total_tokens(limit: int, max_tokens: list[int], n: int) -> None:
    """400 when the request may generate more than ``limit`` tokens in all (n x max_tokens, summed
    over prompts)."""
    total = n * sum(max_tokens)
    if total > limit:
        raise bad_request(
            f"n x max_tokens (summed over prompts) must be <= {limit} tokens, got {total}.", param="max_tokens"
        )
