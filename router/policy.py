"""Routing decisions as pure functions: no I/O, unit-tested without a cluster.

For now a worker's load is what this router knows of it: its in-flight requests and the prompt
tokens it still has to prefill for us, topped up by the worker's own published queue. The
KV-aware cost of DESIGN.md ("Routing cost") plugs in here with the KV index.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    num_inflight: int = 0  # requests this router has on the worker
    num_inflight_prefill_tokens: int = 0  # prompt tokens of those not yet prefilled
    num_queued_prefill_tokens: int = 0  # the worker's own report (all routers)
    num_running: int = 0  # the worker's own report
    kv_usage: float = 0.0


def least_loaded(loads: Sequence[WorkerLoad], rng: random.Random | None = None) -> str | None:
    """The worker with the fewest in-flight requests (then fewest queued prefill tokens, then the
    lowest KV usage); ties broken at random. None when there is no worker."""
    if not loads:
        return None

    def key(w: WorkerLoad) -> tuple[int, int, float]:
        return (max(w.num_inflight, w.num_running),
                max(w.num_inflight_prefill_tokens, w.num_queued_prefill_tokens), w.kv_usage)

    best = min(key(w) for w in loads)
    tied = [w.worker_id for w in loads if key(w) == best]
    return (rng or random).choice(tied) if len(tied) > 1 else tied[0]


def prefill_saturated(loads: Sequence[WorkerLoad], queue_limit_tokens: int) -> bool:
    """The prefill tier is saturated when every worker has more than ``queue_limit_tokens``
    prompt tokens queued: a remote prefill would wait longer than a local one."""
    return not loads or all(
        max(w.num_inflight_prefill_tokens, w.num_queued_prefill_tokens) > queue_limit_tokens for w in loads)


def prefill_remotely(num_new_tokens: int, max_local_prefill_tokens: int, saturated: bool, n: int = 1) -> bool:
    """DESIGN.md step 2: prefill on the prefill tier only if the tokens the decode worker would
    still compute exceed ``max_local_prefill_tokens`` and the prefill tier is not saturated.
    n > 1 requests prefill where they decode (their sequences share the prompt's blocks)."""
    return n == 1 and not saturated and num_new_tokens > max_local_prefill_tokens


def loads_of(worker_ids: Sequence[str], inflight: Mapping[str, tuple[int, int]],
             reported: Mapping[str, Mapping[str, float]]) -> list[WorkerLoad]:
    """Combine this router's in-flight accounting with the workers' published metrics."""
    out = []
    for wid in worker_ids:
        n, tokens = inflight.get(wid, (0, 0))
        rep = reported.get(wid, {})
        out.append(WorkerLoad(wid, n, tokens, int(rep.get("num_queued_prefill_tokens", 0)),
                              int(rep.get("num_running", 0)), float(rep.get("kv_usage", 0.0))))
    return out
