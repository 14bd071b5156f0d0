"""A worker answers a request it cannot parse with INVALID_ARGUMENT (gRPC's own answer is
UNKNOWN, an exception inside the server): bytes that are not the RPC's message are the caller's
error, like every other malformed field (``decode_worker.wire``, ``runtime.convert``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Unparsable request bytes end the call INVALID_ARGUMENT before the servicer sees them."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or \
                handler.stream_unary is not None or handler.stream_stream is not None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except (DecodeError, ValueError) as e:
                return _Malformed(e)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserialize,
                                                       response_serializer=handler.response_serializer)
        inner_stream = handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(streaming, request_deserializer=deserialize,
                                                    response_serializer=handler.response_serializer)
