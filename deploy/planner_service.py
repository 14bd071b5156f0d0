"""The planner as a service of a Ray deployment: what ``planner: true`` in a deploy config starts
(one actor, ``planner-0``, running ``python -m deploy.planner_service --config FILE``). It
connects to the Ray cluster (``ray_address``, which the launcher sets to the deployment's), acts
through the deployment's controller (:class:`deploy.planner_actuator.ControllerLauncher`), serves
its ``tandem_planner_*`` metrics on ``metrics_port``, prints ``TANDEM_READY {json}`` as every
tandem service does, and stops on SIGTERM. ``tandem planner`` runs the same in the foreground.

It lives on the top floor, not in ``planner/``: the planner package sits below ``deploy`` and
cannot reach a launcher; here the two meet, as the tiers meet in ``deploy.switchable_worker``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading

from deploy.planner_actuator import ControllerLauncher, PlannerRunner
from runtime import settings
from runtime.settings import ClusterConfig


def ray_planner(cfg: ClusterConfig, *, dry_run: bool = False) -> PlannerRunner:
    """A planner on the Ray deployment ``cfg.namespace`` (at ``cfg.ray_address``, RAY_ADDRESS or
    where ``tandem deploy`` recorded it), acting through its controller; not started."""
    import ray

    from deploy.controller import find_controller
    from deploy.ray_cli import connect, load_state

    state = load_state(cfg.namespace)
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "") or (state.ray_address if state else "")
    if not address:
        raise ValueError("no Ray deployment to act on: pass --ray-address (or --dry-run --etcd-endpoints to only "
                         "decide; tandem serve runs a planner that acts on its cluster)")
    connect(address)
    controller = find_controller(cfg.namespace)
    if controller is None:
        raise ValueError(f"no deployment {cfg.namespace!r} on the Ray cluster at {address}")
    if not cfg.etcd_endpoints:
        status = ray.get(controller.status.remote(), timeout=60)
        cfg = dataclasses.replace(cfg, etcd_endpoints=status.etcd_endpoints)
    launcher = None if dry_run else ControllerLauncher(controller, ray.get(controller.config.remote(), timeout=60))
    return PlannerRunner(cfg, launcher, dry_run=dry_run, num_workers=cfg.gpu_budget or cfg.num_prefill + cfg.num_decode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.planner_service", description=__doc__.splitlines()[0])
    settings.add_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="write decisions to etcd and Prometheus, act on nothing")
    args = parser.parse_args(argv)
    cfg = settings.from_args(args)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s planner %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    runner = ray_planner(cfg, dry_run=args.dry_run).start()
    if runner.error is not None:
        raise SystemExit(f"planner: {runner.error!r}")
    print("TANDEM_READY " + json.dumps({"role": "planner", "planner_id": runner.service.planner_id,
                                        "endpoint": runner.metrics_url, "metrics": runner.metrics_url,
                                        "pid": os.getpid()}), flush=True)
    while not stop.wait(1.0):
        if runner.error is not None:  # its loop ended: exit, and Ray restarts the actor
            runner.stop()
            return 1
    runner.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
