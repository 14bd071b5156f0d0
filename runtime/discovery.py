"""Worker registration and discovery: what a worker publishes under
`/tandem/{ns}/workers/{role}/{worker_id}` (a `WorkerInfo`, sent as the `WorkerInfo` message of
`proto/tandem_control.proto`), and a live view of one role's workers.

A `WorkerWatch` (a `runtime.watch.PrefixView` of the role's prefix, as events) reads the prefix
(the snapshot) and then watches it from the snapshot's revision + 1, so no change falls between
the two. If the watch stream breaks (etcd restarted, revision compacted, the client
reconnected) it reads the prefix again, emits the difference from what it had as events, and
watches on: consumers see a consistent stream, never a gap.
A `WorkerSet` keeps `{worker_id: WorkerInfo}` up to date from one.

A worker whose process dies disappears when etcd expires its lease, i.e. within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError

from protocol.model_card import ModelCard, TokenizerKind, TokenizerSource
from runtime import keys
from runtime.etcd import ControlPlane, stop_task
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.settings import check_name
from runtime.watch import PrefixView

log = logging.getLogger(__name__)

_POLL_S = 0.1
_ROLE_TO_PB = {"prefill": wpb.WORKER_ROLE_PREFILL, "decode": wpb.WORKER_ROLE_DECODE}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}


# -- what a worker registers -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What a worker publishes under `/tandem/{ns}/workers/{role}/{worker_id}`.

    `transport_metadata` is opaque to the control plane: kv_transfer's agent metadata.
    """

    worker_id: str
    role: str  # "prefill" or "decode"
    endpoint: str  # host:port of the worker's gRPC service
    model: ModelCard
    block_size: int  # tokens per KV block
    transport_metadata: bytes = b""
    metrics_url: str = ""  # where Prometheus scrapes this process, if it serves /metrics
    pid: int = 0
    started_at_unix_ms: int = 0
    num_gpus: float = 0.0  # GPUs it holds (ClusterConfig.gpus_per_worker): 0 on cpu unless set

    def __post_init__(self) -> None:
        check_name("worker id", self.worker_id)
        if self.role not in _ROLE_TO_PB:
            raise ValueError(f"worker {self.worker_id}: role must be one of {sorted(_ROLE_TO_PB)}, got {self.role!r}")
        if not isinstance(self.endpoint, str) or not self.endpoint:
            raise ValueError(f"worker {self.worker_id}: empty endpoint")
        if not isinstance(self.model, ModelCard):
            raise ValueError(f"worker {self.worker_id}: model must be a ModelCard")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"worker {self.worker_id}: block_size must be a positive int")
        if not self.num_gpus >= 0:  # NaN too
            raise ValueError(f"worker {self.worker_id}: num_gpus must be >= 0, got {self.num_gpus!r}")

    def to_pb(self) -> cpb.WorkerInfo:
        msg = cpb.WorkerInfo(
            worker_id=self.worker_id, role=_ROLE_TO_PB[self.role], endpoint=self.endpoint,
            model=cpb.ModelCard(name=self.model.name, max_model_len=self.model.max_model_len),
            block_size=self.block_size, transport_metadata=self.transport_metadata,
            metrics_url=self.metrics_url, pid=self.pid, started_at_unix_ms=self.started_at_unix_ms,
            num_gpus=self.num_gpus)
        source = self.model.tokenizer
        if source is not None:
            if source.kind is TokenizerKind.GGUF:
                msg.model.tokenizer.gguf_file = source.path
            elif source.kind is TokenizerKind.SYNTHETIC:
                msg.model.tokenizer.synthetic_vocab_size = int(source.path)
            else:
                msg.model.tokenizer.hf_dir = source.path
        return msg

    @classmethod
    def from_pb(cls, msg: cpb.WorkerInfo) -> WorkerInfo:
        """Raises ValueError for a registration that is incomplete or malformed."""
        which = msg.model.tokenizer.WhichOneof("source")
        source = None
        if which == "gguf_file":
            source = TokenizerSource(TokenizerKind.GGUF, msg.model.tokenizer.gguf_file)
        elif which == "hf_dir":
            source = TokenizerSource(TokenizerKind.HF_DIR, msg.model.tokenizer.hf_dir)
        elif which == "synthetic_vocab_size":
            source = TokenizerSource(TokenizerKind.SYNTHETIC, str(msg.model.tokenizer.synthetic_vocab_size))
        if msg.role not in _ROLE_FROM_PB:
            raise ValueError(f"worker {msg.worker_id!r}: no role")
        return cls(
            worker_id=msg.worker_id, role=_ROLE_FROM_PB[msg.role], endpoint=msg.endpoint,
            model=ModelCard(msg.model.name, msg.model.max_model_len, source), block_size=msg.block_size,
            transport_metadata=msg.transport_metadata, metrics_url=msg.metrics_url,
            pid=msg.pid, started_at_unix_ms=msg.started_at_unix_ms, num_gpus=msg.num_gpus)

    @classmethod
    def parse(cls, data: bytes) -> WorkerInfo:
        """From a registration's etcd value; ValueError if it is not a valid one."""
        try:
            msg = cpb.WorkerInfo.FromString(data)
        except DecodeError as exc:
            raise ValueError(f"not a WorkerInfo message: {exc}") from None
        return cls.from_pb(msg)


