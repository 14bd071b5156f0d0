"""The router's request flow (DESIGN.md, "Request life in disaggregated mode"), independent of
the client protocol: the OpenAI HTTP API and the KServe gRPC API both call
:meth:`RouterCore.generate` with token ids and sampling parameters and get token deltas back.

Failure handling: a prefill worker that fails makes the request prefill on its decode worker;
a decode worker that fails before it streamed anything is retried on another one; one that
fails mid-stream ends the request with :class:`WorkerFailedError` (the client gets a clean
error). Closing the delta stream (a client disconnect) cancels the worker calls, which abort
the request there and free its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import grpc

from engine.async_engine import EngineLoad
from engine.request import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams
from router import policy
from router.metrics import ROUTE_DECISIONS, WORKER_FAILURES, WORKERS
from runtime.convert import FINISH_FROM_PB, sampling_to_pb
from runtime.discovery import WorkerSet
from runtime.etcd import ControlPlane, WorkerEvent, WorkerEventKind
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.router")


class NoWorkersError(RuntimeError):
    """No worker of a needed tier is registered (HTTP 503)."""


class WorkerFailedError(RuntimeError):
    """A worker died or failed while serving the request (HTTP 502 / stream error)."""


class InvalidRequestError(ValueError):
    """A worker rejected the request's parameters (HTTP 400)."""


