"""The router's KV index: which worker holds which cached prompt block.

Blocks are named by the workers' chained hashes (``protocol.hashing``): a
block's hash covers every token before it, so "worker W holds hash h" means W holds that
exact prefix, and one flat map ``hash -> workers`` answers prefix queries without a tree.

Workers are slots in a bitmask; a query walks the request's hashes once, intersecting masks,
and stops at the first block nobody holds: time linear in the prompt's blocks (each step is
one dict lookup and one big-int AND, whatever the number of workers).

Three indexes share that core:

- :class:`KVIndex`, exact, fed by the workers' KV events (``router.kv_events``);
- :class:`ApproxKVIndex`, which predicts contents from the router's own requests and forgets
  them after a TTL: the only index of what is cached with ``--no-kv-events``, and with events the
  short-lived record of prompts a worker has just computed or received (their events are on the way);
- :class:`InFlightKVIndex`: prompts on their way into a worker's cache (routed there, not yet
  computed there, or not yet landed there from a prefill worker), held until they arrive or fail.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence

from protocol.kv_events import Medium


class Overlap(int):
    """How many leading blocks of a prompt a worker holds (an ``int``: it reads as one everywhere),
    and how many of those it holds only in its host tier (``num_host``): a hit there is copied back to
    the device instead of recomputed, so it saves less than a device hit (``router.policy.kv_costs``)."""

    num_host: int

    def __new__(cls, num_blocks: int, num_host: int = 0) -> Overlap:
        self = super().__new__(cls, num_blocks)
        self.num_host = num_host
        return self


class KVIndex:
    """Exact: ``store``/``remove``/``clear`` mirror each worker's KV events. A block is held on the
    device or in the host tier (``protocol.kv_events.Medium``), or both; each medium has its own map."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # block hash -> bitmask of worker slots holding it on the device
        self._host_holders: dict[int, int] = {}  # the same, in the host tier
        self._slot: dict[str, int] = {}  # worker id -> slot
        self._worker: dict[int, str] = {}  # slot -> worker id
        self._blocks: dict[str, set[int]] = {}  # worker id -> hashes it holds on the device
        self._host_blocks: dict[str, set[int]] = {}  # worker id -> hashes it holds in the host tier
        self._free_slots: list[int] = []

    # ---- queries ---------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return list(self._slot)

    @property
    def num_blocks(self) -> int:
        """Indexed (worker, block, medium) triples."""
        return sum(len(b) for b in self._blocks.values()) + sum(len(b) for b in self._host_blocks.values())

    def blocks_of(self, worker_id: str, medium: Medium = Medium.DEVICE) -> frozenset[int]:
        return frozenset((self._blocks if medium is Medium.DEVICE else self._host_blocks).get(worker_id, ()))

    def holds(self, worker_id: str, block_hash: int) -> bool:
        """Whether the worker holds the block, on either medium."""
        slot = self._slot.get(worker_id)
        return slot is not None and bool(
            (self._holders.get(block_hash, 0) | self._host_holders.get(block_hash, 0)) >> slot & 1)

    def overlaps(self, hashes: Sequence[int]) -> dict[str, Overlap]:
        """For each worker holding the first block: how many leading blocks of ``hashes`` it
        holds, on either medium (an :class:`Overlap`, with those held only in its host tier).
        Workers holding none are absent."""
        if not hashes:
            return {}
        device, host = self._holders, self._host_holders
        num_host: dict[int, int] = {}  # slot -> leading blocks so far held only in its host tier
        out: dict[str, Overlap] = {}
        active = -1  # every slot, until the first block
        for i, block_hash in enumerate(hashes):
            on_device = device.get(block_hash, 0)
            on_host = host.get(block_hash, 0) if host else 0
            kept = active & (on_device | on_host)
            if kept != active and i > 0:
                self._credit(out, active & ~kept, i, num_host)
            active = kept
            if not active:
                return out
            host_only = active & on_host & ~on_device
            while host_only:
                low = host_only & -host_only
                slot = low.bit_length() - 1
                num_host[slot] = num_host.get(slot, 0) + 1
                host_only ^= low
        self._credit(out, active, len(hashes), num_host)
        return out

    # ---- changes ---------------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> None:
        if worker_id in self._slot:
            return
        slot = self._free_slots.pop() if self._free_slots else len(self._slot)
        self._slot[worker_id] = slot
        self._worker[slot] = worker_id
        self._blocks[worker_id] = set()
        self._host_blocks[worker_id] = set()

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker and every block it held."""
        if worker_id not in self._slot:
            return
        self.clear(worker_id)
        slot = self._slot.pop(worker_id)
        del self._worker[slot]
        del self._blocks[worker_id]
        del self._host_blocks[worker_id]
        self._free_slots.append(slot)

    def store(self, worker_id: str, block_hash: int, medium: Medium = Medium.DEVICE) -> None:
        self.add_worker(worker_id)
        blocks, holders = self._media(worker_id, medium)
        if block_hash in blocks:
            return
        blocks.add(block_hash)
        holders[block_hash] = holders.get(block_hash, 0) | (1 << self._slot[worker_id])

    def remove(self, worker_id: str, block_hash: int, medium: Medium = Medium.DEVICE) -> None:
        if worker_id not in self._slot:
            return
        blocks, holders = self._media(worker_id, medium)
        if block_hash not in blocks:
            return
        blocks.discard(block_hash)
        mask = holders[block_hash] & ~(1 << self._slot[worker_id])
        if mask:
            holders[block_hash] = mask
        else:
            del holders[block_hash]

    def clear(self, worker_id: str) -> None:
        """Drop every block of the worker, on both media (it stays known, with an empty cache)."""
        for medium in Medium:
            for block_hash in list(self.blocks_of(worker_id, medium)):
                self.remove(worker_id, block_hash, medium)

    def load_snapshot(self, worker_id: str, hashes: Iterable[int], host_hashes: Iterable[int] = ()) -> None:
        """Replace what the index knows of the worker with ``hashes`` on the device and
        ``host_hashes`` in its host tier."""
        self.add_worker(worker_id)
        for medium, wanted in ((Medium.DEVICE, hashes), (Medium.HOST, host_hashes)):
            new = set(wanted)
            old = set(self.blocks_of(worker_id, medium))
            for block_hash in old - new:
                self.remove(worker_id, block_hash, medium)
            for block_hash in new - old:
                self.store(worker_id, block_hash, medium)

    # ---- internals -------------------------------------------------------------------------
    def _media(self, worker_id: str, medium: Medium) -> tuple[set[int], dict[int, int]]:
        if medium is Medium.DEVICE:
            return self._blocks[worker_id], self._holders
        return self._host_blocks[worker_id], self._host_holders

    def _credit(self, out: dict[str, Overlap], mask: int, num_blocks: int, num_host: dict[int, int]) -> None:
        while mask:
            low = mask & -mask
            slot = low.bit_length() - 1
            out[self._worker[slot]] = Overlap(num_blocks, num_host.get(slot, 0))
            mask ^= low


class _OverKVIndex:
    """An index that keeps its blocks in a ``KVIndex`` (``self.index``) and adds bookkeeping."""

    index: KVIndex

    @property
    def block_size(self) -> int:
        return self.index.block_size

    @property
    def num_blocks(self) -> int:
        return self.index.num_blocks


class ApproxKVIndex(_OverKVIndex):
    """Predicted contents: a routed prompt's blocks count as held by its worker for ``ttl_s``
    after the decision (refreshed by every later decision that routes them there)."""

    def __init__(self, block_size: int, ttl_s: float, clock=time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.index = KVIndex(block_size)
        self.ttl_s = ttl_s
        self.clock = clock
        self._expiry: dict[tuple[str, int], float] = {}  # (worker, hash) -> when it is forgotten
        self._order: deque[tuple[float, str, int]] = deque()  # records in time order (one TTL: FIFO)

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        """The router sent a prompt with ``hashes`` to ``worker_id``."""
        now = self.clock()
        self.expire(now)
        until = now + self.ttl_s
        for block_hash in hashes:
            self.index.store(worker_id, block_hash)
            self._expiry[(worker_id, block_hash)] = until
            self._order.append((until, worker_id, block_hash))

    def overlaps(self, hashes: Sequence[int]) -> dict[str, int]:
        self.expire(self.clock())
        return self.index.overlaps(hashes)

    def remove_worker(self, worker_id: str) -> None:
        for block_hash in self.index.blocks_of(worker_id):
            self._expiry.pop((worker_id, block_hash), None)
        self.index.remove_worker(worker_id)

    def expire(self, now: float) -> None:
        order = self._order
        while order and order[0][0] <= now:
            until, worker_id, block_hash = order.popleft()
            if self._expiry.get((worker_id, block_hash)) == until:  # not refreshed since
                del self._expiry[(worker_id, block_hash)]
                self.index.remove(worker_id, block_hash)


class InFlightKVIndex(_OverKVIndex):
    """Prompts on their way into a worker's cache. A block counts as long as one request brings it
    (several may bring the same prefix): ``add`` and ``discard`` come in pairs."""

    def __init__(self, block_size: int) -> None:
        self.index = KVIndex(block_size)
        self._count: dict[tuple[str, int], int] = {}  # (worker, hash) -> requests bringing it

    def add(self, worker_id: str, hashes: Sequence[int]) -> None:
        for block_hash in hashes:
            key = (worker_id, block_hash)
            self._count[key] = self._count.get(key, 0) + 1
            self.index.store(worker_id, block_hash)

    def discard(self, worker_id: str, hashes: Sequence[int]) -> None:
        for block_hash in hashes:
            key = (worker_id, block_hash)
            left = self._count.get(key, 0) - 1
            if left > 0:
                self._count[key] = left
            elif key in self._count:
                del self._count[key]
                self.index.remove(worker_id, block_hash)

    def overlaps(self, hashes: Sequence[int]) -> dict[str, int]:
        return self.index.overlaps(hashes)

    def remove_worker(self, worker_id: str) -> None:
        for block_hash in self.index.blocks_of(worker_id):
            self._count.pop((worker_id, block_hash), None)
        self.index.remove_worker(worker_id)


def merge_overlaps(*overlaps: dict[str, int]) -> dict[str, int]:
    """Per worker, the longest of several indexes' overlaps (the first of equals: its
    ``Overlap.num_host`` with it)."""
    out: dict[str, int] = {}
    for one in overlaps:
        for worker_id, n in one.items():
            if n > out.get(worker_id, 0):
                out[worker_id] = n
    return out
