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
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from engine.async_engine import EngineLoad
from engine.request import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams
from router import policy
from router.metrics import (
    DECISION_SECONDS,
    KV_INDEXED_BLOCKS,
    KV_OVERLAP_BLOCKS,
    PREFIX_HIT_RATE,
    ROUTE_DECISIONS,
    WORKER_FAILURES,
    WORKERS,
)
from router.routing import INFLIGHT_ROLE, Inflight, RouterInflight, Ticket, TierRouting, sum_peers
from runtime.convert import FINISH_FROM_PB, sampling_to_pb
from runtime.discovery import WorkerSet
from runtime.etcd import ControlPlane, WorkerEvent, WorkerEventKind
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.router")
_CLOSE_GRACE_S = 3600.0  # how long calls on a channel to a worker that left etcd may still run


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
    overlap_blocks: int = 0  # leading prompt blocks the worker that prefills holds (per the KV index)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutePlan:
    """Where a request goes, decided before any call: its decode worker and, when the prompt is
    prefilled remotely, its prefill worker."""

    hashes: list[int]  # the prompt's chained block hashes (the decode tier's block size)
    decode: policy.Decision
    prefill: policy.Decision | None


def delta_from_pb(out: pb.SequenceOutput) -> Delta:
    logprobs = [TokenLogprob(t, lp.logprob, {x.token_id: x.logprob for x in lp.top})
                for t, lp in zip(out.token_ids, out.logprobs)]
    which = out.WhichOneof("stop_reason")
    stop = out.stop_str if which == "stop_str" else (out.stop_token_id if which == "stop_token_id" else None)
    return Delta(out.index, list(out.token_ids), logprobs, FINISH_FROM_PB[out.finish_reason], stop)


