"""How often a worker dies before it is ready, and how fast an idle one exits on SIGTERM: starts a
real worker process (``deploy.switchable_worker``, the sim engine) N times, one after the other, by
``LocalCluster``'s own spawn path, the one ``tandem serve`` takes for a worker its planner starts.

    python bench/start_abort.py --starts 25 --transport tcp --spawner-grpc busy --json OUT.json

``--spawner-grpc``: what gRPC this (the spawning) process runs while it starts workers: ``none``;
``idle`` (an aio server and a channel to it, no call in flight: a ``tandem serve`` between its
launcher's calls); ``busy`` (the same with Health calls back to back: a test process or a serve
process answering while it spawns). The start-up abort (gRPC's ``ev_epoll1_linux.cc ...
epoll_wait error: Bad file descriptor``, SIGABRT) is a child of a process that runs gRPC dying
between ``fork()`` and ``exec()``: it shows with ``idle``/``busy`` and never with ``none``.

Per start: the exit code when it died before ``TANDEM_READY`` (and its last output), else its time
to ready and its exit time after SIGTERM once idle. Prints a summary; ``--json`` writes every start
and, at the end, its figure beside it (``bench/plots.py start_aborts``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # not gRPC's line per fork; its abort is an error

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.local_cluster import LocalCluster
from runtime.etcd_server import EtcdServer
from runtime.settings import ClusterConfig

ABORT_MARK = "epoll_wait error"


def run_grpc(mode: str, started: threading.Event, stop: threading.Event) -> None:
    """An aio server and a channel to it on this thread's loop; ``busy``: calls back to back."""
    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest())
            started.set()
            while not stop.is_set():
                if mode == "busy":
                    await stub.Check(health_pb2.HealthCheckRequest())
                else:
                    await asyncio.sleep(0.1)
        await server.stop(None)

    asyncio.run(main())


def start_once(cluster: LocalCluster, index: int, timeout_s: float) -> dict:
    t0 = time.monotonic()
    child = cluster._spawn_worker("decode", index)
    cluster.children.remove(child)  # ours to stop, one at a time
    if not child._event.wait(timeout_s):
        child.proc.kill()
        child.proc.wait()
        return {"index": index, "outcome": "timeout", "tail": child.log_tail[-5:]}
    if child.ready is None:  # exited before it was ready
        code = child.proc.wait()
        time.sleep(0.1)  # its reader thread takes the last lines
        tail = child.log_tail[-5:]
        aborted = any(ABORT_MARK in line for line in tail) or code in (-signal.SIGABRT, -signal.SIGSEGV)
        return {"index": index, "outcome": "abort" if aborted else "died", "code": code, "tail": tail}
    ready_s = time.monotonic() - t0
    time.sleep(0.3)  # idle: registered, its first metrics published
    t1 = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    code = child.proc.wait(60)
    return {"index": index, "outcome": "ok", "code": code, "ready_s": round(ready_s, 2),
            "exit_s": round(time.monotonic() - t1, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=25)
    p.add_argument("--transport", default="tcp", choices=["tcp", "nixl", "auto"])
    p.add_argument("--spawner-grpc", default="busy", choices=["none", "idle", "busy"])
    p.add_argument("--model", default="dummy:smollm2-135m")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per start")
    p.add_argument("--json", default=None, help="write every start here")
    args = p.parse_args()

    stop = threading.Event()
    if args.spawner_grpc != "none":
        started = threading.Event()
        threading.Thread(target=run_grpc, args=(args.spawner_grpc, started, stop), daemon=True).start()
        started.wait(30)
    etcd = EtcdServer().start()
    cfg = ClusterConfig(engine="sim", model=args.model, kv_cache_gib=0.25, transport=args.transport,
                        etcd_endpoints=(etcd.endpoint,), log_level="WARNING", lease_ttl_s=2)
    cluster = LocalCluster(cfg, num_prefill=0, num_decode=1, quiet=True)
    cluster._config_path.write_text(json.dumps(dataclasses.asdict(cluster.cfg)))
    rows = []
    try:
        for i in range(args.starts):
            row = start_once(cluster, i, args.timeout_s)
            rows.append(row)
            if args.json:  # after every start: a chunk cut short keeps what it counted
                Path(args.json).write_text(json.dumps({"summary": summarize(args, rows), "starts": rows}, indent=1))
            if row["outcome"] != "ok":
                print(f"start {i}: {row['outcome']} code {row.get('code')}: {' | '.join(row['tail'])}", flush=True)
    finally:
        stop.set()
        cluster.stop()
        etcd.stop()
    print(json.dumps(summarize(args, rows)), flush=True)
    if args.json:
        from bench import plots
        result = {"summary": summarize(args, rows), "starts": rows}
        print(plots.start_aborts(result, Path(args.json).with_suffix(".png")))


def summarize(args: argparse.Namespace, rows: list[dict]) -> dict:
    counts = {k: sum(1 for r in rows if r["outcome"] == k) for k in ("ok", "abort", "died", "timeout")}
    exits = sorted(r["exit_s"] for r in rows if r["outcome"] == "ok")
    return {"transport": args.transport, "spawner_grpc": args.spawner_grpc, "starts": len(rows), **counts,
            "exit_s_max": exits[-1] if exits else None, "exit_s_median": exits[len(exits) // 2] if exits else None,
            "exit_codes": sorted({r["code"] for r in rows if "code" in r})}


if __name__ == "__main__":
    main()
