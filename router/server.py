"""The router process: OpenAI HTTP API (uvicorn) and KServe v2 gRPC API on one event loop,
workers and their model discovered through etcd. Prints ``TANDEM_READY {json}`` once both listen;
the model is served (and listed) once a worker has registered it (``router.models``).

The router never imports torch or the engine: it needs etcd, the workers' registrations, and the
tokenizer files they point to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router import edge, heap
from router.dashboard import Dashboard
from router.kserve import add_kserve
from router.models import ModelCatalog
from router.openai_api import create_app
from router.request_flow import RequestFlow
from router.request_window import WINDOW
from runtime import keys, settings
from runtime.etcd import ControlPlane
from runtime.signals import stop_on_signals

log = logging.getLogger("tandem.router")


async def serve_router(argv: list[str] | None = None) -> int:
    if heap.enabled():
        heap.start()  # before anything is built: what start-up holds is in the count too
    parser = argparse.ArgumentParser(prog="python -m router", description="tandem router")
    settings.add_arguments(parser)
    cfg = settings.from_args(parser.parse_args(argv))
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    if not cfg.etcd_endpoints:
        raise SystemExit("the router needs --etcd-endpoints (tandem serve starts etcd and passes them)")

    plane = ControlPlane.from_config(cfg)
    await plane.connect()
    flow = RequestFlow(cfg, plane)
    catalog = ModelCatalog.for_mode(cfg.mode, flow.pools, cfg.served_model_name)
    for pool in flow.pools.values():
        pool.listeners.append(lambda _event: catalog.follow())
    await flow.start()
    catalog.follow()  # the workers already registered

    board = Dashboard(cfg, flow, plane, lambda: catalog.model.name if catalog.model else None)
    board.start()
    auth = edge.make_auth(cfg)
    app = edge.http_app(create_app(flow, catalog, cfg.max_body_bytes, cfg.http_read_timeout_s,
                                   extra_routes=board.routes() + heap.routes()), auth)
    http = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                         lifespan="off", timeout_graceful_shutdown=2, **edge.uvicorn_args(cfg)))
    grpc_server = edge.grpc_server(auth)
    add_kserve(grpc_server, flow, catalog)
    health_servicer = _Health(catalog)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    grpc_port = edge.add_grpc_port(grpc_server, cfg)
    if grpc_port == 0:
        raise SystemExit(f"cannot bind gRPC on {cfg.host}:{cfg.grpc_port}")
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            raise SystemExit(f"cannot serve HTTP on {cfg.host}:{cfg.port}")
        await asyncio.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]
    health_task = asyncio.create_task(_track_health(health_servicer, catalog))
    # What start-up allocated (modules, the servers: ~70k objects) lives as long as the process:
    # take it out of the collector's sight, so that a full collection does not walk it while
    # requests wait (bench/router_process.py: ~50 ms per full collection otherwise).
    gc.collect()
    gc.freeze()
    # Request-level stats for the planner: /tandem/{ns}/metrics/router/{router_id}
    plane.start_publisher(keys.router_stats_key(cfg.namespace, flow.router_id),
                          lambda: WINDOW.snapshot().to_pb(flow.router_id), cfg.metrics_interval_s)
    print("TANDEM_READY " + json.dumps({"role": "router", "http": f"{edge.http_scheme(cfg)}://{cfg.host}:{port}",
                                        "grpc": f"{cfg.host}:{grpc_port}", "router_id": flow.router_id,
                                        "pid": os.getpid()}), flush=True)
    log.info("OpenAI API on %s://%s:%d, KServe gRPC on %s:%d", edge.http_scheme(cfg), cfg.host, port, cfg.host,
             grpc_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)
    await asyncio.wait({asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED)
    http.should_exit = True
    health_task.cancel()
    await grpc_server.stop(grace=1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, 5)
    await board.stop()
    await flow.stop()
    with contextlib.suppress(Exception):
        await plane.close()
    return 0


_SERVICES = ("", "inference.GRPCInferenceService")


def _status(catalog: ModelCatalog) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if catalog.ready() else health_pb2.HealthCheckResponse.NOT_SERVING


class _Health(health.aio.HealthServicer):
    """gRPC health: SERVING while the model is ready, exactly as /health and KServe ServerReady
    say (``Check`` asks the catalog; ``Watch`` streams follow :func:`_track_health`)."""

    def __init__(self, catalog: ModelCatalog) -> None:
        super().__init__()
        self.catalog = catalog

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        if request.service in _SERVICES:
            return health_pb2.HealthCheckResponse(status=_status(self.catalog))
        return await super().Check(request, context)


async def _track_health(servicer: health.aio.HealthServicer, catalog: ModelCatalog) -> None:
    while True:
        for service in _SERVICES:
            await servicer.set(service, _status(catalog))
        await catalog.wait_changed(1.0)


def main() -> None:
    try:
        code = asyncio.run(serve_router())
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
