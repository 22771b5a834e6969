"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

Clients count and budget tokens with them. ``/tokenize`` takes either a ``prompt`` (tokenized as
``/v1/completions`` would, plus what the tokenizer's post-processor adds when ``add_special_tokens``)
or chat ``messages`` (rendered with the chat template exactly as ``/v1/chat/completions`` renders them,
tools included); the answer carries ``count``, ``tokens``, ``max_model_len`` and, when asked,
``token_strs``. ``/detokenize`` turns token ids back into text (special tokens kept, as vLLM does).
``model`` is optional (as in vLLM) and, when given, must be the served model.

``GET /tokenizer_info`` (as vLLM's) gives the special tokens as text and the chat template: with
``/tokenize`` and ``/detokenize`` it is all that lm-evaluation-harness's remote tokenizer
(``local-completions``, ``tokenizer_backend=remote``, auto-detected) needs, so no tokenizer has to be
fetched from a hub.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool

from sparkserve.server.engine_client import Tokenizer
from sparkserve.server.errors import bad_request
from sparkserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    Text,
    ToolDefinition,
    _Request,
    _Response,
)
from sparkserve.server.request_validation import check_text_fits
from sparkserve.server.serving import ServerState
from sparkserve.server.serving_chat import build_chat_prompt, token_text

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeCompletionRequest(_Request):
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfoResponse(_Response):
    tokenizer_class: str = "sparkserve"
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    vocab_size: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(_Response):
    prompt: str


def parse_tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The chat form when the body has ``messages``, else the prompt form (so a validation error names
    the form's own fields). Raises RequestValidationError (a 400 naming the field)."""
    form = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        return form.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None:
        state.check_can_serve(model)


def _tokenize_prompt(req: TokenizeCompletionRequest, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
    # Length-checked like a completion prompt: a huge text is refused before tokenizing (and far
    # past the context it could not be served anyway).
    check_text_fits([req.prompt], tokenizer, max_model_len, "prompt")
    return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)


def _tokenize_chat(req: TokenizeChatRequest, tokenizer: Tokenizer, max_model_len: int) -> list[int]:
    chat = ChatCompletionRequest(model=req.model or "", messages=req.messages, tools=req.tools)
    return build_chat_prompt(chat, tokenizer, max_model_len, add_generation_prompt=req.add_generation_prompt)


async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest, state: ServerState) -> TokenizeResponse:
    """Token ids of a prompt or of templated chat messages.

    Raises:
        ApiError: 404 for another model, 400 when the text cannot fit the context or the chat
            template rejects the messages.
    """
    _check_model(state, req.model)
    engine = state.engine
    if isinstance(req, TokenizeChatRequest):
        ids = await run_in_threadpool(_tokenize_chat, req, engine.tokenizer, engine.max_model_len)
    else:
        ids = await run_in_threadpool(_tokenize_prompt, req, engine.tokenizer, engine.max_model_len)
    strs = [token_text(engine.tokenizer, t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(req: DetokenizeRequest, state: ServerState) -> DetokenizeResponse:
    """The text of token ids (special tokens kept).

    Raises:
        ApiError: 404 for another model, 400 for an id outside the vocabulary.
    """
    _check_model(state, req.model)
    tokenizer = state.engine.tokenizer
    if any(t >= tokenizer.vocab_size for t in req.tokens):
        raise bad_request(f"token ids must be in [0, {tokenizer.vocab_size}).", param="tokens")
    text = await run_in_threadpool(tokenizer.decode, req.tokens, False)
    return DetokenizeResponse(prompt=text)


def tokenizer_info(state: ServerState) -> TokenizerInfoResponse:
    """The special tokens (as text), the chat template and the sizes of the served tokenizer."""
    engine = state.engine
    tokenizer = engine.tokenizer

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else token_text(tokenizer, token_id)

    return TokenizerInfoResponse(
        eos_token=text(tokenizer.eos_token_id), bos_token=text(tokenizer.bos_token_id),
        chat_template=tokenizer.chat_template, vocab_size=tokenizer.vocab_size,
        max_model_len=engine.max_model_len,
    )
