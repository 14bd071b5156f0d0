"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (SSE streaming or not), ``/health`` and ``/metrics``.

Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` bodies with a
4xx/5xx status; a bad request changes nothing else. A client that disconnects (streaming or
not) cancels its request, which aborts it on the workers and frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.request import TokenLogprob
from engine.tokenizer import TextTokenizer
from router import metrics
from router.core import InvalidRequestError, NoWorkersError, RouterCore, WorkerFailedError
from router.generation import ChoiceDelta, Generation
from router.schemas import ChatCompletionRequest, CompletionRequest, to_sampling
from runtime.metrics import render_metrics

T = TypeVar("T")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    created: int


class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413 before they are read whole.

    The body is read here (at most ``max_bytes`` of it) and replayed to the app: an error
    raised while the app itself reads the body would be turned into FastAPI's own 400."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(too_big)(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await error_response(too_big)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()  # after the body: http.disconnect, watched by _until_disconnect

        await self.app(scope, replay, send)


def create_app(core: RouterCore, tokenizer: TextTokenizer, model: ServedModel, max_body_bytes: int) -> ASGIApp:
    app = FastAPI(title="tandem", description="OpenAI-compatible API of a tandem cluster")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json"))

        def where(err: Any) -> str:
            return ".".join(str(x) for x in err.get("loc", ()) if x != "body")

        message = "; ".join(f"{where(err)}: {err.get('msg')}" if where(err) else str(err.get("msg"))
                            for err in errors[:5])
        return error_response(APIError(400, message or "invalid request", param=where(first) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown paths and methods get the OpenAI error shape too."""
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type_))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = core.ready()
        body = {"status": "ok" if ready else "no decode worker",
                "decode_workers": len(core.decode.ids()), "prefill_workers": len(core.prefill.ids())}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        body, content_type = render_metrics(REGISTRY, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": model.created,
                                            "owned_by": "tandem", "max_model_len": model.max_model_len}]}

    def check_common(req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model != model.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model.name!r}",
                           type_="not_found_error", param="model", code="model_not_found")
        field = req.unsupported()
        if field:
            raise APIError(400, f"{field} is not supported by this server", param=field, code="unsupported_parameter")

    def prepare(req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_tokens: int | None):
        chat = isinstance(req, ChatCompletionRequest)
        prompt_param = "messages" if chat else "prompt"
        max_tokens_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param=prompt_param)
        try:
            sampling = to_sampling(req, max_tokens)
        except ValueError as e:  # the engine's message starts with the field's name
            name = str(e).split(" ", 1)[0]
            param = max_tokens_param if name == "max_tokens" else (name if name in type(req).model_fields else None)
            raise APIError(400, str(e), param=param) from None
        total = len(prompt_ids) + (max_tokens or 1)
        if len(prompt_ids) >= model.max_model_len or total > model.max_model_len:
            raise APIError(400, f"this model's maximum context length is {model.max_model_len} tokens; "
                                f"the request needs {total} ({len(prompt_ids)} in the prompt, "
                                f"{max_tokens or 1} to generate)",
                           param=prompt_param if len(prompt_ids) >= model.max_model_len else max_tokens_param,
                           code="context_length_exceeded")
        return sampling

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_common(req)
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        prompts = _prompts(req.prompt, tokenizer)
        gens = []
        for ids in prompts:
            sampling = prepare(req, ids, req.max_tokens)
            gens.append(Generation(core, tokenizer, ids, sampling, req.priority))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n = req.n

        def choice_json(g_index: int, d: ChoiceDelta, prompt_text: str = "") -> dict[str, Any]:
            return {"index": g_index * n + d.index, "text": prompt_text + d.text,
                    "logprobs": _completion_logprobs(tokenizer, d.token_ids, d.logprobs) if req.logprobs is not None
                    else None, "finish_reason": d.finish_reason}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                async for g_index, d in _merge(gens):
                    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                             "choices": [choice_json(g_index, d)]}
                    yield _sse(chunk)
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                                "choices": [], "usage": _usage(gens)})
            return await _stream_response(request, events(), "completions")

        await _run_until_disconnect(request, _collect(gens), "completions")
        choices = []
        for g_index, g in enumerate(gens):
            prompt_text = tokenizer.decode(g.prompt_ids) if req.echo else ""
            for c in g.choices:
                d = ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason)
                choices.append(choice_json(g_index, d, prompt_text))
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                             "choices": choices, "usage": _usage(gens)})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check_common(req)
        try:
            prompt_ids = tokenizer.encode_chat(req.rendered_messages(), req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, model.max_model_len - len(prompt_ids))
        gen = Generation(core, tokenizer, prompt_ids, prepare(req, prompt_ids, max_tokens), req.priority)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                first = True
                async for _, d in _merge([gen]):
                    if first:  # the role chunks go out with the first token (errors before it get a status)
                        first = False
                        for i in range(req.n):
                            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                             "logprobs": None, "finish_reason": None}]})
                    choice: dict[str, Any] = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                                              "logprobs": None, "finish_reason": d.finish_reason}
                    if req.logprobs:
                        choice["logprobs"] = {"content": _chat_logprobs(tokenizer, d.token_ids, d.logprobs)}
                    yield _sse({**base, "choices": [choice]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage([gen])})
            return await _stream_response(request, events(), "chat")

        await _run_until_disconnect(request, _collect([gen]), "chat")
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": _chat_logprobs(tokenizer, c.token_ids, c.logprobs)} if req.logprobs
                    else None, "finish_reason": c.finish_reason} for c in gen.choices]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model.name,
                             "choices": choices, "usage": _usage([gen])})

    return BodyLimit(app, max_body_bytes)


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


async def _merge(gens: list[Generation]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Interleave several generations' deltas as they come; failures are raised."""
    if len(gens) == 1:
        async for d in gens[0].stream():
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for d in g.stream():
                await queue.put((i, d))
        except BaseException as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(gens: list[Generation]) -> None:
    async for _ in _merge(gens):
        pass


def _map_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e))
    if isinstance(e, NoWorkersError):
        return APIError(503, str(e), type_="service_unavailable", code="no_workers")
    if isinstance(e, WorkerFailedError):
        return APIError(502, str(e), type_="upstream_error", code="worker_failed")
    return APIError(500, f"internal error: {e!r}", type_="internal_error")


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (which aborts it upstream) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected", code="client_disconnected")
        try:
            return task.result()
        except Exception as e:
            raise _map_error(e) from None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _run_until_disconnect(request: Request, work: Awaitable[None], api: str) -> None:
    metrics.INFLIGHT.inc()
    try:
        await _until_disconnect(request, work)
        metrics.REQUESTS.labels(api=api, status="200").inc()
    except APIError as e:
        metrics.REQUESTS.labels(api=api, status=str(e.status)).inc()
        raise
    finally:
        metrics.INFLIGHT.dec()


async def _stream_response(request: Request, events: AsyncIterator[str], api: str) -> Response:
    """SSE: data chunks then ``[DONE]``. Failures before the first chunk get a real HTTP status;
    later ones become an error event. A disconnect cancels the generator, which aborts upstream."""
    metrics.INFLIGHT.inc()
    try:
        first = await _until_disconnect(request, anext(events))
    except StopAsyncIteration:
        first = None
    except APIError as e:
        metrics.INFLIGHT.dec()
        metrics.REQUESTS.labels(api=api, status=str(e.status)).inc()
        await events.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        status = "200"
        try:
            if first is not None:
                yield first
                async for chunk in events:
                    yield chunk
        except asyncio.CancelledError:
            status = "disconnected"
            raise
        except Exception as e:
            err = _map_error(e)
            status = str(err.status)
            yield _sse(err.body())
        finally:
            await events.aclose()
            metrics.INFLIGHT.dec()
            metrics.REQUESTS.labels(api=api, status=status).inc()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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

