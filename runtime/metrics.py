"""Prometheus helpers: a per-process registry, a /metrics server thread, exposition bytes.

Every tandem process registers its metrics in `process_registry()` (not prometheus_client's
global REGISTRY, which libraries also write to) and either serves it with `serve_metrics`
on 127.0.0.1, or returns `render_metrics(...)` from its own HTTP server's /metrics route.

    from prometheus_client import Counter
    REQUESTS = Counter("tandem_requests", "requests seen", registry=process_registry())
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder

# Latency buckets (seconds) from sub-millisecond ITLs to minute-long requests.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip

_lock = threading.Lock()
_registry: CollectorRegistry | None = None
_registry_pid = 0


def new_registry(*, process_collectors: bool = True) -> CollectorRegistry:
    """A fresh registry, with process (CPU, memory, fds), platform and GC collectors if asked."""
    registry = CollectorRegistry(auto_describe=True)
    if process_collectors:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def process_registry() -> CollectorRegistry:
    """This process's registry, created on first use (and anew in a forked child)."""
    global _registry, _registry_pid
    with _lock:
        if _registry is None or _registry_pid != os.getpid():
            _registry = new_registry()
            _registry_pid = os.getpid()
        return _registry


def render_metrics(registry: CollectorRegistry | None = None, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of `registry` as `(body, content_type)`, for an existing /metrics route.

    `accept` is the request's Accept header: OpenMetrics if the scraper asks for it, else text.
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry or process_registry()), content_type


@dataclass
class MetricsServer:
    """A /metrics HTTP server on a daemon thread; `stop()` closes it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def serve_metrics(
    registry: CollectorRegistry | None = None, port: int = 0, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve `registry` (default: `process_registry()`) on http://host:port/metrics in a thread.

    `port=0` picks a free port; read it back from the result's `port`.
    """
    server, thread = start_http_server(port, addr=host, registry=registry or process_registry())
    return MetricsServer(host=host, port=int(server.server_port), _server=server, _thread=thread)
