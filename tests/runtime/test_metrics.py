"""Prometheus helpers: registry, /metrics server thread, exposition bytes."""

from __future__ import annotations

import urllib.request

from prometheus_client import Counter, Histogram

from runtime.metrics import LATENCY_BUCKETS_S, new_registry, process_registry, render_metrics, serve_metrics


def test_process_registry_is_one_per_process() -> None:
    assert process_registry() is process_registry()
    body, content_type = render_metrics(process_registry())
    assert b"process_cpu_seconds_total" in body or b"python_info" in body
    assert content_type.startswith("text/plain")


def test_render_and_serve() -> None:
    registry = new_registry(process_collectors=False)
    requests = Counter("tandem_test_requests", "requests", ["tier"], registry=registry)
    ttft = Histogram("tandem_test_ttft_seconds", "ttft", buckets=LATENCY_BUCKETS_S, registry=registry)
    requests.labels(tier="prefill").inc(3)
    ttft.observe(0.02)

    body, _ = render_metrics(registry)
    assert b'tandem_test_requests_total{tier="prefill"} 3.0' in body
    assert b"python_info" not in body
    body, content_type = render_metrics(registry, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")

    server = serve_metrics(registry, port=0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            scraped = resp.read()
        assert b'tandem_test_requests_total{tier="prefill"} 3.0' in scraped
        assert b"tandem_test_ttft_seconds_bucket" in scraped
    finally:
        server.stop()
