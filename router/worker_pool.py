"""One tier's live workers, as the router sees them: their registrations (from etcd), gRPC stubs,
the routers' in-flight accounting on each (this router's own, and its peers' as they publish it),
and the load each worker publishes. Workers that just failed are skipped for a while."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import grpc

from protocol.load import EngineLoad
from router import policy
from router.errors import WorkerFailedError
from router.inflight import Inflight, Ticket
from router.metrics import (
    GPUS,
    PREFIX_HIT_RATE,
    WORKER_FAILURES,
    WORKER_KV_USAGE,
    WORKER_RUNNING,
    WORKER_WAITING,
    WORKERS,
)
from router.watchdog import Liveness
from runtime import keys
from runtime.convert import load_from_pb
from runtime.discovery import WorkerEvent, WorkerEventKind, WorkerInfo, WorkerSet
from runtime.etcd import ControlPlane
from runtime.internal_grpc import PLAINTEXT, InternalGrpc
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.router")
_CLOSE_GRACE_S = 3600.0  # how long calls on a channel to a worker that left etcd may still run
_SUSPECT_S = 5.0
_LEFT_REMEMBERED = 1024  # endpoints of workers that left etcd, kept for the watchdog's probe
_PER_WORKER = (PREFIX_HIT_RATE, WORKER_KV_USAGE, WORKER_WAITING, WORKER_RUNNING)


class WorkerPool:
    """One tier's workers. ``model_name`` (set once the router knows the model it serves) keeps
    workers that registered another model out of :meth:`ids`."""

    def __init__(self, plane: ControlPlane, role: str, internal: InternalGrpc = PLAINTEXT) -> None:
        self.plane = plane
        self.role = role
        self.internal = internal  # how channels to the workers are made (mutual TLS or plaintext)
        self.workers = WorkerSet(plane, role, on_event=self._on_event)
        self.model_name: str | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.WorkerServiceStub] = {}
        self.inflight: dict[str, Inflight] = {}  # this router's, per worker
        self.peer_inflight: dict[str, Inflight] = {}  # the other routers', as last published
        self.reported: dict[str, EngineLoad] = {}  # what the workers publish
        self.listeners: list[Callable[[WorkerEvent], None]] = []  # called on every membership change
        self._suspect: dict[str, float] = {}  # worker -> monotonic time until which it is skipped
        self._left: OrderedDict[str, str] = OrderedDict()  # worker -> endpoint, of the last that left etcd
        self._liveness: dict[str, Liveness] = {}  # what the watchdog last heard from each worker
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.workers.start()
        WORKERS.labels(role=self.role).set_function(lambda: len(self.members()))
        GPUS.labels(role=self.role).set_function(self.num_gpus)
        WORKER_FAILURES.labels(role=self.role)  # exported from the start, at 0
        self._poller = asyncio.create_task(self._poll_loads())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.workers.stop()
        for channel in self._channels.values():
            await channel.close()

    def members(self) -> dict[str, WorkerInfo]:
        """The registered workers serving the router's model (all of them until it knows it)."""
        return {w: info for w, info in self.workers.workers.items()
                if self.model_name is None or info.model.name == self.model_name}

    def num_gpus(self) -> float:
        """GPUs the members hold, as they registered them (``WorkerInfo.num_gpus``)."""
        return float(sum(info.num_gpus for info in self.members().values()))

    def ids(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """The workers requests may go to: members, not excluded, not suspected."""
        now = time.monotonic()
        return [w for w in self.members() if w not in exclude and self._suspect.get(w, 0) < now]

    def loads(self, ids: list[str], block_size: int = 16) -> list[policy.WorkerLoad]:
        inflight = {w: self.inflight.get(w, Inflight()).add(self.peer_inflight.get(w, Inflight())) for w in ids}
        return policy.loads_of(ids, inflight, self.reported, block_size)

    def stub(self, worker_id: str) -> pb_grpc.WorkerServiceStub:
        stub = self._stubs.get(worker_id)
        if stub is None:
            info = self.workers.get(worker_id)
            if info is None:
                raise WorkerFailedError(f"{self.role} worker {worker_id} is gone")
            channel = self._channels[worker_id] = self.internal.channel(info.endpoint)
            stub = self._stubs[worker_id] = pb_grpc.WorkerServiceStub(channel)
        return stub

    def suspect(self, worker_id: str, for_s: float | None = None) -> None:
        """Skip a worker that just failed until etcd confirms it gone (or the time passes)."""
        self._suspect[worker_id] = time.monotonic() + (_SUSPECT_S if for_s is None else for_s)
        WORKER_FAILURES.labels(role=self.role).inc()

    def open(self, worker_id: str, prefill_tokens: int, kv_tokens: int = 0) -> Ticket:
        """Count a request on the worker until ``ticket.close()``: ``prefill_tokens`` until
        ``ticket.prefilled()``, ``kv_tokens`` (growing with ``ticket.grow``) until it ends."""
        return Ticket(worker_id, self.inflight.setdefault(worker_id, Inflight()), prefill_tokens, kv_tokens)

    @contextlib.contextmanager
    def track(self, worker_id: str, prefill_tokens: int, kv_tokens: int = 0) -> Iterator[Ticket]:
        """:meth:`open` for the duration of a ``with`` block."""
        ticket = self.open(worker_id, prefill_tokens, kv_tokens)
        try:
            yield ticket
        finally:
            ticket.close()

    def endpoint(self, worker_id: str) -> str | None:
        """Where the worker serves (or served, if it left etcd lately)."""
        info = self.workers.get(worker_id)
        return info.endpoint if info is not None else self._left.get(worker_id)

    def liveness(self, worker_id: str) -> Liveness:
        """What was last heard from the worker (every watched call to it shares one)."""
        live = self._liveness.get(worker_id)
        if live is None:
            live = self._liveness[worker_id] = Liveness()
        return live

    async def probe(self, worker_id: str, timeout_s: float, endpoint: str | None = None) -> bool:
        """Whether the worker answers ``Health`` within ``timeout_s`` (the hung-worker watchdog's
        check, ``router.watchdog``). A worker that has left etcd since its call began (a lease its
        keep-alives could not renew in time under load, a drain) is asked at ``endpoint``, where
        the call went: the question is whether the process answers, not whether it is registered."""
        try:
            if endpoint is None or self.workers.get(worker_id) is not None:
                await self.stub(worker_id).Health(pb.HealthRequest(), timeout=timeout_s)
            else:
                async with self.internal.channel(endpoint) as channel:
                    await pb_grpc.WorkerServiceStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        except (grpc.aio.AioRpcError, WorkerFailedError):
            return False
        return True

    async def abort(self, worker_id: str, request_id: str) -> None:
        """Best effort: stop a request on a worker (its blocks are freed there)."""
        with contextlib.suppress(grpc.aio.AioRpcError, WorkerFailedError):
            await self.stub(worker_id).Abort(pb.AbortRequest(request_id=request_id), timeout=2.0)

    async def unpin(self, handle: pb.KVHandle) -> None:
        """Best effort: give a prefill worker a KV handle's blocks back before its lease ends."""
        with contextlib.suppress(grpc.aio.AioRpcError, WorkerFailedError):
            await self.stub(handle.worker_id).Unpin(pb.UnpinRequest(request_id=handle.request_id), timeout=2.0)

    def _on_event(self, event: WorkerEvent) -> None:
        if event.kind is WorkerEventKind.REMOVED or event.kind is WorkerEventKind.UPDATED:
            self._stubs.pop(event.worker_id, None)
            channel = self._channels.pop(event.worker_id, None)
            if channel is not None:
                # A drained worker leaves etcd first and then finishes what it serves (a dead one's
                # calls fail on their own): close the channel without cutting its calls short.
                asyncio.get_running_loop().create_task(channel.close(grace=_CLOSE_GRACE_S))
        if event.kind is WorkerEventKind.REMOVED:
            if event.info is not None:
                self._left[event.worker_id] = event.info.endpoint
                while len(self._left) > _LEFT_REMEMBERED:
                    forgotten, _ = self._left.popitem(last=False)
                    if forgotten not in self.workers:
                        self._liveness.pop(forgotten, None)
            self.reported.pop(event.worker_id, None)
            self._suspect.pop(event.worker_id, None)
            entry = self.inflight.get(event.worker_id)
            if entry is not None and not entry.num_requests:
                del self.inflight[event.worker_id]
            for gauge in _PER_WORKER:
                with contextlib.suppress(KeyError):
                    gauge.remove(self.role, event.worker_id)
            log.info("%s worker %s left", self.role, event.worker_id)
        elif event.kind is WorkerEventKind.ADDED:
            log.info("%s worker %s joined at %s", self.role, event.worker_id,
                     event.info.endpoint if event.info else "?")
        for listener in self.listeners:
            listener(event)

    def _hear_steps(self, loads: dict[str, pb.Load], polled_s: float) -> None:
        """A worker whose published step count moved since the previous poll (begun at
        ``polled_s``) published after that poll read: it was alive then (the watchdog's evidence)."""
        for wid, new in loads.items():
            old = self.reported.get(wid)
            if old is not None and new.num_steps > old.num_steps:
                self.liveness(wid).heard(polled_s)

    async def _poll_loads(self) -> None:
        prefix = keys.metrics_prefix(self.plane.namespace, self.role)
        polled_s = -math.inf  # when the previous poll began
        while True:
            now_s = time.monotonic()
            try:
                loads = await self.plane.get_messages(prefix, pb.Load)
                self._hear_steps(loads, polled_s)
                polled_s = now_s
                # The loads and their gauges change together (no await between): /metrics and the
                # dashboard (router.dashboard reads ``reported``) show the same values.
                self.reported = {wid: load_from_pb(m) for wid, m in loads.items()}
                for wid, m in self.reported.items():
                    if wid not in self.workers:
                        continue
                    WORKER_KV_USAGE.labels(self.role, wid).set(m.kv_usage)
                    WORKER_WAITING.labels(self.role, wid).set(m.num_waiting + m.num_pulling)
                    WORKER_RUNNING.labels(self.role, wid).set(m.num_running)
                    if m.num_prompt_tokens:
                        PREFIX_HIT_RATE.labels(self.role, wid).set(m.num_cached_tokens / m.num_prompt_tokens)
            except Exception as e:  # etcd hiccup: keep the last known loads
                log.debug("load poll failed: %r", e)
            await asyncio.sleep(1.0)
