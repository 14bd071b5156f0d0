"""A live view of one etcd prefix of protobuf messages: read once, then watched.

    async with PrefixView(plane, keys.metrics_prefix(ns, keys.WORKER_STEPS), cpb.WorkerStepStats) as steps:
        ...  # steps.items: {worker_id: WorkerStepStats}, always current

It reads the prefix (the snapshot) and watches it from the read's revision + 1, so no change
falls between the two; if the watch stream breaks (etcd restarted, the revision compacted, the
client reconnected) it reads the prefix again and watches on. A reader is never shown a value
older than one it saw. ``on_put``/``on_delete`` are called on the event loop for every change
after the snapshot (a planner folds each worker's step summaries as they come, not only the
last one). ``parse`` turns a key's bytes into the value kept (default: ``cls.FromString``; None
skips the value); ``skip_unchanged`` drops a put of the bytes already held (no callback).
``runtime.discovery.WorkerWatch`` is this view of the registrations, as a stream of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from runtime.etcd import ControlPlane, stop_task

log = logging.getLogger(__name__)

M = TypeVar("M")
_MAX_BACKOFF_S = 2.0


class PrefixView(Generic[M]):
    def __init__(self, plane: ControlPlane, prefix: str, cls: type[Message],
                 on_put: Callable[[str, M], None] | None = None,
                 on_delete: Callable[[str], None] | None = None, *,
                 parse: Callable[[str, bytes], M | None] | None = None, skip_unchanged: bool = False) -> None:
        self.plane, self.prefix, self.cls = plane, prefix, cls
        self.on_put, self.on_delete = on_put, on_delete
        self.parse = parse or self._decode
        self.skip_unchanged = skip_unchanged
        self._items: dict[str, M] = {}
        self._raw: dict[str, bytes] = {}  # with skip_unchanged: the bytes each item came from
        self._watch: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.num_resyncs = 0
        self.changed = asyncio.Event()  # set on every change; readers clear it

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The watching task (done once the view is stopped or its plane closed)."""
        return self._task

    @property
    def items(self) -> Mapping[str, M]:
        """The current values by the key's last segment (a live read-only view)."""
        return MappingProxyType(self._items)

    async def start(self) -> PrefixView[M]:
        revision = await self._resync(notify=False)
        self._watch = await self.plane.client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
        self._task = asyncio.create_task(self._pump(), name=f"watch-{self.prefix}")
        return self

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await stop_task(self._task)
        await self._cancel_watch()

    async def __aenter__(self) -> PrefixView[M]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- internals ------------------------------------------------------------------------------
    def _decode(self, key_id: str, value: bytes) -> M | None:
        try:
            return self.cls.FromString(value)
        except DecodeError as exc:
            log.warning("ignoring a value under %s that is not a %s: %s", self.prefix, self.cls.__name__, exc)
            return None

    def _apply(self, key_id: str, value: bytes | None, notify: bool) -> None:
        if value is None:
            self._raw.pop(key_id, None)
            if self._items.pop(key_id, None) is not None and notify and self.on_delete is not None:
                self.on_delete(key_id)
        else:
            if self.skip_unchanged and self._raw.get(key_id) == value:
                return
            msg = self.parse(key_id, value)
            if msg is None:
                return
            if self.skip_unchanged:
                self._raw[key_id] = value
            self._items[key_id] = msg
            if notify and self.on_put is not None:
                self.on_put(key_id, msg)
        self.changed.set()

    async def _resync(self, notify: bool) -> int:
        result = await self.plane.client.get_prefix(self.prefix.encode())
        current = {kv.key.decode()[len(self.prefix):]: bytes(kv.value) for kv in result.kvs}
        for key_id in [k for k in self._items if k not in current]:
            self._apply(key_id, None, notify)
        for key_id, value in current.items():
            self._apply(key_id, value, notify)
        return int(result.header.revision)

    async def _cancel_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.plane.request_timeout_s):
                    await watch.cancel()

    async def _pump(self) -> None:
        backoff = 0.1
        while not self._closed:
            if self._watch is None:
                if self.plane.closed:
                    return
                try:
                    revision = await self._resync(notify=True)
                    self.num_resyncs += 1
                    self._watch = await self.plane.client.watch_prefix(self.prefix.encode(),
                                                                       start_revision=revision + 1)
                    backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("watch %s: resync failed: %r", self.prefix, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, _MAX_BACKOFF_S)
                    continue
            try:
                async for event in self._watch:
                    key_id = event.kv.key.decode()[len(self.prefix):]
                    self._apply(key_id, bytes(event.kv.value) if event.kind == "PUT" else None, notify=True)
                log.info("watch %s: stream ended, resyncing", self.prefix)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch %s: stream broke (%r), resyncing", self.prefix, exc)
            await self._cancel_watch()
            await asyncio.sleep(backoff)
