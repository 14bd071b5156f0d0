"""Prometheus metrics of the KV plane, built from ``runtime.metric_catalog``, in the process-wide
default registry.

Bandwidth is ``rate(tandem_kv_transfer_bytes_total) / rate(tandem_kv_transfer_duration_seconds_sum)``;
per-request transfer time and bytes are the two histograms. The side that initiates a transfer (the
puller, or the pusher) records it; ``connects`` counts per-peer set-ups (a NIXL remote agent, a CUDA
IPC mapping, an NCCL pair group), which a timeout must not tear down.
"""

from __future__ import annotations

from runtime import metric_catalog as mc

TRANSFER_BYTES = mc.KV_TRANSFER_BYTES.create()
TRANSFER_BLOCKS = mc.KV_TRANSFER_BLOCKS.create()
TRANSFER_DURATION = mc.KV_TRANSFER_DURATION.create()
TRANSFER_REQUEST_BYTES = mc.KV_TRANSFER_REQUEST_BYTES.create()
TRANSFER_FAILURES = mc.KV_TRANSFER_FAILURES.create()
TRANSFER_CONNECTS = mc.KV_TRANSFER_CONNECTS.create()


def record_connect(transport: str) -> None:
    TRANSFER_CONNECTS.labels(transport).inc()


def record_success(transport: str, num_blocks: int, num_bytes: int, duration_s: float) -> None:
    TRANSFER_BYTES.labels(transport).inc(num_bytes)
    TRANSFER_BLOCKS.labels(transport).inc(num_blocks)
    TRANSFER_DURATION.labels(transport).observe(duration_s)
    TRANSFER_REQUEST_BYTES.labels(transport).observe(num_bytes)


def record_failure(transport: str, reason: str) -> None:
    TRANSFER_FAILURES.labels(transport, reason).inc()
