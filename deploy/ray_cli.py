"""``tandem deploy``: tandem on a Ray cluster.

    tandem deploy ray --config deploy/examples/cpu-one-machine.yaml [--address HOST:PORT]
    tandem deploy status [--json]
    tandem deploy scale --prefill N --decode M
    tandem deploy down
    tandem deploy targets --out FILE [--etcd-endpoints H:P]

``deploy ray`` connects to the Ray cluster at ``--address`` (or ``ray_address`` in the config),
or starts a Ray head on this machine, then starts the deployment's controller
(:mod:`deploy.controller`) and has it start everything. Where the deployment lives (its
namespace, the Ray address, the local head's pid) goes to a small state file
(``$TANDEM_DEPLOY_STATE_DIR``, default ``~/.cache/tandem/deploy/<namespace>.json``), so that the
later commands find it; with ``--address`` they need no state file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "TANDEM_DEPLOY_STATE_DIR"


@dataclasses.dataclass(frozen=True)
class DeployState:
    namespace: str
    ray_address: str
    head_pid: int = 0  # a Ray head `deploy ray` started on this machine (0: none); `down` stops it
    head_temp_dir: str = ""


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "tandem" / "deploy")


def save_state(state: DeployState) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / f"{state.namespace}.json").write_text(json.dumps(dataclasses.asdict(state)))


def load_state(namespace: str) -> DeployState | None:
    try:
        return DeployState(**json.loads((state_dir() / f"{namespace}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_state(namespace: str) -> None:
    with contextlib.suppress(OSError):
        (state_dir() / f"{namespace}.json").unlink()


def _say(msg: str) -> None:
    print(f"tandem: {msg}", file=sys.stderr, flush=True)


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` as a quiet driver. Ray reads its
    loopback switch (see :func:`deploy.ray_head.ray_env`) when it is imported: nothing may import
    ``ray`` before this in a process that talks to a cluster on 127.0.0.1."""
    from deploy.ray_head import ray_env

    host, _, port = address.rpartition(":")
    if "ray" not in sys.modules:
        os.environ.update({k: v for k, v in ray_env(host).items() if k.startswith("RAY_")})
    import ray

    from deploy.ray_launcher import RAY_NAMESPACE

    if ray.is_initialized():
        return
    try:  # ray.init retries an unreachable address for minutes
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None
    extra = {"_node_ip_address": host} if host.startswith("127.") else {}
    ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level=logging.WARNING, **extra)


def _error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # a remote call's exception: the controller's own error
    return str(cause if cause is not None else e)


