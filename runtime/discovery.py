"""Worker discovery: watch one role's registrations; keep a live `{worker_id: WorkerInfo}`.

A `WorkerWatch` reads the prefix (the snapshot) and then watches it from the snapshot's
revision + 1, so no change falls between the two. If the watch stream breaks (etcd restarted,
revision compacted, the client reconnected) it reads the prefix again, emits the difference
from what it had as events, and watches on: consumers see a consistent stream, never a gap.

A worker whose process dies disappears when etcd expires its lease, i.e. within the TTL.
Obtain these through `ControlPlane.watch_workers(role)` and `ControlPlane.workers(role)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from runtime.etcd import (
    ControlPlane,
    WorkerEvent,
    WorkerEventKind,
    WorkerInfo,
    _parse_worker,
    stop_task,
    workers_prefix,
)

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 2.0
_POLL_S = 0.1


class WorkerWatch:
    """`.snapshot` at open time, then `async for event in watch` until `close()`."""

    def __init__(self, plane: ControlPlane, role: str) -> None:
        self.plane = plane
        self.role = role
        self.prefix = workers_prefix(plane.namespace, role)
        self.snapshot: dict[str, WorkerInfo] = {}
        self._known: dict[str, WorkerInfo] = {}
        self._raw: dict[str, bytes] = {}  # worker id -> last value seen, to tell UPDATED from a no-op
        self._queue: asyncio.Queue[WorkerEvent | None] = asyncio.Queue()
        self._watch: Any = None  # aetcd.Watch
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, plane: ControlPlane, role: str) -> WorkerWatch:
        watch = cls(plane, role)
        revision = await watch._resync(emit=False)
        watch.snapshot = dict(watch._known)
        watch._watch = await plane.client.watch_prefix(watch.prefix.encode(), start_revision=revision + 1)
        watch._task = asyncio.create_task(watch._pump(), name=f"watch-{role}")
        return watch

    def __aiter__(self) -> WorkerWatch:
        return self

    async def __anext__(self) -> WorkerEvent:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # stay ended for later readers
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout_s: float) -> WorkerEvent | None:
        """The next event, or None if none came within `timeout_s` or the watch ended."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self.__anext__()
        except (TimeoutError, StopAsyncIteration):
            return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await stop_task(self._task)
        await self._cancel_watch()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> WorkerWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------

    async def _cancel_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.plane.request_timeout_s):
                    await watch.cancel()

    def _apply(self, worker_id: str, value: bytes | None) -> None:
        """Fold one key's new value (None: deleted) into the known set, emitting an event."""
        old = self._known.get(worker_id)
        if value is None:
            self._raw.pop(worker_id, None)
            if self._known.pop(worker_id, None) is not None:
                self._queue.put_nowait(WorkerEvent(WorkerEventKind.REMOVED, self.role, worker_id, old))
            return
        if self._raw.get(worker_id) == value:
            return
        info = _parse_worker(self.prefix + worker_id, value)
        if info is None:
            return
        self._raw[worker_id] = value
        self._known[worker_id] = info
        kind = WorkerEventKind.ADDED if old is None else WorkerEventKind.UPDATED
        self._queue.put_nowait(WorkerEvent(kind, self.role, worker_id, info))

    async def _resync(self, *, emit: bool) -> int:
        """Read the prefix; fold the difference in; return the read's revision."""
        result = await self.plane.client.get_prefix(self.prefix.encode())
        current = {kv.key.decode()[len(self.prefix) :]: bytes(kv.value) for kv in result.kvs}
        for worker_id in [w for w in self._known if w not in current]:
            self._apply(worker_id, None)
        for worker_id, value in current.items():
            self._apply(worker_id, value)
        if not emit:
            self._queue = asyncio.Queue()  # the snapshot is not news
        return int(result.header.revision)

    async def _pump(self) -> None:
        backoff = 0.1
        while not self._closed:
            if self._watch is None:
                if self.plane.closed:
                    break
                try:
                    revision = await self._resync(emit=True)
                    self._watch = await self.plane.client.watch_prefix(
                        self.prefix.encode(), start_revision=revision + 1
                    )
                    backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("worker watch %s: resync failed: %r", self.prefix, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, _MAX_BACKOFF_S)
                    continue
            try:
                async for event in self._watch:
                    worker_id = event.kv.key.decode()[len(self.prefix) :]
                    self._apply(worker_id, bytes(event.kv.value) if event.kind == "PUT" else None)
                log.info("worker watch %s: stream ended, resyncing", self.prefix)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("worker watch %s: stream broke (%r), resyncing", self.prefix, exc)
            await self._cancel_watch()
            await asyncio.sleep(backoff)
        self._queue.put_nowait(None)


class WorkerSet:
    """A live read-only view `{worker_id: WorkerInfo}` of one role, fed by a `WorkerWatch`.

    `on_event` is called (on the event loop) for every change after the initial snapshot.
    """

    def __init__(
        self, plane: ControlPlane, role: str, on_event: Callable[[WorkerEvent], None] | None = None
    ) -> None:
        self.plane = plane
        self.role = role
        self.on_event = on_event
        self._workers: dict[str, WorkerInfo] = {}
        self._watch: WorkerWatch | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        """The current workers (a live view: copy it to keep a snapshot)."""
        return MappingProxyType(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    async def start(self) -> WorkerSet:
        """Returns once the snapshot is loaded."""
        self._watch = await self.plane.watch_workers(self.role)
        self._workers = dict(self._watch.snapshot)
        self._task = asyncio.create_task(self._run(), name=f"workers-{self.role}")
        return self

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.close()
        if self._task is not None:
            await stop_task(self._task)

    async def __aenter__(self) -> WorkerSet:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_until(
        self, predicate: Callable[[Mapping[str, WorkerInfo]], bool], timeout_s: float
    ) -> bool:
        """Wait (at most `timeout_s`) until `predicate(workers)` holds; return whether it does.

        The predicate is checked on every change and at least every 0.1 s.
        """
        deadline = time.monotonic() + timeout_s
        while not predicate(self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                # Wakes on every change, and polls too: the predicate may read other state.
                async with asyncio.timeout(min(remaining, _POLL_S)):
                    await self._changed.wait()
        return True

    async def _run(self) -> None:
        assert self._watch is not None
        async for event in self._watch:
            if event.kind is WorkerEventKind.REMOVED:
                self._workers.pop(event.worker_id, None)
            elif event.info is not None:
                self._workers[event.worker_id] = event.info
            self._changed.set()
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("WorkerSet on_event callback failed")
