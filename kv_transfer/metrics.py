"""Prometheus metrics of the KV plane, in the process-wide default registry.

Bandwidth is ``rate(tandem_kv_transfer_bytes_total) / rate(tandem_kv_transfer_duration_seconds_sum)``;
per-request transfer time is the histogram itself. The side that initiates a transfer (the puller,
or the pusher) records it; ``connects`` counts per-peer set-ups (a NIXL remote agent, a CUDA IPC
mapping, an NCCL pair group), which a timeout must not tear down.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TRANSFER_BYTES = Counter(
    "tandem_kv_transfer_bytes",
    "KV cache bytes moved to or from peers (counted by the initiating side).",
    ["transport"],
)
TRANSFER_BLOCKS = Counter(
    "tandem_kv_transfer_blocks",
    "KV cache blocks moved to or from peers (counted by the initiating side).",
    ["transport"],
)
TRANSFER_DURATION = Histogram(
    "tandem_kv_transfer_duration_seconds",
    "Wall time of one successful pull or push (one request's blocks), from request to completion.",
    ["transport"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TRANSFER_FAILURES = Counter(
    "tandem_kv_transfer_failures",
    "Transfers that raised TransferError; reason is timeout, peer, layout or closed.",
    ["transport", "reason"],
)

TRANSFER_CONNECTS = Counter(
    "tandem_kv_transfer_connects",
    "Per-peer set-ups: a NIXL remote agent loaded, a CUDA IPC handle mapped, an NCCL pair group built.",
    ["transport"],
)


def record_connect(transport: str) -> None:
    TRANSFER_CONNECTS.labels(transport).inc()


def record_success(transport: str, num_blocks: int, num_bytes: int, duration_s: float) -> None:
    TRANSFER_BYTES.labels(transport).inc(num_bytes)
    TRANSFER_BLOCKS.labels(transport).inc(num_blocks)
    TRANSFER_DURATION.labels(transport).observe(duration_s)


def record_failure(transport: str, reason: str) -> None:
    TRANSFER_FAILURES.labels(transport, reason).inc()
