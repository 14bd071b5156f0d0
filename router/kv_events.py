"""The event plane, router side: keep a :class:`KVIndex` in step with the KV event streams of
one tier's workers (DESIGN.md, "Planes").

For each worker it discovers, the router takes a ``KVSnapshot`` (every cached block, and the id
of the worker's next event), then subscribes to ``KVEvents`` from that id and applies events
strictly in id order. An event it has already applied is skipped; one beyond the next expected
id (a gap: the worker dropped history, restarted, or the stream misbehaved) makes it take a new
snapshot and resubscribe from there. Every (re)connect starts with a snapshot, so the index
converges to the worker's cache whatever happened while the stream was down. A worker that
leaves discovery is unsubscribed and its entries are dropped from the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.kv_index import KVIndex
from runtime.convert import event_from_pb
from runtime.discovery import WorkerInfo
from runtime.internal_grpc import PLAINTEXT, InternalGrpc
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.router.kv_events")

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]  # a snapshot of 10M blocks fits
_MAX_BACKOFF_S = 2.0


@dataclass
class SubscriptionStats:
    num_events: int = 0
    num_snapshots: int = 0
    num_gaps: int = 0  # snapshots forced by an event id beyond the next expected one
    num_errors: int = 0  # broken streams and failed calls (each followed by a snapshot)


class EventCursor:
    """One worker's place in its event stream, applied to the index. No I/O."""

    def __init__(self, index: KVIndex, worker_id: str) -> None:
        self.index = index
        self.worker_id = worker_id
        self.next_event_id: int | None = None  # None: take a snapshot first
        self.stats = SubscriptionStats()

    def load_snapshot(self, hashes: Sequence[int], next_event_id: int, host_hashes: Sequence[int] = ()) -> None:
        self.index.load_snapshot(self.worker_id, hashes, host_hashes)
        self.next_event_id = next_event_id
        self.stats.num_snapshots += 1

    def apply(self, events: Sequence[KVEvent]) -> bool:
        """Apply ``events`` in order. False at a gap: the rest is not applied and the caller
        must take a snapshot (the cursor then reads None)."""
        if self.next_event_id is None:
            return False
        index, worker_id = self.index, self.worker_id
        for ev in events:
            if ev.event_id < self.next_event_id:
                continue  # applied already (a replay after a resubscribe)
            if ev.event_id > self.next_event_id:
                self.next_event_id = None
                self.stats.num_gaps += 1
                return False
            if isinstance(ev, BlockStored):
                index.store(worker_id, ev.block_hash, ev.medium)
            elif isinstance(ev, BlockRemoved):
                index.remove(worker_id, ev.block_hash, ev.medium)
            elif isinstance(ev, AllBlocksCleared):
                index.clear(worker_id)
            self.next_event_id += 1
            self.stats.num_events += 1
        return True


class WorkerSubscription:
    """The task that feeds one worker's events into the index until cancelled."""

    def __init__(self, index: KVIndex, worker_id: str, stub: pb_grpc.WorkerServiceStub,
                 call_timeout_s: float = 10.0) -> None:
        self.cursor = EventCursor(index, worker_id)
        self.stub = stub
        self.call_timeout_s = call_timeout_s
        self.synced = asyncio.Event()  # set once a snapshot is loaded (cleared while it is retaken)

    @property
    def stats(self) -> SubscriptionStats:
        return self.cursor.stats

    async def run(self) -> None:
        backoff = 0.05
        cursor = self.cursor
        while True:
            try:
                self.synced.clear()
                snap = await self.stub.KVSnapshot(pb.KVSnapshotRequest(), timeout=self.call_timeout_s)
                if snap.block_size != cursor.index.block_size:
                    log.error("worker %s uses block size %d, the index %d: its KV events are ignored",
                              cursor.worker_id, snap.block_size, cursor.index.block_size)
                    return
                host = [b.block_hash for b in snap.blocks if b.medium != pb.KV_MEDIUM_DEVICE]
                cursor.load_snapshot([b.block_hash for b in snap.blocks if b.medium == pb.KV_MEDIUM_DEVICE],
                                     snap.next_event_id, host)
                self.synced.set()
                stream = self.stub.KVEvents(pb.KVEventsRequest(from_event_id=snap.next_event_id))
                gap = False
                try:
                    async for msg in stream:
                        if not cursor.apply([event_from_pb(ev) for ev in msg.events]):
                            log.info("worker %s: gap in KV events; taking a snapshot", cursor.worker_id)
                            gap = True
                            break
                        backoff = 0.05
                finally:
                    stream.cancel()
                cursor.next_event_id = None
                if not gap:  # the worker ended the stream (shutting down?): do not spin
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, _MAX_BACKOFF_S)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                cursor.next_event_id = None
                cursor.stats.num_errors += 1
                if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                    continue  # the worker no longer has our next event: snapshot at once
                log.debug("worker %s: KV event stream failed (%s); reconnecting", cursor.worker_id, e.code().name)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
            except Exception:  # a malformed event: start over from a snapshot
                log.exception("worker %s: bad KV event stream; taking a snapshot", cursor.worker_id)
                cursor.next_event_id = None
                cursor.stats.num_errors += 1
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)


class KVEventFeed:
    """Subscriptions to every worker of one tier, kept in line with discovery by :meth:`sync`."""

    def __init__(self, index: KVIndex, connect: Callable[[str], pb_grpc.WorkerServiceStub] | None = None,
                 internal: InternalGrpc = PLAINTEXT) -> None:
        self.index = index
        self._connect = connect
        self._internal = internal
        self._subs: dict[str, tuple[str, WorkerSubscription, asyncio.Task]] = {}  # worker -> (endpoint, ...)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def subscription(self, worker_id: str) -> WorkerSubscription | None:
        entry = self._subs.get(worker_id)
        return entry[1] if entry else None

    def sync(self, workers: Mapping[str, WorkerInfo]) -> None:
        """Subscribe to workers not yet followed (or whose endpoint changed); drop the ones gone."""
        for worker_id in [w for w in self._subs if w not in workers]:
            self._drop(worker_id)
            self.index.remove_worker(worker_id)
        for worker_id, info in workers.items():
            entry = self._subs.get(worker_id)
            if entry is not None and entry[0] == info.endpoint:
                continue
            if entry is not None:
                self._drop(worker_id)
            if info.block_size != self.index.block_size:
                log.error("worker %s uses block size %d, the router %d: not indexed", worker_id, info.block_size,
                          self.index.block_size)
                continue
            sub = WorkerSubscription(self.index, worker_id, self._stub(worker_id, info.endpoint))
            task = asyncio.get_running_loop().create_task(sub.run(), name=f"kv-events-{worker_id}")
            self._subs[worker_id] = (info.endpoint, sub, task)

    async def stop(self) -> None:
        tasks = [task for _, _, task in self._subs.values()]
        for worker_id in list(self._subs):
            self._drop(worker_id)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _stub(self, worker_id: str, endpoint: str) -> pb_grpc.WorkerServiceStub:
        if self._connect is not None:
            return self._connect(endpoint)
        channel = self._channels[worker_id] = self._internal.channel(endpoint, _CHANNEL_OPTIONS)
        return pb_grpc.WorkerServiceStub(channel)

    def _drop(self, worker_id: str) -> None:
        _, _, task = self._subs.pop(worker_id)
        task.cancel()
        channel = self._channels.pop(worker_id, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())
