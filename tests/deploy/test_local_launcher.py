"""The launcher interface: which workers a scale starts and drains (pure), whether workers fit
the GPUs (pure), and the local launcher scaling a real embedded cluster (the ``sim`` engine:
real processes, etcd and router, no model weights) with a drain that lets a request finish."""

from __future__ import annotations

import os

import pytest
from launcherlib import drain_one_decode_worker_under_load

from deploy.launcher import ScalePlan, ServiceInfo, ServiceState, gpu_shortfall, plan_scale
from deploy.local_cluster import child_env, engine_threads, prefill_threads
from deploy.local_launcher import LocalLauncher
from runtime.settings import ClusterConfig, ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker(name: str, num_requests: int = 0) -> ServiceInfo:
    return ServiceInfo(name=name, role=name.partition("-")[0], state=ServiceState.SERVING, num_requests=num_requests)


def test_engine_threads_leave_a_core_to_the_router() -> None:
    assert [engine_threads(2, 1), engine_threads(2, 2), engine_threads(1, 1)] == [1, 1, 1]
    assert [engine_threads(8, 1), engine_threads(16, 2), engine_threads(16, 3)] == [7, 7, 5]


def test_cpu_services_get_openmp_threads_that_sleep_at_barriers() -> None:
    assert child_env(ClusterConfig(device="cpu"), {})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert child_env(ClusterConfig(device="cpu"), {"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    told = ClusterConfig(device="cpu", worker_env=("OMP_WAIT_POLICY=ACTIVE",))
    assert child_env(told, {})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_WAIT_POLICY" not in child_env(ClusterConfig(device="cuda"), {})


def test_prefill_steps_take_every_core_of_a_worker() -> None:
    assert [prefill_threads(2, 1), prefill_threads(2, 2), prefill_threads(1, 1)] == [2, 1, 1]
    assert [prefill_threads(8, 1), prefill_threads(16, 2), prefill_threads(16, 3)] == [8, 8, 5]


def test_plan_scale_starts_and_drains_to_the_target() -> None:
    running = {"prefill": [worker("prefill-0")], "decode": [worker("decode-0", 3), worker("decode-1", 1),
                                                             worker("decode-2", 1)]}
    plan = plan_scale(running, {"prefill": 2, "decode": 1})
    assert plan == ScalePlan(start=("prefill",), drain=("decode-2", "decode-1"), drain_first=False)
    assert plan_scale(running, {"prefill": 1, "decode": 3}).empty


def test_plan_scale_drains_the_least_busy_then_the_newest() -> None:
    running = {"decode": [worker("decode-0", 0), worker("decode-1", 5), worker("decode-3", 0)]}
    assert plan_scale(running, {"decode": 2}).drain == ("decode-3",)
    assert plan_scale(running, {"decode": 1}).drain == ("decode-3", "decode-0")


def test_plan_scale_drains_first_when_the_free_gpus_do_not_fit_the_new_workers() -> None:
    running = {"prefill": [worker("prefill-0")], "decode": [worker("decode-0"), worker("decode-1")]}
    target = {"prefill": 2, "decode": 1}
    assert plan_scale(running, target, gpus_per_worker=2, free_gpus=2).drain_first is False
    assert plan_scale(running, target, gpus_per_worker=2, free_gpus=1).drain_first is True
    with pytest.raises(ValueError):
        plan_scale(running, {"decode": -1})


def test_gpu_shortfall_says_why() -> None:
    assert gpu_shortfall(1, 4, {"a": 4}) is None
    assert gpu_shortfall(0, 100, {}) is None  # CPU workers
    assert "need 5 GPUs, and the cluster has 4" in gpu_shortfall(1, 5, {"a": 4})
    # Enough GPUs in total, but a worker's GPUs must be on one node.
    assert "2 such workers fit" in gpu_shortfall(2, 3, {"a": 3, "b": 3})
    assert "largest node has 4" in gpu_shortfall(8, 1, {"a": 4, "b": 4})
    assert gpu_shortfall(0.5, 8, {"a": 4}) is None  # fractional (logical) GPUs pack


def test_deployment_settings_are_validated() -> None:
    assert ClusterConfig(device="cuda", tensor_parallel_size=2).gpus_per_worker == 2
    assert ClusterConfig(device="cpu", tensor_parallel_size=2).gpus_per_worker == 0
    assert ClusterConfig(num_gpus_per_worker=0.5).gpus_per_worker == 0.5
    assert ClusterConfig(worker_env=("UCX_TLS=rc,tcp", "A=b=c")).worker_env_vars == {"UCX_TLS": "rc,tcp", "A": "b=c"}
    for bad in (dict(num_decode=0), dict(tensor_parallel_size=0), dict(worker_env=("NOVALUE",)),
                dict(worker_restarts=-1)):
        with pytest.raises(ConfigError):
            ClusterConfig(**bad)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_launcher_scales_and_drains_without_failing_a_request() -> None:
    cfg = ClusterConfig(port=0, grpc_port=0, engine="sim", kv_cache_gib=0.25, transport="tcp", lease_ttl_s=2,
                        max_local_prefill_tokens=16, num_prefill=1, num_decode=1, drain_timeout_s=60)
    with LocalLauncher(cfg, quiet=True) as launcher:
        assert [(s.name, s.state) for s in launcher.services() if s.role != "router"] == [
            ("prefill-0", ServiceState.SERVING), ("decode-0", ServiceState.SERVING)]
        result = launcher.scale(1, 2)
        assert result.plan.start == ("decode",) and not result.drained
        assert [s.name for s in launcher.workers("decode")] == ["decode-0", "decode-1"]

        # Long requests on both decode workers (1500 tokens take the sim engine about 9 s), then
        # drain one: they all finish.
        name, _ = drain_one_decode_worker_under_load(launcher, 1500)
        states = {s.name: s.state for s in launcher.services()}
        assert states[name] is ServiceState.STOPPED
        assert len(launcher.workers("decode")) == 1


def test_a_worker_that_crashed_before_ready_is_restarting_not_dead(tmp_path) -> None:
    """A child that exits before it was ever ready is retried once by whoever waits for it
    (LocalCluster._wait; the gRPC poller abort that made it needed is gone at its cause,
    runtime/spawn.py): until then it is RESTARTING, so tandem serve (which stops on a DEAD service)
    does not stop the cluster for it; a second crash, or a crash after it was ready, is DEAD."""
    import subprocess
    import sys

    from deploy.launcher import ServiceState
    from deploy.local_cluster import Child, LocalCluster
    from deploy.local_launcher import LocalLauncher
    from runtime.settings import ClusterConfig

    cluster = LocalCluster(ClusterConfig(), quiet=True)
    try:
        launcher = LocalLauncher.around(cluster)
        crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        crashed.wait(30)
        child = Child("decode-7", crashed, role="decode")
        cluster.children.append(child)
        assert {s.name: s.state for s in launcher.services()}["decode-7"] is ServiceState.RESTARTING
        child.num_restarts = 1
        assert {s.name: s.state for s in launcher.services()}["decode-7"] is ServiceState.DEAD
        child.num_restarts, child.ready = 0, {"endpoint": "127.0.0.1:1"}
        assert {s.name: s.state for s in launcher.services()}["decode-7"] is ServiceState.DEAD
    finally:
        cluster.children.clear()
        cluster.stop()
