"""The routers' own accounting of what they have in flight on each worker, and its sharing
between router replicas.

A request counts on a worker from the routing decision on (:class:`Ticket`), so that decisions
taken while its prompt is still on the way see the worker busy. Router replicas share their
accounting through etcd: each publishes its own per worker as a ``RouterInflight`` message under
``/tandem/{ns}/metrics/router_inflight/{router_id}`` (lease-bound) about once a second, and adds
its peers' to its own, so they do not all pick the same best worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from runtime.pb import tandem_control_pb2 as cpb


@dataclass
class Inflight:
    """What the routers have on one worker."""

    num_requests: int = 0
    num_prefill_tokens: int = 0  # prompt tokens it still has to compute (released at the first token)
    num_kv_tokens: int = 0  # KV the requests hold there: prompt plus generated tokens

    def add(self, other: Inflight) -> Inflight:
        return Inflight(self.num_requests + other.num_requests, self.num_prefill_tokens + other.num_prefill_tokens,
                        self.num_kv_tokens + other.num_kv_tokens)


class Ticket:
    """One request's share of a worker's :class:`Inflight` while it runs there (or is bound to)."""

    def __init__(self, worker_id: str, entry: Inflight, prefill_tokens: int, kv_tokens: int) -> None:
        self.worker_id = worker_id
        self.entry = entry
        self.prefill_tokens = prefill_tokens
        self.kv_tokens = kv_tokens
        self.closed = False
        entry.num_requests += 1
        entry.num_prefill_tokens += prefill_tokens
        entry.num_kv_tokens += kv_tokens

    def prefilled(self) -> None:
        """The prompt is computed (the first token came)."""
        self.entry.num_prefill_tokens -= self.prefill_tokens
        self.prefill_tokens = 0

    def grow(self, num_tokens: int) -> None:
        self.entry.num_kv_tokens += num_tokens
        self.kv_tokens += num_tokens

    def close(self) -> None:
        """Give the share back (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        self.entry.num_requests -= 1
        self.entry.num_prefill_tokens -= self.prefill_tokens
        self.entry.num_kv_tokens -= self.kv_tokens
        self.prefill_tokens = self.kv_tokens = 0


def inflight_to_pb(router_id: str, tiers: Mapping[str, Mapping[str, Inflight]]) -> cpb.RouterInflight:
    """A router's accounting (role -> worker -> load) as its etcd value; idle workers are left out."""
    msg = cpb.RouterInflight(router_id=router_id)
    for role, workers in tiers.items():
        tier = msg.tiers[role]
        for worker_id, e in workers.items():
            if e.num_requests:
                tier.workers[worker_id].CopyFrom(cpb.Inflight(num_requests=e.num_requests,
                                                              num_prefill_tokens=e.num_prefill_tokens,
                                                              num_kv_tokens=e.num_kv_tokens))
    return msg


def sum_peers(published: Mapping[str, cpb.RouterInflight], own_id: str) -> dict[str, dict[str, Inflight]]:
    """role -> worker -> the in-flight load every other router replica published."""
    out: dict[str, dict[str, Inflight]] = {}
    for router_id, pub in published.items():
        if router_id == own_id:
            continue
        for role, tier in pub.tiers.items():
            sums = out.setdefault(role, {})
            for worker_id, m in tier.workers.items():
                entry = Inflight(m.num_requests, m.num_prefill_tokens, m.num_kv_tokens)
                sums[worker_id] = sums[worker_id].add(entry) if worker_id in sums else entry
    return out
