"""HTTP plumbing of the OpenAI API: OpenAI-style error bodies, the request limits, SSE
streaming, and client disconnects (a client that goes away cancels its request, which aborts it
on the workers and frees its blocks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from router import metrics
from router.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    NoWorkersError,
    OverloadedError,
    RequestError,
    UnknownModelError,
    WorkerFailedError,
)

T = TypeVar("T")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


def api_error(e: BaseException) -> APIError:
    """The HTTP error for a failure of any layer below."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UnknownModelError):
        return APIError(404, str(e), type_="not_found_error", param=e.param, code=e.code)
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e))
    if isinstance(e, ModelNotReadyError):
        return APIError(503, str(e), type_="service_unavailable", code="model_not_ready")
    if isinstance(e, NoWorkersError):
        return APIError(503, str(e), type_="service_unavailable", code="no_workers")
    if isinstance(e, OverloadedError):
        return APIError(429, str(e), type_="rate_limit_error", code=e.code,
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, WorkerFailedError):
        return APIError(502, str(e), type_="upstream_error", code="worker_failed")
    return APIError(500, f"internal error: {e!r}", type_="internal_error")


# Most headers, and most bytes of header names and values, a request may carry (431 past them).
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 << 10


class RequestLimits:
    """What a request may be before the app sees it: at most ``MAX_HEADERS`` headers of
    ``MAX_HEADER_BYTES`` in all (431), a body of at most ``max_bytes`` (413, before it is read
    whole), and a body that arrives within ``read_timeout_s`` of its head (408: a slow-loris body;
    the connection is then closed, its body unread).

    The body is read here and replayed to the app: an error raised while the app itself reads the
    body would be turned into FastAPI's own 400."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            return await error_response(APIError(
                431, f"at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes in all",
                code="request_header_fields_too_large"))(scope, receive, send)
        declared = dict(headers).get(b"content-length")
        too_big = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(too_big)(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                slow = APIError(408, f"the request body did not arrive within {self.read_timeout_s:g} s",
                                code="request_timeout", headers={"Connection": "close"})
                return await error_response(slow)(scope, receive, send)
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
            return await receive()  # after the body: http.disconnect, watched by until_disconnect

        await self.app(scope, replay, send)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
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
            raise api_error(e) from None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def run_until_disconnect(request: Request, work: Awaitable[None], api: str) -> None:
    metrics.INFLIGHT.inc()
    try:
        await until_disconnect(request, work)
        metrics.REQUESTS.labels(api=api, status="200").inc()
    except APIError as e:
        metrics.REQUESTS.labels(api=api, status=str(e.status)).inc()
        raise
    finally:
        metrics.INFLIGHT.dec()


async def stream_response(request: Request, events: AsyncIterator[str], api: str) -> Response:
    """SSE: data chunks then ``[DONE]``. Failures before the first chunk get a real HTTP status;
    later ones become an error event. A disconnect cancels the generator, which aborts upstream."""
    metrics.INFLIGHT.inc()
    try:
        first = await until_disconnect(request, anext(events))
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
            err = api_error(e)
            status = str(err.status)
            yield sse(err.body())
        finally:
            await events.aclose()
            metrics.INFLIGHT.dec()
            metrics.REQUESTS.labels(api=api, status=status).inc()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