# ---- commands ----------------------------------------------------------------------------------
def cmd_ray(args: argparse.Namespace) -> int:
    from deploy.ray_head import start_head, stop_head
    from runtime import settings

    cfg = settings.from_args(args)
    address = args.address or cfg.ray_address
    head = None
    t0 = time.monotonic()
    if not address:
        host = "127.0.0.1" if cfg.host == "auto" else cfg.host
        head = start_head(host, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
        address = head.address
        _say(f"started a Ray head on {address} in {time.monotonic() - t0:.1f} s (logs in {head.temp_dir})")
    state = DeployState(cfg.namespace, address, head.pid if head else 0, head.temp_dir if head else "")
    controller = None
    try:
        connect(address)
        import ray

        from deploy.controller import create_controller

        controller = create_controller(cfg)
        save_state(state)  # before anything starts: an interrupted deploy can still be brought down
        t1 = time.monotonic()
        status = ray.get(controller.deploy.remote(args.timeout), timeout=args.timeout + 120)
    except (Exception, KeyboardInterrupt) as e:
        _say(f"deploy failed: {_error(e)}")
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            _teardown(cfg.namespace, controller)
            sys.modules["ray"].shutdown()
        if head is not None:
            stop_head(head)
        remove_state(cfg.namespace)
        return 130 if isinstance(e, KeyboardInterrupt) else 2
    _print_status(status)
    print(f"deployed in {time.monotonic() - t1:.1f} s ({time.monotonic() - t0:.1f} s with the Ray connection)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _, controller = _attach(args)
    if controller is None:
        return 1
    import ray

    status = ray.get(controller.status.remote(), timeout=60)
    if args.json:
        print(json.dumps(dataclasses.asdict(status), default=str, indent=1))
    else:
        _print_status(status)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    _, controller = _attach(args)
    if controller is None:
        return 1
    import ray

    t0 = time.monotonic()
    try:
        result = ray.get(controller.scale.remote(args.prefill, args.decode, args.timeout),
                         timeout=args.timeout + 120)
    except Exception as e:
        _say(f"scale failed: {_error(e)}")
        return 2
    _print_status(ray.get(controller.status.remote(), timeout=60))
    drained = "; ".join(f"{name}: {r}" for name, r in result.drained.items()) or "-"
    print(f"scaled in {time.monotonic() - t0:.1f} s: started {len(result.plan.start)} "
          f"({', '.join(result.plan.start) or '-'}), drained {len(result.drained)} ({drained})")
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    _, controller = _attach(args)
    if controller is None:
        return 1
    import ray

    try:
        stopped = ray.get(controller.resize_warm_pool.remote(args.size), timeout=args.timeout)
    except Exception as e:
        _say(f"resizing the warm pool failed: {_error(e)}")
        return 2
    _print_status(ray.get(controller.status.remote(), timeout=60))
    print(f"warm pool: at most {args.size} parked from now on; stopped {len(stopped)} "
          f"({', '.join(stopped) or '-'})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from deploy.ray_head import RayHead, stop_head

    namespace, controller = _attach(args, required=False)
    if namespace is None:
        return 1
    import ray

    t0 = time.monotonic()
    drained = _teardown(namespace, controller)
    ray.shutdown()
    state = load_state(namespace)
    if state is not None and state.head_pid and not args.address:
        stop_head(RayHead(state.head_pid, state.ray_address, state.head_temp_dir))
        _say(f"stopped the Ray head on {state.ray_address}")
    remove_state(namespace)
    undrained = sorted(name for name, r in drained.items() if not r.drained)
    print(f"down in {time.monotonic() - t0:.1f} s: drained {len(drained)} worker(s) with "
          f"{sum(r.num_inflight for r in drained.values())} request(s) in flight"
          + (f"; {', '.join(undrained)} timed out" if undrained else ""))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    """Write the cluster's Prometheus file_sd target list (its routers and registered workers)."""
    import asyncio

    from runtime import settings

    cfg = settings.from_args(args)
    routers = list(args.router or [])
    if not cfg.etcd_endpoints:  # a Ray deployment: its etcd and routers from its controller
        args.namespace = None if args.namespace == "default" and not args.address else args.namespace
        namespace, controller = _attach(args)
        if controller is None:
            return 1
        import ray

        status = ray.get(controller.status.remote(), timeout=60)
        cfg = dataclasses.replace(cfg, namespace=namespace, etcd_endpoints=tuple(status.etcd_endpoints))
        routers += [url.split("://", 1)[-1] for url in status.router_urls]
    groups = asyncio.run(_read_targets(cfg, routers))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(groups, indent=1) + "\n")
    tmp.replace(out)  # Prometheus re-reads the file when it changes: never half-written
    print(f"{out}: {len(groups)} targets ({sum(1 for g in groups if 'worker' in g['labels'])} workers)")
    return 0


async def _read_targets(cfg: Any, routers: list[str]) -> list[dict[str, Any]]:
    from runtime.discovery import list_planners, list_workers, scrape_targets
    from runtime.etcd import ControlPlane
    from runtime.keys import WORKER_ROLES

    async with ControlPlane.from_config(cfg) as plane:
        workers = [info for role in WORKER_ROLES for info in (await list_workers(plane, role)).values()]
        planners = await list_planners(plane)
    model = workers[0].model.name if workers else ""
    return scrape_targets(workers, routers, model, planners)


def _teardown(namespace: str, controller: Any | None) -> dict[str, bool]:
    """Down through the controller if there is one; then kill whatever of the namespace remains."""
    import ray

    from deploy.controller import find_controller
    from deploy.ray_launcher import RayLauncher
    from runtime.settings import ClusterConfig

    drained: dict[str, Any] = {}
    controller = controller or find_controller(namespace)
    if controller is not None:
        try:
            cfg = ray.get(controller.config.remote(), timeout=30)
            drained = ray.get(controller.down.remote(), timeout=cfg.drain_timeout_s + 300)
        except Exception as e:
            _say(f"the controller could not bring the deployment down ({_error(e)}); killing its actors")
        with contextlib.suppress(Exception):
            ray.kill(controller, no_restart=True)
    RayLauncher(ClusterConfig(namespace=namespace)).stop()  # leftovers, if any
    return drained


def _attach(args: argparse.Namespace, required: bool = True) -> tuple[str | None, Any | None]:
    """The namespace and its controller, after connecting to its Ray cluster."""
    namespace = args.namespace
    if namespace is None:
        known = sorted(p.stem for p in state_dir().glob("*.json"))
        if len(known) > 1 and not args.address:
            _say(f"several deployments ({', '.join(known)}): pick one with --namespace")
            return None, None
        namespace = known[0] if known and not args.address else "default"
    state = load_state(namespace)
    address = args.address or (state.ray_address if state else "") or os.environ.get("RAY_ADDRESS", "")
    if not address:
        _say(f"no deployment {namespace!r} known here ({state_dir()}): pass --address of its Ray cluster")
        return None, None
    connect(address)
    from deploy.controller import find_controller

    controller = find_controller(namespace)
    if controller is None and required:
        _say(f"no deployment {namespace!r} on the Ray cluster at {address}")
        return None, None
    return namespace, controller


def _print_status(status: Any) -> None:
    gpus_used = status.num_gpus - status.num_free_gpus
    print(f"deployment {status.namespace!r} on Ray {status.ray_address}; etcd {', '.join(status.etcd_endpoints)}; "
          f"GPUs {gpus_used:g} of {status.num_gpus:g} in use")
    for role in ("router", "prefill", "decode", "planner"):
        tier = status.tier(role)
        if tier:
            print(f"  {role:<8} {len(status.serving(role))} of {len(tier)} serving")
    parked = [s for s in status.services if s.state == "parked"]
    if parked or status.warm_pool:
        names = f" ({', '.join(s.name for s in parked)}), holding their Ray reservations for the next starts"
        print(f"  warm pool: {len(parked)} parked of at most {status.warm_pool}{names if parked else ''}")
    for url in status.router_urls:
        print(f"  OpenAI API {url}/v1")
    rows = [("SERVICE", "STATE", "NODE", "GPUS", "PID", "RESTARTS", "ETCD", "REQS", "ENDPOINT")]
    for s in status.services:
        etcd = "-" if s.registered is None else "registered" if s.registered else "missing"
        rows.append((s.name, str(s.state), s.node, ",".join(s.gpus) or "-", str(s.pid or "-"), str(s.num_restarts),
                     etcd, str(s.num_requests) if s.registered else "-", s.endpoint))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ---- the parser ----------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    from runtime import settings

    d = sub.add_parser("deploy", help="run tandem on a Ray cluster: ray, status, scale, pool, down, targets")
    dsub = d.add_subparsers(dest="deploy_command", required=True)

    r = dsub.add_parser("ray", help="deploy on a Ray cluster (--address) or on a Ray head started here")
    settings.add_arguments(r)
    r.add_argument("--address", default=None, help="Ray cluster (GCS host:port); default: ray_address, else start "
                                                   "a Ray head on this machine")
    r.add_argument("--num-gpus", type=float, default=None, help="a Ray head started here: GPUs it declares "
                                                                "(default: the real ones)")
    r.add_argument("--num-cpus", type=float, default=None, help="a Ray head started here: CPUs it declares")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every service to serve")
    r.set_defaults(func=cmd_ray)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--namespace", default=None, help="the deployment (default: the only one known here)")
        p.add_argument("--address", default=None, help="its Ray cluster (default: from the state file)")

    s = dsub.add_parser("status", help="tiers, workers, GPUs and health, from Ray and etcd")
    common(s)
    s.add_argument("--json", action="store_true", help="machine-readable")
    s.set_defaults(func=cmd_status)

    c = dsub.add_parser("scale", help="start and drain workers to reach --prefill N and --decode M")
    common(c)
    c.add_argument("--prefill", type=int, required=True)
    c.add_argument("--decode", type=int, required=True)
    c.add_argument("--timeout", type=float, default=900.0)
    c.set_defaults(func=cmd_scale)

    def pool_size(text: str) -> int:
        size = int(text)
        if size < 0:
            raise argparse.ArgumentTypeError(f"the warm pool's size must be >= 0, got {size}")
        return size

    o = dsub.add_parser("pool", help="resize the warm pool: park at most SIZE drained workers from now on, "
                                     "stop the parked beyond it (their GPUs back to Ray)")
    common(o)
    o.add_argument("size", type=pool_size, help="parked workers at most (0: none; a drained worker stops)")
    o.add_argument("--timeout", type=float, default=300.0)
    o.set_defaults(func=cmd_pool)

    w = dsub.add_parser("down", help="drain every worker, stop everything (and a Ray head deploy started)")
    common(w)
    w.set_defaults(func=cmd_down)

    t = dsub.add_parser("targets", help="write a Prometheus file_sd target list of the cluster (from etcd)")
    settings.add_arguments(t)  # --etcd-endpoints and --namespace: a cluster not on Ray
    t.add_argument("--out", required=True, help="the file_sd JSON file to write (replaced atomically)")
    t.add_argument("--router", action="append", help="a router's host:port to list too (repeatable; on Ray: "
                                                     "the deployment's routers are listed)")
    t.add_argument("--address", default=None, help="the Ray cluster of a deployment (without --etcd-endpoints)")
    t.set_defaults(func=cmd_targets)
