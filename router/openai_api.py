"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (SSE streaming or not), ``/health`` and ``/metrics``.

``/v1/models`` lists the served model once it is ready (``router.models``), and ``/health``
answers 200 from then on (503 before, with the reason): a client that waits for either never
gets a 503 for want of a worker. Errors are OpenAI-style ``{"error": {"message", "type", "param",
"code"}}`` bodies with a 4xx/5xx status; a bad request changes nothing else. A client that
disconnects (streaming or not) cancels its request, which aborts it on the workers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import REGISTRY
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from protocol.outputs import TokenLogprob
from protocol.sampling import SamplingParams
from router import request_params
from router.http_io import (
    APIError,
    RequestLimits,
    api_error,
    error_response,
    run_until_disconnect,
    sse,
    stream_response,
)
from router.models import ModelCatalog, ServedModel
from router.openai_schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, sampling_fields
from router.request_flow import RequestFlow
from router.text_generation import ChoiceDelta, Generation, collect, merge
from runtime.metrics import render_metrics
from text.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Served:
    """What the handlers serve from (``app.state.served``)."""

    flow: RequestFlow
    catalog: ModelCatalog


def create_app(flow: RequestFlow, catalog: ModelCatalog, max_body_bytes: int, read_timeout_s: float = 15.0,
               extra_routes: Sequence[tuple[str, Callable]] = ()) -> ASGIApp:
    """The HTTP app behind its request limits (``RequestLimits``); ``extra_routes`` are further GET
    (path, handler) pairs (the dashboard's)."""
    app = FastAPI(title="tandem", description="OpenAI-compatible API of a tandem cluster")
    app.state.served = Served(flow, catalog)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_api_route("/health", health, methods=["GET"], responses=_HEALTH_RESPONSES)
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=_GENERATION_RESPONSES)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=_GENERATION_RESPONSES)
    for path, handler in extra_routes:
        app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)
    return RequestLimits(app, max_body_bytes, read_timeout_s)


# What the OpenAPI schema (/openapi.json) says the generation routes answer: JSON or an SSE stream,
# and every error as an OpenAI-style body (a bad request is 400, never FastAPI's 422: declaring
# "4XX" keeps FastAPI from documenting its own validation error).
_ERROR = {"model": ErrorResponse, "description": "An OpenAI-style error body"}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "The answer, or its SSE stream"},
    "4XX": _ERROR, "5XX": _ERROR}
_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {503: {"description": "The model is not ready (the reason)"}}


def _served(request: Request) -> Served:
    return request.app.state.served


# ---- errors ---------------------------------------------------------------------------------------
async def on_api_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return error_response(e)


async def on_validation_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json"))

    def where(err: Any) -> str:
        return ".".join(str(x) for x in err.get("loc", ()) if x != "body")

    message = "; ".join(f"{where(err)}: {err.get('msg')}" if where(err) else str(err.get("msg")) for err in errors[:5])
    return error_response(APIError(400, message or "invalid request", param=where(first) or None))


async def on_http_error(request: Request, e: Exception) -> JSONResponse:
    """Unknown paths and methods get the OpenAI error shape too."""
    assert isinstance(e, StarletteHTTPException)
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type_,
                                   headers=dict(e.headers or {})))  # a 405's Allow


# ---- service endpoints ----------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    served = _served(request)
    ready = served.catalog.ready()
    model = served.catalog.model
    body = {"status": "ok" if ready else f"not ready: {served.catalog.why_not_ready()}",
            "model": model.name if model else None,
            "decode_workers": len(served.flow.decode.ids()), "prefill_workers": len(served.flow.prefill.ids())}
    return JSONResponse(body, status_code=200 if ready else 503)


async def prometheus(request: Request) -> Response:
    body, content_type = render_metrics(REGISTRY, request.headers.get("accept"))
    return Response(body, media_type=content_type)


async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created, "owned_by": "tandem",
                                        "max_model_len": m.max_model_len} for m in _served(request).catalog.listed()]}


# ---- generation -----------------------------------------------------------------------------------
def _resolve(served: Served, req: CompletionRequest | ChatCompletionRequest) -> ServedModel:
    try:
        model = served.catalog.resolve(req.model)
    except Exception as e:
        raise api_error(e) from None
    field = req.unsupported()
    if field:
        raise APIError(400, f"{field} is not supported by this server", param=field, code="unsupported_parameter")
    return model