@dataclass
class Delta:
    """New tokens of one of the request's sequences."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None


@dataclass
class Usage:
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Route:
    decode_worker: str = ""
    prefill_worker: str = ""  # empty: prefilled on the decode worker
    recomputed: bool = False  # the KV pull failed and the decode worker prefilled itself
    num_retries: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


def delta_from_pb(out: pb.SequenceOutput) -> Delta:
    logprobs = [TokenLogprob(t, lp.logprob, {x.token_id: x.logprob for x in lp.top})
                for t, lp in zip(out.token_ids, out.logprobs)]
    which = out.WhichOneof("stop_reason")
    stop = out.stop_str if which == "stop_str" else (out.stop_token_id if which == "stop_token_id" else None)
    return Delta(out.index, list(out.token_ids), logprobs, FINISH_FROM_PB[out.finish_reason], stop)


class WorkerPool:
    """One tier's live workers: gRPC stubs, this router's in-flight accounting, and the load
    each worker publishes in etcd."""

    def __init__(self, plane: ControlPlane, role: str) -> None:
        self.plane = plane
        self.role = role
        self.workers = WorkerSet(plane, role, on_event=self._on_event)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.WorkerServiceStub] = {}
        self.inflight: dict[str, list[int]] = {}  # worker -> [requests, prompt tokens to prefill]
        self.reported: dict[str, dict[str, float]] = {}
        self._suspect: dict[str, float] = {}  # worker -> monotonic time until which it is skipped
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.workers.start()
        WORKERS.labels(role=self.role).set_function(lambda: len(self.workers))
        self._poller = asyncio.create_task(self._poll_metrics())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.workers.stop()
        for channel in self._channels.values():
            await channel.close()

    def ids(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        now = time.monotonic()
        return [w for w in self.workers.workers if w not in exclude and self._suspect.get(w, 0) < now]

    def loads(self, ids: list[str]) -> list[policy.WorkerLoad]:
        return policy.loads_of(ids, {k: (v[0], v[1]) for k, v in self.inflight.items()}, self.reported)

    def stub(self, worker_id: str) -> pb_grpc.WorkerServiceStub:
        stub = self._stubs.get(worker_id)
        if stub is None:
            info = self.workers.get(worker_id)
            if info is None:
                raise WorkerFailedError(f"{self.role} worker {worker_id} is gone")
            channel = self._channels[worker_id] = grpc.aio.insecure_channel(info.endpoint)
            stub = self._stubs[worker_id] = pb_grpc.WorkerServiceStub(channel)
        return stub

    def suspect(self, worker_id: str, for_s: float = 5.0) -> None:
        """Skip a worker that just failed until etcd confirms it gone (or the time passes)."""
        self._suspect[worker_id] = time.monotonic() + for_s
        WORKER_FAILURES.labels(role=self.role).inc()

    @contextlib.contextmanager
    def track(self, worker_id: str, prefill_tokens: int):
        entry = self.inflight.setdefault(worker_id, [0, 0])
        entry[0] += 1
        entry[1] += prefill_tokens
        try:
            yield entry
        finally:
            entry[0] -= 1
            entry[1] -= prefill_tokens

    def _on_event(self, event: WorkerEvent) -> None:
        if event.kind is WorkerEventKind.REMOVED or event.kind is WorkerEventKind.UPDATED:
            self._stubs.pop(event.worker_id, None)
            channel = self._channels.pop(event.worker_id, None)
            if channel is not None:
                asyncio.get_running_loop().create_task(channel.close(grace=5.0))
        if event.kind is WorkerEventKind.REMOVED:
            self.reported.pop(event.worker_id, None)
            self._suspect.pop(event.worker_id, None)
            log.info("%s worker %s left", self.role, event.worker_id)
        elif event.kind is WorkerEventKind.ADDED:
            log.info("%s worker %s joined at %s", self.role, event.worker_id,
                     event.info.endpoint if event.info else "?")

    async def _poll_metrics(self) -> None:
        while True:
            try:
                metrics = await self.plane.get_metrics(self.role, EngineLoad)
                self.reported = {wid: vars(m) for wid, m in metrics.items()}
            except Exception as e:  # etcd hiccup: keep the last known loads
                log.debug("metrics poll failed: %r", e)
            await asyncio.sleep(1.0)


class RouterCore:
    def __init__(self, cfg: ClusterConfig, plane: ControlPlane) -> None:
        self.cfg = cfg
        self.plane = plane
        self.decode = WorkerPool(plane, "decode")
        self.prefill = WorkerPool(plane, "prefill")
        self.rng = random.Random()
        self.prefill_queue_limit_tokens = 8 * max(cfg.max_num_batched_tokens, 1)

    async def start(self) -> None:
        await self.decode.start()
        await self.prefill.start()

    async def stop(self) -> None:
        await self.decode.stop()
        await self.prefill.stop()

    def ready(self) -> bool:
        return bool(self.decode.ids())

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       priority: int = 0, route: Route | None = None) -> AsyncIterator[Delta | Usage]:
        """Stream the request's deltas, then one :class:`Usage`. Stop strings are the caller's
        business: it closes the stream when it sees one (that aborts the request upstream)."""
        route = route or Route()
        worker_sampling = replace(sampling, stop=())  # stop strings are matched on the router's text
        t0 = time.perf_counter()
        handle = None
        first: pb.PrefillResponse | None = None
        decode_ids = self.decode.ids()
        if not decode_ids:
            raise NoWorkersError("no decode worker is available")
        prefill_ids = self.prefill.ids() if self.cfg.mode == "disaggregated" else []
        saturated = policy.prefill_saturated(self.prefill.loads(prefill_ids), self.prefill_queue_limit_tokens)
        if prefill_ids and policy.prefill_remotely(len(prompt_ids), self.cfg.max_local_prefill_tokens, saturated,
                                                   sampling.n):
            first = await self._prefill(request_id, prompt_ids, worker_sampling, priority, route)
        ROUTE_DECISIONS.labels(path="remote" if first is not None else "local").inc()
        if first is not None:
            route.timings_ms["prefill"] = (time.perf_counter() - t0) * 1000
            delta = delta_from_pb(first.outputs[0])
            yield delta
            if delta.finish_reason is not None or not first.HasField("handle"):
                u = first.usage
                yield Usage(u.num_prompt_tokens, u.num_completion_tokens, u.num_cached_tokens)
                return
            handle = first.handle
        request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                     sampling=sampling_to_pb(worker_sampling), priority=priority)
        if handle is not None:
            request.kv_handle.CopyFrom(handle)
        tried: set[str] = set()
        streamed = False
        try:
            while True:
                ids = self.decode.ids(exclude=tried)
                worker = policy.least_loaded(self.decode.loads(ids), self.rng)
                if worker is None:
                    raise (WorkerFailedError if tried else NoWorkersError)("no decode worker is available")
                tried.add(worker)
                route.decode_worker = worker
                route.num_retries = len(tried) - 1
                call = self.decode.stub(worker).Generate(request)
                try:
                    with self.decode.track(worker, 0 if handle is not None else len(prompt_ids)):
                        async for msg in call:
                            if msg.HasField("pull"):
                                route.recomputed = msg.pull.recomputed
                            for out in msg.outputs:
                                streamed = True
                                yield delta_from_pb(out)
                            if msg.HasField("usage"):
                                u = msg.usage
                                extra = first.usage.num_completion_tokens if first is not None else 0
                                cached = first.usage.num_cached_tokens if first is not None else u.num_cached_tokens
                                yield Usage(u.num_prompt_tokens, u.num_completion_tokens + extra, cached)
                                handle = None
                                return
                    raise WorkerFailedError(f"decode worker {worker} ended the stream early")
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidRequestError(e.details()) from None
                    if e.code() == grpc.StatusCode.CANCELLED:
                        raise
                    self.decode.suspect(worker)
                    log.warning("request %s: decode worker %s failed: %s %s", request_id, worker,
                                e.code().name, e.details())
                    if streamed:
                        raise WorkerFailedError(f"decode worker {worker} failed mid-stream: {e.code().name}") from None
                finally:
                    call.cancel()
        finally:
            if handle is not None and not streamed:
                # Nobody will pull: give the prefill worker its blocks back now, not at lease end.
                asyncio.get_running_loop().create_task(self._unpin(handle))

    async def _prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int,
                       route: Route) -> pb.PrefillResponse | None:
        """Prefill on the least-loaded prefill worker; None (prefill locally) if it fails."""
        worker = policy.least_loaded(self.prefill.loads(self.prefill.ids()), self.rng)
        if worker is None:
            return None
        route.prefill_worker = worker
        req = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                sampling=sampling_to_pb(sampling), priority=priority)
        try:
            with self.prefill.track(worker, len(prompt_ids)):
                return await self.prefill.stub(worker).Prefill(req)
        except asyncio.CancelledError:
            # The client left. The worker aborts the cancelled call, but its answer (a pinned
            # KV handle) may already be on the way: abort it there too rather than wait for its lease.
            asyncio.get_running_loop().create_task(self._abort(self.prefill, worker, request_id))
            raise
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details()) from None
            self.prefill.suspect(worker)
            log.warning("request %s: prefill worker %s failed (%s); prefilling on the decode tier",
                        request_id, worker, e.code().name)
            route.prefill_worker = ""
            return None

    async def _abort(self, pool: WorkerPool, worker_id: str, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, WorkerFailedError):
            await pool.stub(worker_id).Abort(pb.AbortRequest(request_id=request_id), timeout=2.0)

    async def _unpin(self, handle: pb.KVHandle) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, WorkerFailedError):
            await self.prefill.stub(handle.worker_id).Unpin(pb.UnpinRequest(handle_id=handle.handle_id), timeout=2.0)
