"""The router's listeners as clients meet them: API keys (``router.auth``) and TLS on the OpenAI
HTTP server and the KServe gRPC server. ``router.server`` builds both through here."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc
from starlette.types import ASGIApp

from router.auth import Auth, GrpcAuth, HTTPAuth
from runtime.settings import ClusterConfig


def make_auth(cfg: ClusterConfig) -> Auth:
    return Auth(cfg.api_keys, cfg.public_paths, cfg.rate_limit_rpm, cfg.rate_limit_tpm)


def http_app(app: ASGIApp, auth: Auth) -> ASGIApp:
    """The HTTP app behind the key check (outermost: an unauthenticated body is never read)."""
    return HTTPAuth(app, auth) if auth.enabled else app


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
