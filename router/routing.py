"""One tier's routing state: what the router knows of its workers' prefix caches, and the
in-flight load router replicas share.

Per tier the router keeps

- the exact :class:`KVIndex`, fed by the workers' KV event streams (``router.kv_events``);
  absent with ``--no-kv-events``;
- an :class:`ApproxKVIndex` of its own decisions: a routed prompt counts as cached on its
  worker for a while. Without events it is the only index (TTL ``kv_index_ttl_s``). With
  events it covers the time between the decision and the events of the blocks being stored
  (a prompt still prefilling has none yet): :data:`PENDING_TTL_S`. A request for the same
  prefix arriving meanwhile then follows the first instead of recomputing it elsewhere.

Router replicas share load through etcd: each publishes its in-flight accounting per worker
under ``/tandem/{ns}/metrics/router_inflight/{router_id}`` (lease-bound) about once a second,
and adds its peers' to its own, so they do not all pick the same best worker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router.kv_events import KVEventFeed
from router.kv_index import ApproxKVIndex, KVIndex, merge_overlaps, prompt_hashes
from runtime.etcd import WorkerInfo

log = logging.getLogger("tandem.router")

PENDING_TTL_S = 10.0  # with KV events: how long a routed prompt counts as cached before its events come
INFLIGHT_ROLE = "router_inflight"  # the metrics "role" router replicas publish their in-flight load under


@dataclass
class Inflight:
    """What the routers have on one worker."""

    num_requests: int = 0
    num_prefill_tokens: int = 0  # prompt tokens it still has to compute (released at the first token)
    num_kv_tokens: int = 0  # KV the requests hold there: prompt plus generated tokens

    def add(self, other: Inflight) -> Inflight:
        return Inflight(self.num_requests + other.num_requests, self.num_prefill_tokens + other.num_prefill_tokens,
                        self.num_kv_tokens + other.num_kv_tokens)

    def as_tuple(self) -> tuple[int, int, int]:
        return self.num_requests, self.num_prefill_tokens, self.num_kv_tokens


@dataclass(frozen=True)
class RouterInflight:
    """A router replica's published in-flight load: role -> worker -> (requests, prefill tokens, KV tokens)."""

    router_id: str
    workers: dict[str, dict[str, list[int]]] = field(default_factory=dict)


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


class TierRouting:
    """The KV indexes of one tier. Block size: the workers' (from their registration)."""

    def __init__(self, role: str, block_size: int, kv_events: bool, ttl_s: float) -> None:
        self.role = role
        self.block_size = block_size
        self.exact = KVIndex(block_size) if kv_events else None
        self.feed = KVEventFeed(self.exact) if self.exact is not None else None
        self.predicted = ApproxKVIndex(block_size, PENDING_TTL_S if kv_events else ttl_s)
        self._known: set[str] = set()

    def adopt(self, workers: Mapping[str, WorkerInfo]) -> TierRouting:
        """This tier's routing for ``workers``: itself, or (while it knows no worker yet) a fresh
        one with the block size the workers registered, when it differs."""
        sizes = {info.block_size for info in workers.values()}
        if self._known or not sizes or self.block_size in sizes:
            return self
        block_size = max(sizes, key=lambda b: sum(info.block_size == b for info in workers.values()))
        log.info("%s tier: block size %d, from the workers' registration", self.role, block_size)
        return TierRouting(self.role, block_size, self.exact is not None, self.predicted.ttl_s)

    def sync(self, workers: Mapping[str, WorkerInfo]) -> None:
        """Follow discovery: subscribe to new workers' events, forget the ones gone."""
        for worker_id in self._known - set(workers):
            self.predicted.remove_worker(worker_id)
        self._known = set(workers)
        if self.feed is not None:
            self.feed.sync(workers)

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()

    def hashes(self, prompt_ids: Sequence[int]) -> list[int]:
        return prompt_hashes(prompt_ids, self.block_size)

    def overlaps(self, hashes: Sequence[int]) -> dict[str, int]:
        predicted = self.predicted.overlaps(hashes)
        if self.exact is None:
            return predicted
        return merge_overlaps(self.exact.overlaps(hashes), predicted)

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        """The router sent a prompt with ``hashes`` to ``worker_id``."""
        if hashes:
            self.predicted.record(worker_id, hashes)

    @property
    def num_indexed_blocks(self) -> int:
        return self.exact.num_blocks if self.exact is not None else self.predicted.num_blocks


def sum_peers(published: Mapping[str, RouterInflight], own_id: str) -> dict[str, dict[str, Inflight]]:
    """role -> worker -> the in-flight load every other router replica published."""
    out: dict[str, dict[str, Inflight]] = {}
    for router_id, pub in published.items():
        if router_id == own_id:
            continue
        for role, workers in pub.workers.items():
            tier = out.setdefault(role, {})
            for worker_id, values in workers.items():
                entry = Inflight(*(int(v) for v in values[:3]))
                tier[worker_id] = tier[worker_id].add(entry) if worker_id in tier else entry
    return out
