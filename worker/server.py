"""What both worker tiers share: the gRPC servicer base (Health, Abort, Drain, KV events) and
the process life of a worker (engine, KV transport, gRPC server, etcd registration, metrics,
graceful shutdown). ``prefill_worker`` and ``decode_worker`` add their own RPCs.

A worker prints one line ``TANDEM_READY {json}`` on stdout once it serves and is registered,
so a launcher can wait for it without polling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, bytes_per_block
from engine.llm_engine import LLMEngine, default_num_threads
from kv_transfer import KVTransport, make_transport
from protocol.outputs import RequestOutput
from runtime import metric_catalog as mc
from runtime import settings
from runtime.convert import event_to_pb, load_to_pb
from runtime.discovery import WorkerInfo
from runtime.etcd import ControlPlane
from runtime.internal_grpc import InternalGrpc
from runtime.metrics import serve_metrics
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from runtime.signals import stop_on_signals
from worker.membership import Membership
from worker.step_stats import StepWindow
from worker.wire_guard import MalformedRequests

log = logging.getLogger("tandem.worker")

ROLE_TO_PB = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class WorkerIdentity:
    role: str
    worker_id: str
    endpoint: str
    model: str
    block_size: int


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """The RPCs every worker serves. Subclasses add Prefill/Unpin (prefill) or Generate (decode)."""

    membership: Membership | None = None  # its etcd presence, once registered

    def __init__(self, identity: WorkerIdentity, engine: AsyncEngine, transport: KVTransport | None) -> None:
        self.identity = identity
        self.engine = engine
        self.transport = transport
        self.status = pb.WORKER_STATUS_SERVING
        self.on_drain: list = []  # callbacks (async) run once when a drain starts

    # ---- shared RPCs -------------------------------------------------------------------------
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        ident = self.identity
        return pb.HealthResponse(status=self.status, worker_id=ident.worker_id, role=ROLE_TO_PB[ident.role],
                                 model=ident.model, block_size=ident.block_size, load=load_to_pb(self.engine.load))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        rid = request.request_id

        def abort(e: LLMEngine) -> bool:
            # Blocks held for a KV handle are the prefill tier's to release (prefill_worker.held).
            known = e.has_request(rid) and rid not in e.scheduler.pinned
            e.abort(rid)
            return known

        # Shielded: the abort happens even if the caller's deadline passes while a long step runs.
        return pb.AbortResponse(aborted=await asyncio.shield(self.engine.call(abort)))

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        if self.status != pb.WORKER_STATUS_DRAINING:
            self.status = pb.WORKER_STATUS_DRAINING
            for callback in self.on_drain:
                await callback()
        deadline = time.monotonic() + request.wait_ms / 1000
        while not self._idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return pb.DrainResponse(drained=self._idle(), load=load_to_pb(self.engine.load))

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.KVEventsResponse]:
        cursor = request.from_event_id
        next_id = await self.engine.call(lambda e: e.next_kv_event_id)
        if cursor > next_id:  # a subscriber of an earlier process of this worker
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"event {cursor} is beyond this worker's next event {next_id}; take a KVSnapshot")
        while True:
            events = await self.engine.wait_events(cursor - 1, timeout_s=5.0)
            if events and events[0].event_id > cursor:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                    f"event {cursor} is no longer retained; take a KVSnapshot")
            if events:
                cursor = events[-1].event_id + 1
                yield pb.KVEventsResponse(events=[event_to_pb(ev) for ev in events])

    async def KVSnapshot(self, request: pb.KVSnapshotRequest, context: grpc.aio.ServicerContext
                         ) -> pb.KVSnapshotResponse:
        (blocks, next_id), host = await self.engine.call(lambda e: (e.kv_snapshot(), e.kv_host_snapshot()))
        return pb.KVSnapshotResponse(
            blocks=[pb.CachedBlock(block_hash=h, parent_hash=p) for h, p in blocks]
            + [pb.CachedBlock(block_hash=h, parent_hash=p, medium=pb.KV_MEDIUM_HOST) for h, p in host],
            next_event_id=next_id, worker_id=self.identity.worker_id, block_size=self.identity.block_size)

    # ---- hooks for the tiers ---------------------------------------------------------------------
    def configure(self, cfg: settings.ClusterConfig) -> None:
        self.cfg = cfg

    async def run_background(self) -> None:
        """Background duties of the tier (the prefill tier reaps expired KV holds)."""
        await asyncio.Event().wait()

    # ---- helpers -------------------------------------------------------------------------------
    def accepting(self) -> bool:
        return self.status == pb.WORKER_STATUS_SERVING

    def state(self) -> str:
        """What its step summary says: serving or draining (a switchable worker also switching)."""
        return "serving" if self.accepting() else "draining"

    def _idle(self) -> bool:
        load = self.engine.load
        return not (load.num_waiting or load.num_running or load.num_pulling or load.num_pinned_blocks)


# ---- the process ------------------------------------------------------------------------------
def kv_gpu_share(cfg: settings.ClusterConfig) -> float:
    """The part of its GPU a worker's KV cache sizes itself to (``kv_cache_gib`` 0): the configured
    ``gpu_memory_fraction``, else 0.9 of the part of a GPU it reserves (a fractional
    ``num_gpus_per_worker``: workers Ray packs on one GPU), else 0.9."""
    if cfg.gpu_memory_fraction:
        return cfg.gpu_memory_fraction
    return settings.AUTO_GPU_MEMORY_FRACTION * (cfg.gpus_per_worker if 0 < cfg.gpus_per_worker < 1 else 1.0)


def engine_config(cfg: settings.ClusterConfig, role: str = "decode") -> EngineConfig:
    kv_cache_gib = cfg.prefill_kv_cache_gib if role == "prefill" and cfg.prefill_kv_cache_gib else cfg.kv_cache_gib
    return EngineConfig(
        model=cfg.model or "default", dtype=cfg.dtype, device=cfg.device, backend=cfg.engine,
        sim_profile=cfg.sim_profile,
        async_scheduling={"auto": None, "on": True, "off": False}[cfg.async_scheduling],
        num_threads=cfg.threads or (default_num_threads() if cfg.device == "cpu" else None),
        num_prefill_threads=cfg.prefill_threads or None,
        num_idle_prefill_threads=cfg.idle_prefill_threads or None, cpu_share_dir=cfg.cpu_share_dir,
        cache=CacheConfig(block_size=cfg.block_size, memory_bytes=int(kv_cache_gib * (1 << 30)),
                          enable_prefix_caching=cfg.enable_prefix_caching,
                          gpu_memory_fraction=kv_gpu_share(cfg),
                          host_memory_bytes=int(cfg.host_kv_cache_gib * (1 << 30))),
        scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.step_tokens(role),
                                  joining_prefill_tokens=cfg.joining_prefill_tokens if role == "decode" else 0),
        gpu_share=role if cfg.gpu_share and cfg.mode == "disaggregated" else "",
        batch_invariant=cfg.batch_invariant,
    )


def build_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {role}_worker", description=f"tandem {role} worker")
    settings.add_arguments(parser)
    parser.add_argument("--worker-id", default=None, help="unique id (default: role + random suffix)")
    parser.add_argument("--worker-port", type=int, default=0, help="gRPC port of this worker (0: any free)")
    return parser


ServicerFactory = Callable[[WorkerIdentity, AsyncEngine, KVTransport], WorkerServicer]


async def serve_worker(role: str, servicer_cls: ServicerFactory, argv: list[str] | None = None) -> int:
    """``servicer_cls``: a servicer class of one tier, or any factory of a servicer
    (``deploy.switchable_worker`` builds one that serves both tiers and switches)."""
    args = build_parser(role).parse_args(argv)
    cfg = settings.from_args(args)
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    worker_id = args.worker_id or f"{role}-{uuid.uuid4().hex[:8]}"
    if not cfg.etcd_endpoints:
        raise SystemExit("a worker needs --etcd-endpoints (tandem serve starts etcd and passes them)")

    econfig = engine_config(cfg, role)
    llm, engine, transport, store = await _start_engine(cfg, econfig)

    server = grpc.aio.server(interceptors=[MalformedRequests()],
                             options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    port = InternalGrpc.from_config(cfg).add_port(server, f"{cfg.host}:{args.worker_port}")
    if port == 0:
        raise SystemExit(f"cannot bind {cfg.host}:{args.worker_port}")
    endpoint = f"{cfg.host}:{port}"
    card = llm.model_card(cfg.served_model_name)
    identity = WorkerIdentity(role, worker_id, endpoint, card.name, econfig.cache.block_size)
    servicer = servicer_cls(identity, engine, transport)
    servicer.configure(cfg)
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    await server.start()

    REGISTRY.register(LoadCollector(engine))
    metrics = serve_metrics(REGISTRY, port=cfg.metrics_port, host=cfg.host)
    plane = ControlPlane.from_config(cfg)
    await plane.connect()
    info = WorkerInfo(
        worker_id=worker_id, role=role, endpoint=endpoint, model=card, block_size=econfig.cache.block_size,
        transport_metadata=transport.metadata(), metrics_url=metrics.url,
        pid=os.getpid(), started_at_unix_ms=int(time.time() * 1000), num_gpus=cfg.gpus_per_worker,
    )
    membership = servicer.membership = Membership(plane, info, lambda: engine.load, cfg.metrics_interval_s)
    await membership.join()
    servicer.on_drain.append(membership.deregister)
    membership.publish_steps(StepWindow(worker_id, econfig.cache.block_size, lambda: engine.load,
                                       lambda: servicer.identity.role, servicer.state))
    print("TANDEM_READY " + json.dumps({"role": role, "worker_id": worker_id, "endpoint": endpoint,
                                        "metrics": metrics.url, "pid": os.getpid()}), flush=True)
    log.info("%s worker %s serving on %s", role, worker_id, endpoint)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)
    background = [asyncio.create_task(servicer.run_background())]

    async def watch_engine() -> None:
        while engine.dead is None:
            await asyncio.sleep(0.2)
        stop.set()

    background.append(asyncio.create_task(watch_engine()))
    await stop.wait()
    log.info("shutting down")
    with contextlib.suppress(Exception):
        await membership.deregister()
    # Idle, only the routers' KV event streams are open: no grace for them (an exit within a
    # second of SIGTERM); in-flight requests get 2 s to finish.
    await server.stop(grace=None if servicer._idle() else 2.0)
    for task in background:
        task.cancel()
    with contextlib.suppress(Exception):
        await plane.close()
    await engine.stop()
    if (share := llm.gpu_share) is not None:
        log.info("GPU shared as %s: %d steps held, %d prefill layers held back for %.1f ms", share.role,
                 share.num_holds, share.num_waits, share.wait_s * 1000)
    transport.close()
    if store is not None:
        store.close()
    metrics.stop()
    return 1 if engine.dead is not None else 0


async def _start_engine(cfg: settings.ClusterConfig, econfig: EngineConfig
                        ) -> tuple[LLMEngine, AsyncEngine, KVTransport, Any]:
    """The engine, running on its thread, and the KV transport with its cache registered (and
    the etcd-backed store NCCL pairs meet through, or None)."""
    log.info("loading %s (%s on %s)", econfig.model, econfig.dtype, econfig.device)
    if cfg.gpu_memory_fraction and cfg.device.startswith("cuda"):
        import torch

        device = torch.device(cfg.device)
        torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction,
                                                   device.index if device.index is not None else 0)
    llm = await asyncio.to_thread(LLMEngine, econfig, True)
    blocks, size = llm.runner.num_blocks, econfig.cache.block_size
    gib = blocks * bytes_per_block(llm.arch, size, llm.runner.dtype.itemsize) / (1 << 30)
    log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB%s)", blocks, size, blocks * size, gib,
             ", sized from the device" if not econfig.cache.memory_bytes else "")
    engine = AsyncEngine(llm)
    engine.start()
    store = None
    if cfg.transport in ("nccl", "auto"):  # NCCL pairs meet in etcd
        from worker.etcd_store import EtcdStore

        store = await asyncio.to_thread(EtcdStore, cfg)
    transport = make_transport(cfg.transport, model=econfig.model, **({"store": store} if store else {}))
    transport.register(llm.kv_cache)
    return llm, engine, transport, store


class LoadCollector(Collector):
    """The engine's load as Prometheus samples (``runtime.metric_catalog``'s worker gauges and
    counters), read at scrape time."""

    _GAUGES = ((mc.WORKER_WAITING, "num_waiting"), (mc.WORKER_RUNNING, "num_running"),
               (mc.WORKER_PULLING, "num_pulling"), (mc.WORKER_QUEUED_PREFILL, "num_queued_prefill_tokens"),
               (mc.WORKER_FREE_BLOCKS, "num_free_blocks"), (mc.WORKER_PINNED_BLOCKS, "num_pinned_blocks"),
               (mc.WORKER_KV_USAGE, "kv_usage"))
    _COUNTERS = ((mc.WORKER_PROMPT_TOKENS, "num_prompt_tokens"), (mc.WORKER_CACHED_TOKENS, "num_cached_tokens"),
                 (mc.WORKER_STEPS, "num_steps"))

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        load = self.engine.load
        for metric, field in self._GAUGES:
            yield GaugeMetricFamily(metric.name, metric.help, value=float(getattr(load, field)))
        for metric, field in self._COUNTERS:
            yield CounterMetricFamily(metric.name.removesuffix("_total"), metric.help,
                                      value=float(getattr(load, field)))
        # The host KV tier, read from the engine itself (a few ints; 0 where it is off).
        host = self.engine.engine.host_tier_counts()
        for metric, value in ((mc.WORKER_HOST_KV_BLOCKS, host.num_slots), (mc.WORKER_HOST_KV_USED, host.num_used)):
            yield GaugeMetricFamily(metric.name, metric.help, value=float(value))
        for metric, value in ((mc.WORKER_HOST_KV_LOADED, host.num_loaded),
                              (mc.WORKER_HOST_KV_OFFLOADED, host.num_offloaded),
                              (mc.WORKER_HOST_KV_LOADED_BYTES, host.num_loaded * host.bytes_per_block),
                              (mc.WORKER_HOST_KV_OFFLOADED_BYTES, host.num_offloaded * host.bytes_per_block)):
            yield CounterMetricFamily(metric.name.removesuffix("_total"), metric.help, value=float(value))


QUEUE_WAIT = mc.WORKER_QUEUE_WAIT.create()
PREFILL = mc.WORKER_PREFILL.create()
ROLE_SWITCH = mc.WORKER_ROLE_SWITCH.create()  # observed by a tier switch


def observe_output(out: RequestOutput) -> None:
    """A sequence's queue wait and prefill time, from its first output (the tiers call it on
    every output they stream)."""
    if out.queue_wait_s is not None:
        QUEUE_WAIT.observe(out.queue_wait_s)
    if out.prefill_s is not None:
        PREFILL.observe(out.prefill_s)


def main(role: str, servicer_cls: ServicerFactory) -> None:
    try:
        code = asyncio.run(serve_worker(role, servicer_cls))
    except KeyboardInterrupt:
        code = 0
    # Everything outside the process is released (registration deleted, lease revoked, server and
    # transport closed): skip the interpreter's teardown of torch, the engine thread and gRPC's
    # threads, which took ~0.8 s, so that an idle worker exits well within a second of SIGTERM.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
