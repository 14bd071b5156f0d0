"""API keys and per-key rate limits at the router's edge.

With ``api_keys`` configured, every HTTP request but those to ``public_paths`` (by default
``/health``, ``/metrics``, ``/metrics/targets`` and the dashboard's two paths) must carry
``Authorization: Bearer <key>``, and every KServe gRPC call but liveness, readiness and gRPC
health must carry ``authorization`` metadata of the same form (a bare key is taken too).
A missing or unknown key is 401 ``invalid_api_key`` / UNAUTHENTICATED, before the body is read;
nothing reaches a worker.

Per key, ``rate_limit_rpm`` requests and ``rate_limit_tpm`` tokens (prompt plus generated) over
the last 60 s. A key over either limit gets 429 ``rate_limited`` with ``Retry-After`` /
RESOURCE_EXHAUSTED with ``retry-after`` metadata. Tokens are charged as the request flow
admits a prompt and streams tokens (:func:`charge_tokens`, which finds the key through a context
variable the edge sets), so a long answer counts against the requests after it.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import OverloadedError

# The router's health, its metrics and their discovery, the dashboard (``ClusterConfig.public_paths``).
PUBLIC_PATHS = ("/health", "/metrics", "/metrics/targets", "/dashboard", "/dashboard/data")

_WINDOW_S = 60.0
# gRPC methods answered without a key: probes that say nothing about the model or its data.
PUBLIC_GRPC_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
})


class UnauthenticatedError(Exception):
    """No key, or not one of the configured keys."""


@dataclass
class KeyUsage:
    """One key's requests and tokens over the last minute."""

    key_id: str  # a digest prefix: what logs may show of a key
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    num_tokens: int = 0

    def charge(self, num_tokens: int, now: float | None = None) -> None:
        if num_tokens > 0:
            self.tokens.append((time.monotonic() if now is None else now, num_tokens))
            self.num_tokens += num_tokens

    def _forget(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - _WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - _WINDOW_S:
            self.num_tokens -= self.tokens.popleft()[1]


CURRENT: contextvars.ContextVar[KeyUsage | None] = contextvars.ContextVar("tandem_api_key", default=None)


def charge_tokens(num_tokens: int) -> None:
    """Count tokens against the key of the request being served (none: no keys configured)."""
    usage = CURRENT.get()
    if usage is not None:
        usage.charge(num_tokens)


class Auth:
    """The configured keys and their usage. ``enabled`` is False when no key is configured."""

    def __init__(self, keys: Sequence[str], public_paths: Sequence[str] = PUBLIC_PATHS,
                 rate_limit_rpm: int = 0, rate_limit_tpm: int = 0) -> None:
        self._keys = [(k.encode(), KeyUsage(hashlib.sha256(k.encode()).hexdigest()[:8])) for k in keys]
        self.public_paths = frozenset(public_paths)
        self.rpm, self.tpm = rate_limit_rpm, rate_limit_tpm

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None, now: float | None = None) -> KeyUsage:
        """The key's usage, with this request counted; UnauthenticatedError for a missing or
        unknown key, OverloadedError(code ``rate_limited``) over a limit."""
        usage = self._find(authorization)
        now = time.monotonic() if now is None else now
        usage._forget(now)
        if self.rpm and len(usage.requests) >= self.rpm:
            raise OverloadedError(f"this API key made {len(usage.requests)} requests in the last minute "
                                  f"(limit {self.rpm})", _until(usage.requests[0], now), code="rate_limited")
        if self.tpm and usage.num_tokens >= self.tpm:
            raise OverloadedError(f"this API key used {usage.num_tokens} tokens in the last minute "
                                  f"(limit {self.tpm})", _until(usage.tokens[0][0], now), code="rate_limited")
        usage.requests.append(now)
        return usage

    def _find(self, authorization: str | None) -> KeyUsage:
        if not authorization:
            raise UnauthenticatedError("this server needs an API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        candidate = (token.strip() if scheme.lower() == "bearer" else authorization.strip()).encode()
        found = None
        for key, usage in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(key, candidate):
                found = usage
        if found is None:
            raise UnauthenticatedError("invalid API key")
        return found


def _until(oldest: float, now: float) -> int:
    return max(1, math.ceil(oldest + _WINDOW_S - now))


# ---- HTTP ---------------------------------------------------------------------------------------
class HTTPAuth:
    """ASGI middleware: keys on every path but the public ones, before anything reads the body."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.enabled or scope.get("path") in self.auth.public_paths:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        try:
            usage = self.auth.check(header.decode("latin-1") if header is not None else None)
        except UnauthenticatedError as e:
            return await _send_error(send, 401, str(e), "invalid_request_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        except OverloadedError as e:
            return await _send_error(send, 429, str(e), "rate_limit_error", e.code,
                                     [(b"retry-after", str(e.retry_after_s).encode())])
        token = CURRENT.set(usage)
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT.reset(token)


async def _send_error(send: Send, status: int, message: str, type_: str, code: str,
                      headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


# ---- gRPC ---------------------------------------------------------------------------------------
class GrpcAuth(grpc.aio.ServerInterceptor):
    """Keys on every gRPC method but :data:`PUBLIC_GRPC_METHODS`: a call without a valid key ends
    UNAUTHENTICATED, one over its key's rate RESOURCE_EXHAUSTED (``retry-after`` metadata)."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not self.auth.enabled or details.method in PUBLIC_GRPC_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            usage = self.auth.check(metadata.get("authorization"))
        except UnauthenticatedError as e:
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, str(e), ())
        except OverloadedError as e:
            return _denied(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                           (("retry-after", str(e.retry_after_s)),))
        return _as_key(handler, usage)


def _replace(handler: Any, **behaviors: Any) -> Any:
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None)
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behaviors[kind], request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _denied(handler: Any, code: grpc.StatusCode, message: str, trailing: tuple) -> Any:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message, trailing_metadata=trailing)

    return _replace(handler, unary_unary=deny, unary_stream=deny, stream_unary=deny, stream_stream=deny)


def _as_key(handler: Any, usage: KeyUsage) -> Any:
    """The handler, run with ``usage`` as the current key (its tokens are charged to it)."""
    if handler.unary_unary is not None or handler.stream_unary is not None:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            CURRENT.set(usage)
            return await inner(request, context)

        return _replace(handler, unary_unary=unary, stream_unary=unary)
    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        CURRENT.set(usage)
        async for response in inner_stream(request, context):
            yield response

    return _replace(handler, unary_stream=streaming, stream_stream=streaming)
