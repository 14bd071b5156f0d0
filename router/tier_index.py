"""What the router knows of one tier's prefix caches. Per tier the router keeps

- the exact :class:`KVIndex`, fed by the workers' KV event streams (``router.kv_events``);
  absent with ``--no-kv-events``;
- an :class:`ApproxKVIndex` of its own decisions: a routed prompt counts as cached on its
  worker for a while. Without events it is the only index (TTL ``kv_index_ttl_s``). With
  events it covers the time between the decision and the events of the blocks being stored
  (a prompt still prefilling has none yet): :data:`PENDING_TTL_S`. A request for the same
  prefix arriving meanwhile then follows the first instead of recomputing it elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from protocol.hashing import prompt_hashes
from router.kv_events import KVEventFeed
from router.kv_index import ApproxKVIndex, KVIndex, merge_overlaps
from runtime.discovery import WorkerInfo
from runtime.internal_grpc import PLAINTEXT, InternalGrpc

log = logging.getLogger("tandem.router")

PENDING_TTL_S = 10.0  # with KV events: how long a routed prompt counts as cached before its events come


class TierIndex:
    """The KV indexes of one tier. Block size: the workers' (from their registration)."""

    def __init__(self, role: str, block_size: int, kv_events: bool, ttl_s: float,
                 internal: InternalGrpc = PLAINTEXT) -> None:
        self.role = role
        self.block_size = block_size
        self.internal = internal
        self.exact = KVIndex(block_size) if kv_events else None
        self.feed = KVEventFeed(self.exact, internal=internal) if self.exact is not None else None
        self.predicted = ApproxKVIndex(block_size, PENDING_TTL_S if kv_events else ttl_s)
        self._known: set[str] = set()

    def adopt(self, workers: Mapping[str, WorkerInfo]) -> TierIndex:
        """This tier's routing for ``workers``: itself, or (while it knows no worker yet) a fresh
        one with the block size the workers registered, when it differs."""
        sizes = {info.block_size for info in workers.values()}
        if self._known or not sizes or self.block_size in sizes:
            return self
        block_size = max(sizes, key=lambda b: sum(info.block_size == b for info in workers.values()))
        log.info("%s tier: block size %d, from the workers' registration", self.role, block_size)
        return TierIndex(self.role, block_size, self.exact is not None, self.predicted.ttl_s, self.internal)

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