def _prepare(model: ServedModel, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
             max_tokens: int | None) -> SamplingParams:
    chat = isinstance(req, ChatCompletionRequest)
    names = {"max_tokens": "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"}
    try:
        return request_params.prepare(model, prompt_ids, sampling_fields(req, max_tokens),
                                      prompt_param="messages" if chat else "prompt", names=names)
    except Exception as e:
        raise api_error(e) from None


async def completions(req: CompletionRequest, request: Request) -> Response:
    served = _served(request)
    model = _resolve(served, req)
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream", param="echo")
    prompts = _prompts(req.prompt, model.tokenizer)
    if len(prompts) * max(req.n, 1) > request_params.MAX_SEQUENCES:
        raise APIError(400, f"a request may ask for at most {request_params.MAX_SEQUENCES} sequences (prompts x n), "
                       f"got {len(prompts)} x {req.n}", param="prompt" if req.n <= 1 else "n")
    gens = [Generation(served.flow, model, ids, _prepare(model, req, ids, req.max_tokens), req.priority)
            for ids in prompts]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model.name}
    if req.stream:
        return await stream_response(request, _completion_events(req, model, gens, head), "completions")
    await run_until_disconnect(request, collect(gens), "completions")
    choices = []
    for g_index, g in enumerate(gens):
        prompt_text = model.tokenizer.decode(g.prompt_ids) if req.echo else ""
        for c in g.choices:
            d = ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason)
            choices.append(_completion_choice(req, model, g_index, d, prompt_text))
    return JSONResponse({**head, "choices": choices, "usage": _usage(gens)})


async def _completion_events(req: CompletionRequest, model: ServedModel, gens: list[Generation],
                             head: dict[str, Any]) -> AsyncIterator[str]:
    async for g_index, d in merge(gens):
        yield sse({**head, "choices": [_completion_choice(req, model, g_index, d)]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": _usage(gens)})


def _completion_choice(req: CompletionRequest, model: ServedModel, g_index: int, d: ChoiceDelta,
                       prompt_text: str = "") -> dict[str, Any]:
    logprobs = _completion_logprobs(model.tokenizer, d.token_ids, d.logprobs) if req.logprobs is not None else None
    return {"index": g_index * req.n + d.index, "text": prompt_text + d.text, "logprobs": logprobs,
            "finish_reason": d.finish_reason}


async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request)
    model = _resolve(served, req)
    try:
        prompt_ids = model.tokenizer.encode_chat(req.rendered_messages(), req.add_generation_prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, model.max_model_len - len(prompt_ids))
    gen = Generation(served.flow, model, prompt_ids, _prepare(model, req, prompt_ids, max_tokens),
                     req.priority)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
    if req.stream:
        return await stream_response(request, _chat_events(req, model, gen, head), "chat")
    await run_until_disconnect(request, collect([gen]), "chat")
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": _chat_logprobs(model.tokenizer, c.token_ids, c.logprobs)} if req.logprobs
                else None, "finish_reason": c.finish_reason} for c in gen.choices]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage([gen])})


async def _chat_events(req: ChatCompletionRequest, model: ServedModel, gen: Generation,
                       head: dict[str, Any]) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk"}
    first = True
    async for _, d in merge([gen]):
        if first:  # the role chunks go out with the first token (errors before it get a status)
            first = False
            for i in range(req.n):
                yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        choice: dict[str, Any] = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                                  "logprobs": None, "finish_reason": d.finish_reason}
        if req.logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(model.tokenizer, d.token_ids, d.logprobs)}
        yield sse({**base, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": _usage([gen])})


# ---- helpers -------------------------------------------------------------------------------------
def _prompts(prompt: Any, tokenizer: TextTokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def _usage(gens: list[Generation]) -> dict[str, Any]:
    prompt = sum(g.usage.num_prompt_tokens for g in gens)
    completion = sum(g.usage.num_completion_tokens for g in gens)
    cached = sum(g.usage.num_cached_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _completion_logprobs(tok: TextTokenizer, ids: list[int], lps: list[TokenLogprob]) -> dict[str, Any]:
    texts = [tok.token_text(t) for t in ids]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{tok.token_text(t): v for t, v in lp.top.items()} for lp in lps],
            "text_offset": offsets}


def _chat_logprobs(tok: TextTokenizer, ids: list[int], lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    out = []
    for t, lp in zip(ids, lps):
        text = tok.token_text(t)
        out.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tok.token_text(a), "logprob": v,
                                      "bytes": list(tok.token_text(a).encode())} for a, v in lp.top.items()]})
    return out
