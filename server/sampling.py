"""OpenAI request fields -> engine inputs: ``max_tokens`` resolution and :class:`SamplingParams`.

Default ``max_tokens`` (when a request omits it): ``min(default_max_tokens, max_model_len -
prompt_len)``; ``default_max_tokens`` is a server setting (CLI ``--default-max-tokens``, 1024) so a
forgotten limit cannot tie up a sequence slot for the whole context.
"""

from __future__ import annotations

from scheduler.sampling_params import SamplingParams
from server.engine_client import Tokenizer
from server.errors import bad_request
from server.protocol import SamplingRequestFields


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
    bias = tuple(sorted((int(k), v) for k, v in (req.logit_bias or {}).items()))
    if any(token_id >= vocab_size for token_id, _ in bias):
        raise bad_request(f"logit_bias keys must be token ids < {vocab_size}.", param="logit_bias")
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k if req.top_k not in (None, 0, -1) else None,
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
