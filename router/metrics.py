"""The router's Prometheus metrics (request-level latency, routing, failures)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUESTS = Counter("tandem_router_requests_total", "Requests finished, by API and outcome", ["api", "status"])
INFLIGHT = Gauge("tandem_router_inflight_requests", "Requests being served")
TTFT = Histogram("tandem_router_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS)
ITL = Histogram("tandem_router_inter_token_latency_seconds", "Time between streamed tokens",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
E2E = Histogram("tandem_router_request_duration_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("tandem_router_prompt_tokens_total", "Prompt tokens of served requests")
COMPLETION_TOKENS = Counter("tandem_router_completion_tokens_total", "Generated tokens of served requests")
ROUTE_DECISIONS = Counter("tandem_router_route_decisions_total", "Where prompts were prefilled", ["path"])
WORKERS = Gauge("tandem_router_workers", "Workers registered in etcd (a dead one leaves within the lease TTL)",
                ["role"])
WORKER_FAILURES = Counter("tandem_router_worker_failures_total", "Worker calls that failed", ["role"])
