"""Why the router could not serve a request, independent of the client protocol. The OpenAI
API turns these into HTTP statuses with OpenAI-style bodies, the KServe API into gRPC codes."""

from __future__ import annotations


class RequestError(ValueError):
    """The request is bad (HTTP 400 / INVALID_ARGUMENT); ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class UnknownModelError(RequestError):
    """The request names a model this router does not serve (HTTP 404 / NOT_FOUND)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


class ModelNotReadyError(RuntimeError):
    """No worker has registered a model yet, or its tokenizer is still loading (HTTP 503)."""


class NoWorkersError(RuntimeError):
    """No worker of a needed tier is registered (HTTP 503)."""


class WorkerFailedError(RuntimeError):
    """A worker died or failed while serving the request (HTTP 502 / stream error)."""


class InvalidRequestError(ValueError):
    """A worker rejected the request's parameters (HTTP 400)."""


class OverloadedError(RuntimeError):
    """The router will not take the request now (HTTP 429 with ``Retry-After`` / RESOURCE_EXHAUSTED
    with ``retry-after`` metadata): a tier's queue is full (``code`` ``overloaded``) or the API key
    spent its rate (``rate_limited``). Nothing was sent to a worker."""

    def __init__(self, message: str, retry_after_s: int, code: str = "overloaded") -> None:
        super().__init__(message)
        self.retry_after_s, self.code = max(1, int(retry_after_s)), code
