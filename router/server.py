"""The router process: OpenAI HTTP API (uvicorn) and KServe v2 gRPC API on one event loop,
workers discovered through etcd. Prints ``TANDEM_READY {json}`` once both listen."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.llm_engine import load_tokenizer
from engine.loader import read_arch, resolve_model
from router.core import RouterCore
from router.openai_api import ServedModel, create_app
from router.stats import WINDOW
from runtime import settings
from runtime.etcd import ControlPlane

log = logging.getLogger("tandem.router")


def served_model(cfg: settings.ClusterConfig) -> tuple[ServedModel, EngineConfig]:
    econfig = EngineConfig(model=cfg.model or "default", dtype=cfg.dtype)
    arch = read_arch(econfig)
    name = cfg.served_model_name
    if not name:
        _, path, preset = resolve_model(econfig)
        name = preset or (Path(path).stem if path is not None else econfig.model)
        name = name.replace(".Q4_1", "") if name.endswith(".Q4_1") else name
    return ServedModel(name=name, max_model_len=arch.max_position_embeddings, created=int(time.time())), econfig


async def serve_router(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description="tandem router")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.from_args(args)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    if not cfg.etcd_endpoints:
        raise SystemExit("the router needs --etcd-endpoints (tandem serve starts etcd and passes them)")
    model, econfig = served_model(cfg)
    tokenizer = load_tokenizer(econfig)
    if tokenizer is None:
        raise SystemExit(f"model {econfig.model!r} has no tokenizer: the router needs one")

    plane = ControlPlane.from_config(cfg)
    await plane.connect()
    core = RouterCore(cfg, plane)
    await core.start()

    app = create_app(core, tokenizer, model, cfg.max_body_bytes)
    http = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                         access_log=False, lifespan="off", timeout_graceful_shutdown=2))
    grpc_server = grpc.aio.server()
    from router.kserve import add_kserve

    add_kserve(grpc_server, core, tokenizer, model)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    if grpc_port == 0:
        raise SystemExit(f"cannot bind gRPC on {cfg.host}:{cfg.grpc_port}")
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            raise SystemExit(f"cannot serve HTTP on {cfg.host}:{cfg.port}")
        await asyncio.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]

    async def track_health() -> None:
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if core.ready() else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            await health_servicer.set("", status)
            await health_servicer.set("inference.GRPCInferenceService", status)
            await asyncio.sleep(0.5)

    health_task = asyncio.create_task(track_health())
    # What start-up allocated (modules, torch, the tokenizer: ~240k objects) lives as long as the
    # process: take it out of the collector's sight. Otherwise every full collection walks it all
    # and stalls the event loop, and so every request in flight, for 0.2-0.4 s under load
    # (bench/routing.py: the kv policy's p99 TTFT was such a stall).
    gc.collect()
    gc.freeze()
    # Request-level stats for the planner: /tandem/{ns}/metrics/router/{router_id}
    plane.start_metrics_publisher("router", core.router_id, WINDOW.snapshot, cfg.metrics_interval_s)
    print("TANDEM_READY " + json.dumps({"role": "router", "http": f"http://{cfg.host}:{port}",
                                        "grpc": f"{cfg.host}:{grpc_port}", "model": model.name,
                                        "pid": os.getpid()}), flush=True)
    log.info("serving %s: OpenAI on http://%s:%d, KServe gRPC on %s:%d", model.name, cfg.host, port, cfg.host,
             grpc_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait({asyncio.create_task(stop.wait()), http_task}, return_when=asyncio.FIRST_COMPLETED)
    http.should_exit = True
    health_task.cancel()
    await grpc_server.stop(grace=1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, 5)
    await core.stop()
    with contextlib.suppress(Exception):
        await plane.close()
    return 0


def main() -> None:
    try:
        code = asyncio.run(serve_router())
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
