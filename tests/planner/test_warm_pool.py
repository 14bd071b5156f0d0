"""The launcher's warm pool on a real embedded cluster (the ``sim`` engine: real processes, etcd
and router, no model weights): scaling a tier down parks the drained worker (its process stays,
it serves no tier, its requests finish), scaling up takes it back (the same process: nothing
loaded again) and it serves again; with the pool full, a drained worker stops."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from launcherlib import drain_one_decode_worker_under_load, metric, stream_all

from deploy.launcher import ServiceState, router_health, wait_routers_list
from deploy.local_launcher import LocalLauncher
from deploy.planner_actuator import LaunchActuator
from planner.service import PlannerService, planner_config
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_drained_worker_parks_and_a_start_takes_it_back() -> None:
    cfg = ClusterConfig(port=0, grpc_port=0, engine="sim", kv_cache_gib=0.25, transport="tcp", lease_ttl_s=2,
                        max_local_prefill_tokens=16, num_prefill=1, num_decode=2, drain_timeout_s=60, warm_pool=1)
    with LocalLauncher(cfg, quiet=True) as launcher:  # the pool's size from the config, as tandem serve's
        url = launcher.cluster.http_url
        # Requests on both decode workers, then scale the tier down: the drained one parks.
        decode = {c.name: c for c in launcher.cluster.workers("decode")}
        name, _ = drain_one_decode_worker_under_load(launcher, 600)
        parked = decode[name]
        pid = parked.proc.pid
        assert {s.name: s.state for s in launcher.services()}[name] is ServiceState.PARKED
        assert parked.proc.poll() is None  # the process stays
        assert [s.name for s in launcher.workers("decode")] == [n for n in decode if n != name]
        assert router_health(url)["decode_workers"] == 1  # deregistered: it serves no tier
        # the planner's actuator counts it: the live planner's forecast looks a wake ahead (tick9)
        actuator = LaunchActuator(launcher, 3)
        try:
            assert actuator.num_parked() == 1
            planner_cfg = planner_config(dataclasses.replace(cfg, planner_startup_s=60, planner_wake_s=5), 3)
            service = PlannerService(cfg, planner_cfg, actuator)
            obs = service._observe({})
            assert obs.num_parked == 1 and planner_cfg.horizon_with(obs.num_parked) == 5 + cfg.adjustment_interval_s
        finally:
            actuator.close()
        steps = metric(parked.ready["metrics"], "tandem_worker_engine_steps_total")

        # Scale up: the start takes the parked worker back (same process), and it serves.
        t0 = time.perf_counter()
        result = launcher.scale(1, 2)
        wait_routers_list([url], 30, at_least={"decode": 2})
        took = time.perf_counter() - t0
        print(f"\nwarm start: {took * 1000:.0f} ms to a worker the router lists "
              f"(in the worker: {launcher.wake_ms[-1]:.1f} ms)")
        assert result.plan.start == ("decode",)
        assert {s.name: s.state for s in launcher.services()}[name] is ServiceState.SERVING
        assert parked.proc.pid == pid and parked.proc.poll() is None
        assert len(launcher.wake_ms) == 1
        threads, outcomes = stream_all(launcher, 8, 40)
        for t in threads:
            t.join(120)
        assert outcomes == ["length"] * 8, outcomes
        assert metric(parked.ready["metrics"], "tandem_worker_engine_steps_total") > steps  # it served again

        # The pool holds one: refilled, the next drained worker stops.
        launcher.scale(1, 1)
        launcher.scale(0, 1)
        states = {s.name: s.state for s in launcher.services() if s.role in ("prefill", "decode")}
        assert sorted(states.values()) == sorted([ServiceState.PARKED, ServiceState.SERVING, ServiceState.STOPPED])
        assert states["prefill-0"] is ServiceState.STOPPED
