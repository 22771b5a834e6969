"""The worker endpoints ``vllm-router`` calls besides the OpenAI routes.

Observed with the pinned ``vllm-router`` 0.1.17 against a recording worker (docs/scale_out.md has the
trace), a worker is asked for:

* ``GET /health`` at start-up and every ``--health-check-interval-secs`` (served by
  :mod:`sparkserve.server.app`; 200 = healthy);
* ``GET /get_load``, polled by the router (``power_of_two`` picks the less loaded of two workers by it;
  ``GET /get_loads`` on the router shows the values). Shape: ``{"load": <int>}``; without it the
  router records ``-1`` and load-aware policies are blind. Here the load is the number of requests the
  engine holds: running plus waiting.
* ``POST /v1/chat/completions/render`` and ``POST /v1/completions/render`` (the ``cache_aware``
  policy, on every worker, for every request): the request body as the client sent it plus the router's
  fields; the router reads ``token_ids`` from the answer and matches prefixes on tokens instead of
  characters. Without the route (404) it tries ``POST /tokenize`` and then falls back to text. The
  answer here carries ``request_id``, ``token_ids`` and ``model``, the fields of vLLM's render response
  that describe the prompt (vLLM's also carries the sampling parameters, which the router does not need).

The routes never touch torch: they tokenize with the engine's tokenizer, as the OpenAI routes do.
"""

from __future__ import annotations

import uuid
from typing import Protocol, runtime_checkable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sparkserve.server.errors import bad_request
from sparkserve.server.protocol import ChatCompletionRequest, CompletionRequest
from sparkserve.server.serving import ServerState
from sparkserve.server.serving_chat import build_chat_prompt
from sparkserve.server.serving_completions import completion_prompts


@runtime_checkable
class LoadReporter(Protocol):
    """The engine counters the load endpoint reads (``AsyncEngine`` and ``FakeEngine`` have them)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


class LoadResponse(BaseModel):
    """``GET /get_load``: requests the engine holds (running + waiting)."""

    load: int


class RenderResponse(BaseModel):
    """``POST .../render``: the prompt as the engine would see it.

    Attributes:
        request_id: a fresh id (``render-<hex>``); nothing is queued under it.
        token_ids: the prompt's token ids, ``[num_prompt_tokens]``.
        model: the served model name.
    """

    request_id: str
    token_ids: list[int]
    model: str


def engine_load(state: ServerState) -> int:
    """Requests the engine holds: running + waiting; the server's in-flight count if the engine does
    not report them."""
    engine = state.engine
    if isinstance(engine, LoadReporter):
        return engine.num_running + engine.num_waiting
    return state.num_inflight


def _render(state: ServerState, token_ids: list[int]) -> RenderResponse:
    return RenderResponse(request_id=f"render-{uuid.uuid4().hex}", token_ids=token_ids,
                          model=state.served_model_name)


def install_router_routes(app: FastAPI, state: ServerState) -> None:
    """Add ``/get_load`` and the two render routes to ``app`` (see the module docstring).

    Errors: the render routes answer a bad body or an unknown model exactly as the completion routes
    would (400 / 404, OpenAI-style), and several completion prompts with 400 (the render answer has
    one ``token_ids`` list).
    """

    @app.get("/get_load")
    async def get_load() -> LoadResponse:
        return LoadResponse(load=engine_load(state))

    @app.post("/v1/chat/completions/render")
    async def render_chat(body: ChatCompletionRequest) -> JSONResponse:
        state.check_can_serve(body.model)
        engine = state.engine
        prompt = await run_in_threadpool(build_chat_prompt, body, engine.tokenizer, engine.max_model_len)
        return JSONResponse(_render(state, prompt).model_dump())

    @app.post("/v1/completions/render")
    async def render_completion(body: CompletionRequest) -> JSONResponse:
        state.check_can_serve(body.model)
        engine = state.engine
        prompts = await run_in_threadpool(completion_prompts, body, engine.tokenizer, engine.max_model_len)
        if len(prompts) != 1:
            raise bad_request("render takes exactly one prompt", param="prompt")
        return JSONResponse(_render(state, prompts[0]).model_dump())
