"""Request fields that ``vllm-router`` adds to every request it forwards.

``vllm-router`` 0.1.17 (PyPI; a fork of the SGLang model gateway) parses each chat / completions
request into its own typed request and serializes it again, so the body a worker receives carries the
router's fields with their default values even when the client never sent them (observed on the wire
with the pinned binary; see docs/scale_out.md):

* chat: ``no_stop_trim: false``, ``ignore_eos: false``, ``continue_final_message: false``,
  ``skip_special_tokens: true``, ``separate_reasoning: true``, ``stream_reasoning: true``,
  ``include_reasoning: true``, ``return_hidden_states: false`` (and ``logprobs: false``,
  ``stream: false``, which are OpenAI fields);
* completions: ``no_stop_trim``, ``ignore_eos``, ``skip_special_tokens``, ``return_hidden_states``
  (and ``echo: false``).

Each field is declared here with the value that means what this server already does, so the router's
defaults are accepted. A value this server cannot honour is a 400 naming the field, never silently
ignored: ``no_stop_trim: true`` (keep the stop string in the text), ``skip_special_tokens: false``,
``continue_final_message: true``, ``return_hidden_states: true``. The reasoning switches
(``separate_reasoning`` / ``stream_reasoning`` / ``include_reasoning``) only concern models with a
reasoning parser; this server has none, so any value means the same output and is accepted.
``ignore_eos`` is an existing extension (honoured), declared in ``sparkserve.server.protocol``.

The models keep ``extra="forbid"`` (they inherit the request config of the class they are mixed into):
only these named fields become legal, not arbitrary unknown ones.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, ValidationInfo, field_validator

UNSUPPORTED_VALUES: dict[str, bool] = {
    "no_stop_trim": True,
    "skip_special_tokens": False,
    "continue_final_message": True,
    "return_hidden_states": True,
}
"""Router-added field -> the one value this server cannot honour (a 400)."""


def _check_supported(name: str, value: bool) -> bool:
    if value == UNSUPPORTED_VALUES[name]:
        raise ValueError(f"{name}={str(value).lower()} is not supported by this server")
    return value


class RouterCompletionFields(BaseModel):
    """Router-added fields of ``POST /v1/completions`` (``ignore_eos`` lives in the base request)."""

    no_stop_trim: bool = Field(False, description="vllm-router field; only false (stop strings are trimmed)")
    skip_special_tokens: bool = Field(True, description="vllm-router field; only true")
    return_hidden_states: bool = Field(False, description="vllm-router field; only false")

    @field_validator("no_stop_trim", "skip_special_tokens", "return_hidden_states")
    @classmethod
    def _check_router_field(cls, value: bool, info: ValidationInfo) -> bool:
        return _check_supported(str(info.field_name), value)


class RouterChatFields(RouterCompletionFields):
    """Router-added fields of ``POST /v1/chat/completions``."""

    continue_final_message: bool = Field(False, description="vllm-router field; only false")
    separate_reasoning: bool = Field(True, description="vllm-router field; no reasoning parser here: no effect")
    stream_reasoning: bool = Field(True, description="vllm-router field; no reasoning parser here: no effect")
    include_reasoning: bool = Field(True, description="vllm-router field; no reasoning parser here: no effect")

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue(cls, value: bool) -> bool:
        return _check_supported("continue_final_message", value)