class WorkerPool:
    """One tier's live workers: gRPC stubs, the routers' in-flight accounting (this router's
    own, and its peers' as they publish it), and the load each worker publishes in etcd."""

    def __init__(self, plane: ControlPlane, role: str) -> None:
        self.plane = plane
        self.role = role
        self.workers = WorkerSet(plane, role, on_event=self._on_event)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.WorkerServiceStub] = {}
        self.inflight: dict[str, Inflight] = {}  # this router's, per worker
        self.peer_inflight: dict[str, Inflight] = {}  # the other routers', as last published
        self.reported: dict[str, dict[str, float]] = {}
        self.listeners: list[Callable[[WorkerEvent], None]] = []  # called on every membership change
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

    def loads(self, ids: list[str], block_size: int = 16) -> list[policy.WorkerLoad]:
        inflight = {w: self.inflight.get(w, Inflight()).add(self.peer_inflight.get(w, Inflight())).as_tuple()
                    for w in ids}
        return policy.loads_of(ids, inflight, self.reported, block_size)

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

    def open(self, worker_id: str, prefill_tokens: int, kv_tokens: int = 0) -> Ticket:
        """Count a request on the worker until ``ticket.close()``: ``prefill_tokens`` until
        ``ticket.prefilled()``, ``kv_tokens`` (growing with ``ticket.grow``) until it ends."""
        return Ticket(worker_id, self.inflight.setdefault(worker_id, Inflight()), prefill_tokens, kv_tokens)

    @contextlib.contextmanager
    def track(self, worker_id: str, prefill_tokens: int, kv_tokens: int = 0):
        """:meth:`open` for the duration of a ``with`` block."""
        ticket = self.open(worker_id, prefill_tokens, kv_tokens)
        try:
            yield ticket
        finally:
            ticket.close()

    def _on_event(self, event: WorkerEvent) -> None:
        if event.kind is WorkerEventKind.REMOVED or event.kind is WorkerEventKind.UPDATED:
            self._stubs.pop(event.worker_id, None)
            channel = self._channels.pop(event.worker_id, None)
            if channel is not None:
                # A drained worker leaves etcd first and then finishes what it serves (a dead one's
                # calls fail on their own): close the channel without cutting its calls short.
                asyncio.get_running_loop().create_task(channel.close(grace=_CLOSE_GRACE_S))
        if event.kind is WorkerEventKind.REMOVED:
            self.reported.pop(event.worker_id, None)
            self._suspect.pop(event.worker_id, None)
            entry = self.inflight.get(event.worker_id)
            if entry is not None and not entry.num_requests:
                del self.inflight[event.worker_id]
            with contextlib.suppress(KeyError):
                PREFIX_HIT_RATE.remove(self.role, event.worker_id)
            log.info("%s worker %s left", self.role, event.worker_id)
        elif event.kind is WorkerEventKind.ADDED:
            log.info("%s worker %s joined at %s", self.role, event.worker_id,
                     event.info.endpoint if event.info else "?")
        for listener in self.listeners:
            listener(event)

    async def _poll_metrics(self) -> None:
        while True:
            try:
                metrics = await self.plane.get_metrics(self.role, EngineLoad)
                self.reported = {wid: vars(m) for wid, m in metrics.items()}
                for wid, m in metrics.items():
                    if m.num_prompt_tokens and wid in self.workers:
                        PREFIX_HIT_RATE.labels(self.role, wid).set(m.num_cached_tokens / m.num_prompt_tokens)
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
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self.routing = {pool.role: TierRouting(pool.role, cfg.block_size, cfg.kv_events, cfg.kv_index_ttl_s)
                        for pool in (self.decode, self.prefill)}
        self._turns = {"decode": 0, "prefill": 0}  # round_robin
        self._sharing: asyncio.Task | None = None

    async def start(self) -> None:
        for pool in (self.decode, self.prefill):
            await pool.start()
            pool.listeners.append(lambda _event, pool=pool: self._follow(pool))
            self._follow(pool)
            KV_INDEXED_BLOCKS.labels(pool.role).set_function(
                lambda pool=pool: self.routing[pool.role].num_indexed_blocks)
        self._sharing = asyncio.create_task(self._share_inflight())

    async def stop(self) -> None:
        if self._sharing is not None:
            self._sharing.cancel()
        for tier in self.routing.values():
            await tier.stop()
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
        plan = self._plan(prompt_ids, sampling.n)
        DECISION_SECONDS.observe(time.perf_counter() - t0)
        # The request counts on its decode worker from the decision on, not from the call: while
        # its prompt prefills remotely the worker is already bound to it, and the decisions taken
        # meanwhile must see that (a burst would otherwise all pick the same idle-looking worker).
        ticket = self.decode.open(plan.decode.worker_id, 0 if plan.prefill is not None else
                                  self._decode_prefill_tokens(prompt_ids, plan.decode), len(prompt_ids))
        tried: set[str] = set()
        streamed = False
        try:
            route.overlap_blocks = (plan.prefill or plan.decode).overlap_blocks
            if plan.prefill is not None:
                first = await self._prefill(request_id, prompt_ids, worker_sampling, priority, route, plan.prefill)
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
            decision: policy.Decision | None = plan.decode
            while True:
                if decision is None:  # a retry: the next best of the others
                    # -1: with a handle the decode worker computes no prompt token; without, all it lacks
                    decision = self._choose(self.decode, prompt_ids, plan.hashes, self.decode.ids(exclude=tried),
                                            -1 if handle is not None else None)
                if decision is None:
                    raise (WorkerFailedError if tried else NoWorkersError)("no decode worker is available")
                worker = decision.worker_id
                tried.add(worker)
                route.decode_worker = worker
                route.num_retries = len(tried) - 1
                to_compute = 0 if handle is not None else self._decode_prefill_tokens(prompt_ids, decision)
                if ticket.worker_id != worker or ticket.prefill_tokens != to_compute:
                    # a retry elsewhere, or the remote prefill failed and this worker computes the prompt
                    ticket.close()
                    ticket = self.decode.open(worker, to_compute, len(prompt_ids))
                decision = None
                call = self.decode.stub(worker).Generate(request)
                try:
                    async for msg in call:
                        if msg.HasField("pull"):
                            route.recomputed = msg.pull.recomputed
                        for out in msg.outputs:
                            streamed = True
                            ticket.prefilled()
                            ticket.grow(len(out.token_ids))
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
            ticket.close()
            if handle is not None and not streamed:
                # Nobody will pull: give the prefill worker its blocks back now, not at lease end.
                asyncio.get_running_loop().create_task(self._unpin(handle))

    # ---- routing (no I/O) ----------------------------------------------------------------------
    def _plan(self, prompt_ids: list[int], n: int) -> RoutePlan:
        """DESIGN.md steps 1-2: the prompt's block hashes; the decode worker D by cost; then a
        remote prefill only if the tokens D would still compute exceed max_local_prefill_tokens
        and the prefill tier is not saturated (n > 1 prefills where it decodes); P by cost."""
        decode_ids = self.decode.ids()
        if not decode_ids:
            raise NoWorkersError("no decode worker is available")
        decode_tier = self.routing["decode"]
        hashes = decode_tier.hashes(prompt_ids)
        prefill_ids = self.prefill.ids() if self.cfg.mode == "disaggregated" and n == 1 else []
        max_local = None  # every decode worker prefills locally
        if prefill_ids and not policy.prefill_saturated(self.prefill.loads(prefill_ids),
                                                        self.prefill_queue_limit_tokens):
            max_local = self.cfg.max_local_prefill_tokens
        decode = self._choose(self.decode, prompt_ids, hashes, decode_ids, max_local)
        assert decode is not None
        prefill = None
        if not decode.local_prefill:
            prefill_tier = self.routing["prefill"]
            prefill_hashes = hashes if prefill_tier.block_size == decode_tier.block_size else \
                prefill_tier.hashes(prompt_ids)
            prefill = self._choose(self.prefill, prompt_ids, prefill_hashes, prefill_ids, None)
        return RoutePlan(hashes, decode, prefill)

    def _decode_prefill_tokens(self, prompt_ids: list[int], decision: policy.Decision) -> int:
        """Prompt tokens the decode worker computes when it prefills the prompt itself."""
        return len(prompt_ids) - decision.overlap_blocks * self.routing["decode"].block_size

    def _choose(self, pool: WorkerPool, prompt_ids: list[int], hashes: list[int], ids: list[str],
                max_local_prefill_tokens: int | None) -> policy.Decision | None:
        """One tier's worker by the configured policy; records the decision in the tier's
        index of routed prompts."""
        tier = self.routing[pool.role]
        turn = self._turns[pool.role]
        self._turns[pool.role] = turn + 1
        decision = policy.choose(
            self.cfg.routing_policy, len(prompt_ids), tier.overlaps(hashes), pool.loads(ids, tier.block_size),
            tier.block_size, prefill_load_scale=self.cfg.prefill_load_scale, temperature=self.cfg.router_temperature,
            max_local_prefill_tokens=max_local_prefill_tokens, turn=turn, rng=self.rng)
        if decision is not None:
            tier.record(decision.worker_id, hashes)
            KV_OVERLAP_BLOCKS.labels(pool.role).observe(decision.overlap_blocks)
        return decision

    def _follow(self, pool: WorkerPool) -> None:
        """The tier's workers changed: follow their KV events (block size from their registration)."""
        self.routing[pool.role] = self.routing[pool.role].adopt(pool.workers.workers)
        self.routing[pool.role].sync(pool.workers.workers)

    async def _share_inflight(self) -> None:
        """Publish this router's in-flight load per worker; read the other replicas'."""
        while True:
            try:
                mine = {pool.role: {w: list(e.as_tuple()) for w, e in pool.inflight.items() if e.num_requests}
                        for pool in (self.decode, self.prefill)}
                await self.plane.put_metrics(INFLIGHT_ROLE, self.router_id, RouterInflight(self.router_id, mine))
                peers = sum_peers(await self.plane.get_metrics(INFLIGHT_ROLE, RouterInflight), self.router_id)
                for pool in (self.decode, self.prefill):
                    pool.peer_inflight = peers.get(pool.role, {})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd hiccup: keep the last known peers
                log.debug("in-flight sharing failed: %r", e)
            await asyncio.sleep(self.cfg.metrics_interval_s)

    # ---- worker calls ----------------------------------------------------------------------------
    async def _prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int,
                       route: Route, decision: policy.Decision) -> pb.PrefillResponse | None:
        """Prefill on the chosen prefill worker; None (prefill locally) if it fails."""
        worker = decision.worker_id
        route.prefill_worker = worker
        req = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                sampling=sampling_to_pb(sampling), priority=priority)
        to_compute = len(prompt_ids) - decision.overlap_blocks * self.routing["prefill"].block_size
        try:
            with self.prefill.track(worker, to_compute, len(prompt_ids)):
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
