"""What the router knows of one tier's prefix caches. Per tier the router keeps

- the exact :class:`KVIndex`, fed by the workers' KV event streams (``router.kv_events``);
  absent with ``--no-kv-events``;
- the prompts on their way into a worker's cache (:class:`Landing`, in an
  :class:`InFlightKVIndex`): routed there and not yet computed there, or handed off and not yet
  landed there. A routed prompt is in flight from the routing decision until the worker answers
  with its first output (it then holds the prompt), or the request fails there;
- an :class:`ApproxKVIndex` of the prompts that arrived: a landed prompt counts as cached on its
  worker for a while. Without events it is the only index of what is cached (TTL
  ``kv_index_ttl_s``). With events it covers the time until the events of the blocks come:
  :data:`PENDING_TTL_S`.

Routing counts blocks in flight as held (:meth:`TierIndex.overlaps`): a request for the same
prefix arriving meanwhile follows the first instead of recomputing it elsewhere. A worker computing
the prefix itself makes its blocks findable as its step launches, so a request queued behind finds
them; but a decode worker knows nothing of a prompt still prefilling on a prefill worker for it, and
a request sent there now would be computed whole. So the router tells blocks held from blocks on
their way (:meth:`TierIndex.resident_overlap`, :meth:`TierIndex.handoff_on`), and such a request
waits for the handoff to land (``RequestFlow._route``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from protocol.hashing import prompt_hashes
from router.kv_events import KVEventFeed
from router.kv_index import ApproxKVIndex, InFlightKVIndex, KVIndex, merge_overlaps
from runtime.discovery import WorkerInfo
from runtime.internal_grpc import PLAINTEXT, InternalGrpc

log = logging.getLogger("tandem.router")

PENDING_TTL_S = 10.0  # with KV events: how long a landed prompt counts as cached before its events come


@dataclass(eq=False)
class Landing:
    """One routed prompt on its way into a worker's cache."""

    worker_id: str
    hashes: list[int]
    blocks_left: int  # prompt blocks still to compute (there or on a prefill worker); 0 once computed
    prefill_worker: str = ""  # handed off from this prefill worker; empty: the worker computes it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when it lands or fails
    done: bool = False


class TierIndex:
    """The KV indexes of one tier. Block size: the workers' (from their registration)."""

    def __init__(self, role: str, block_size: int, kv_events: bool, ttl_s: float,
                 internal: InternalGrpc = PLAINTEXT) -> None:
        self.role = role
        self.block_size = block_size
        self.internal = internal
        self.exact = KVIndex(block_size) if kv_events else None
        self.feed = KVEventFeed(self.exact, internal=internal) if self.exact is not None else None
        self.landed = ApproxKVIndex(block_size, PENDING_TTL_S if kv_events else ttl_s)
        self.in_flight = InFlightKVIndex(block_size)
        self._landings: dict[str, list[Landing]] = {}  # worker -> prompts on their way there
        self._known: set[str] = set()

    def adopt(self, workers: Mapping[str, WorkerInfo]) -> TierIndex:
        """This tier's routing for ``workers``: itself, or (while it knows no worker yet) a fresh
        one with the block size the workers registered, when it differs."""
        sizes = {info.block_size for info in workers.values()}
        if self._known or not sizes or self.block_size in sizes:
            return self
        block_size = max(sizes, key=lambda b: sum(info.block_size == b for info in workers.values()))
        log.info("%s tier: block size %d, from the workers' registration", self.role, block_size)
        return TierIndex(self.role, block_size, self.exact is not None, self.landed.ttl_s, self.internal)

    def sync(self, workers: Mapping[str, WorkerInfo]) -> None:
        """Follow discovery: subscribe to new workers' events, forget the ones gone."""
        for worker_id in (self._known | set(self._landings)) - set(workers):
            self.landed.remove_worker(worker_id)
            for landing in self._landings.pop(worker_id, ()):
                self.land(landing, ok=False)
            self.in_flight.remove_worker(worker_id)
        self._known = set(workers)
        if self.feed is not None:
            self.feed.sync(workers)

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()

    def hashes(self, prompt_ids: Sequence[int]) -> list[int]:
        return prompt_hashes(prompt_ids, self.block_size)

    def overlaps(self, hashes: Sequence[int], in_flight: bool = True) -> dict[str, int]:
        """Per worker, the leading blocks of ``hashes`` it holds: cached (exact, or landed per
        the router's own requests), and unless ``in_flight`` is False those on their way there."""
        found = [self.landed.overlaps(hashes)]
        if self.exact is not None:
            found.append(self.exact.overlaps(hashes))
        if in_flight:
            found.append(self.in_flight.overlaps(hashes))
        return merge_overlaps(*found)

    def resident_overlap(self, worker_id: str, hashes: Sequence[int]) -> int:
        """The leading blocks of ``hashes`` the worker holds now (none of them still on their way)."""
        return self.overlaps(hashes, in_flight=False).get(worker_id, 0)

    def handoff_on(self, worker_id: str, hashes: Sequence[int]) -> tuple[Landing | None, int]:
        """The prompt on its way to ``worker_id`` from a prefill worker that shares the most leading
        blocks with ``hashes``, and how many it shares."""
        best, best_n = None, 0
        for landing in self._landings.get(worker_id, ()):
            if not landing.prefill_worker:
                continue
            n = 0
            for mine, theirs in zip(hashes, landing.hashes):
                if mine != theirs:
                    break
                n += 1
            if n > best_n:
                best, best_n = landing, n
        return best, best_n

    def expect(self, worker_id: str, hashes: Sequence[int], blocks_left: int, prefill_worker: str = "") -> Landing:
        """The router sends a prompt with ``hashes`` to ``worker_id``: in flight until :meth:`land`."""
        landing = Landing(worker_id, list(hashes), blocks_left, prefill_worker)
        self.in_flight.add(worker_id, landing.hashes)
        self._landings.setdefault(worker_id, []).append(landing)
        return landing

    def land(self, landing: Landing, ok: bool) -> None:
        """The prompt arrived (``ok``: the worker holds it now) or will not; once, later calls do nothing."""
        if landing.done:
            return
        landing.done = True
        landing.blocks_left = 0
        self.in_flight.discard(landing.worker_id, landing.hashes)
        waiting = self._landings.get(landing.worker_id, [])
        if landing in waiting:
            waiting.remove(landing)
        if ok and landing.hashes:
            self.landed.record(landing.worker_id, landing.hashes)
        landing.arrived.set()

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        """``worker_id`` holds a prompt with ``hashes`` (as far as the router knows)."""
        if hashes:
            self.landed.record(worker_id, hashes)

    @property
    def num_indexed_blocks(self) -> int:
        return self.exact.num_blocks if self.exact is not None else self.landed.num_blocks
