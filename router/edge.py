"""The router's listeners as clients meet them: API keys (``router.auth``) and TLS on the OpenAI
HTTP server and the KServe gRPC server, and the HTTP server's limits on slow or oversized request
heads (``GuardedH11Protocol``; the app's own limits on headers and bodies are
``router.http_io.RequestLimits``). ``router.server`` builds both servers through here."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import grpc
import h11
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from router.auth import Auth, GrpcAuth, HTTPAuth
from runtime.settings import ClusterConfig


def make_auth(cfg: ClusterConfig) -> Auth:
    return Auth(cfg.api_keys, cfg.public_paths, cfg.rate_limit_rpm, cfg.rate_limit_tpm)


def http_app(app: ASGIApp, auth: Auth) -> ASGIApp:
    """The HTTP app behind the key check (outermost: an unauthenticated body is never read)."""
    return HTTPAuth(app, auth) if auth.enabled else app


# The most bytes of a request's head (request line and headers) h11 buffers before it has the whole
# head: past it the client gets 400 and is closed. A head that arrives whole in one read is
# parsed and then judged by RequestLimits (431 past MAX_HEADER_BYTES).
MAX_HEAD_BYTES = 32 << 10


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head: a connection that has
    not delivered a whole head within ``head_timeout_s`` of opening, or of the head's first byte
    on a kept-alive connection (a slow-loris: a header line now and then, or nothing at all), is
    answered 408 and closed. Other connections never wait for it: each is its own protocol on the
    event loop."""

    head_timeout_s = 15.0  # a subclass per server sets it (guarded_protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_deadline: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s,
                                                                               self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.conn.their_state is h11.IDLE:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the request is the app's now
            self._cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()


def uvicorn_args(cfg: ClusterConfig) -> dict[str, Any]:
    """uvicorn.Config arguments of the router's HTTP server: its protocol (the head's deadline
    and size) and TLS."""
    protocol = type("GuardedH11", (GuardedH11Protocol,), {"head_timeout_s": cfg.http_read_timeout_s})
    return {"http": protocol, "h11_max_incomplete_event_size": MAX_HEAD_BYTES, **uvicorn_tls(cfg)}


def uvicorn_tls(cfg: ClusterConfig) -> dict[str, Any]:
    """uvicorn.Config arguments serving HTTPS when the router has a certificate (and asking
    clients for theirs when ``tls_client_ca_file`` is set)."""
    if cfg.tls_cert_file is None:
        return {}
    args: dict[str, Any] = {"ssl_certfile": cfg.tls_cert_file, "ssl_keyfile": cfg.tls_key_file}
    if cfg.tls_client_ca_file is not None:
        args.update(ssl_ca_certs=cfg.tls_client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return args


def http_scheme(cfg: ClusterConfig) -> str:
    return "https" if cfg.tls_cert_file is not None else "http"


def grpc_server(auth: Auth) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[GrpcAuth(auth)] if auth.enabled else None)


def add_grpc_port(server: grpc.aio.Server, cfg: ClusterConfig) -> int:
    """Bind the KServe port, over TLS when the router has a certificate; 0 if it cannot bind."""
    address = f"{cfg.host}:{cfg.grpc_port}"
    if cfg.tls_cert_file is None:
        return server.add_insecure_port(address)
    assert cfg.tls_key_file is not None
    pair = (Path(cfg.tls_key_file).read_bytes(), Path(cfg.tls_cert_file).read_bytes())
    client_ca = Path(cfg.tls_client_ca_file).read_bytes() if cfg.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    return server.add_secure_port(address, credentials)