def _parse_worker(key: str, value: bytes) -> WorkerInfo | None:
    try:
        return WorkerInfo.parse(value)
    except ValueError as exc:
        log.warning("ignoring bad registration at %s: %s", key, exc)
        return None


async def register(plane: ControlPlane, info: WorkerInfo) -> None:
    """Publish `info` under the process's lease; it disappears when the process dies."""
    await plane.put_message(keys.worker_key(plane.namespace, info.role, info.worker_id), info.to_pb())


async def deregister(plane: ControlPlane, role: str, worker_id: str) -> None:
    """Remove a registration now (a draining worker), keeping the lease for the rest."""
    await plane.delete(keys.worker_key(plane.namespace, role, worker_id))


async def list_workers(plane: ControlPlane, role: str) -> dict[str, WorkerInfo]:
    """A one-off read of a role's registrations (for a live view use `WorkerSet`)."""
    prefix = keys.workers_prefix(plane.namespace, role)
    return {
        keys.id_under(prefix, key): info
        for key, value in (await plane.get_prefix(prefix)).items()
        if (info := _parse_worker(key, value)) is not None
    }


def scrape_targets(workers: list[WorkerInfo], routers: list[str] = (), model: str = "",
                   planners: list[cpb.PlannerInfo] = ()) -> list[dict[str, Any]]:
    """Prometheus service discovery target groups (``http_sd``/``file_sd`` JSON) of a cluster:
    each router (``host:port`` serving ``/metrics``) as job ``tandem-router``, each worker with a
    ``metrics_url`` as job ``tandem-{role}`` labelled ``role``, ``worker`` and ``model``, each
    registered planner with one as job ``tandem-planner`` (its metrics carry none of these: the
    targets do, ``runtime.metric_catalog``)."""
    groups: list[dict[str, Any]] = [{"targets": [router], "labels": {"job": "tandem-router", "model": model}}
                                    for router in routers]
    for info in sorted(workers, key=lambda w: (w.role, w.worker_id)):
        if not info.metrics_url:
            continue
        url = urlsplit(info.metrics_url)
        groups.append({"targets": [url.netloc], "labels": {
            "job": f"tandem-{info.role}", "role": info.role, "worker": info.worker_id, "model": info.model.name,
            "__metrics_path__": url.path or "/metrics"}})
    for planner in sorted(planners, key=lambda p: p.planner_id):
        if not planner.metrics_url:
            continue
        url = urlsplit(planner.metrics_url)
        groups.append({"targets": [url.netloc], "labels": {
            "job": "tandem-planner", "role": "planner", "model": model, "__metrics_path__": url.path or "/metrics"}})
    return groups


async def list_planners(plane: ControlPlane) -> list[cpb.PlannerInfo]:
    """The running planners' registrations (``keys.planners_prefix``)."""
    return list((await plane.get_messages(keys.planners_prefix(plane.namespace), cpb.PlannerInfo)).values())


# -- watching ----------------------------------------------------------------------------------


class WorkerEventKind(enum.StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclasses.dataclass(frozen=True)
class WorkerEvent:
    """A change in one role's worker set. For REMOVED, `info` is the last one seen (if any)."""

    kind: WorkerEventKind
    role: str
    worker_id: str
    info: WorkerInfo | None


class WorkerWatch:
    """`.snapshot` at open time, then `async for event in watch` until `close()`: the events of a
    `runtime.watch.PrefixView` of the role's registrations (a put of the same bytes is no event)."""

    def __init__(self, plane: ControlPlane, role: str) -> None:
        self.plane = plane
        self.role = role
        self.prefix = keys.workers_prefix(plane.namespace, role)
        self.snapshot: dict[str, WorkerInfo] = {}
        self._known: dict[str, WorkerInfo] = {}
        self._queue: asyncio.Queue[WorkerEvent | None] = asyncio.Queue()
        self._view: PrefixView[WorkerInfo] = PrefixView(
            plane, self.prefix, cpb.WorkerInfo, on_put=self._put, on_delete=self._deleted,
            parse=lambda worker_id, value: _parse_worker(self.prefix + worker_id, value), skip_unchanged=True)
        self._closed = False

    @classmethod
    async def open(cls, plane: ControlPlane, role: str) -> WorkerWatch:
        watch = cls(plane, role)
        await watch._view.start()
        watch._known = dict(watch._view.items)
        watch.snapshot = dict(watch._known)
        assert watch._view.task is not None
        watch._view.task.add_done_callback(lambda _: watch._queue.put_nowait(None))  # the plane closed
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
        await self._view.stop()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> WorkerWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _put(self, worker_id: str, info: WorkerInfo) -> None:
        kind = WorkerEventKind.ADDED if worker_id not in self._known else WorkerEventKind.UPDATED
        self._known[worker_id] = info
        self._queue.put_nowait(WorkerEvent(kind, self.role, worker_id, info))

    def _deleted(self, worker_id: str) -> None:
        old = self._known.pop(worker_id, None)
        self._queue.put_nowait(WorkerEvent(WorkerEventKind.REMOVED, self.role, worker_id, old))


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
        self._watch = await WorkerWatch.open(self.plane, self.role)
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
