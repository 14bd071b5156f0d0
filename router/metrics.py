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
# KV-aware routing
DECISION_SECONDS = Histogram("tandem_router_decision_seconds",
                             "Routing decision time: prompt hashing, KV index lookups and worker choice (no I/O)",
                             buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2))
KV_OVERLAP_BLOCKS = Histogram("tandem_router_kv_overlap_blocks",
                              "Per request: leading prompt blocks the chosen worker holds (per the KV index)", ["role"],
                              buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
KV_INDEXED_BLOCKS = Gauge("tandem_router_kv_indexed_blocks", "(worker, block) pairs in the KV index", ["role"])
PREFIX_HIT_RATE = Gauge("tandem_router_prefix_hit_rate",
                        "Fraction of a worker's prompt tokens served from its prefix cache since it started "
                        "(from its published metrics)", ["role", "worker"])
