"""The launcher's warm pool on a real embedded cluster (the ``sim`` engine: real processes, etcd
and router, no model weights): scaling a tier down parks the drained worker (its process stays,
it serves no tier, its requests finish), scaling up takes it back (the same process: nothing
loaded again) and it serves again; with the pool full, a drained worker stops."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import openai
import pytest

from deploy.launcher import ServiceState, router_health, wait_routers_list
from deploy.local_launcher import LocalLauncher
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def metric(metrics_url: str, name: str) -> float:
    """One sample of a worker's Prometheus page."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(name + " "))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_drained_worker_parks_and_a_start_takes_it_back() -> None:
    cfg = ClusterConfig(port=0, grpc_port=0, engine="sim", kv_cache_gib=0.25, transport="tcp", lease_ttl_s=2,
                        max_local_prefill_tokens=16, num_prefill=1, num_decode=2, drain_timeout_s=60)
    with LocalLauncher(cfg, quiet=True, warm_pool=1) as launcher:
        url = launcher.cluster.http_url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = launcher.cluster.router["model"]
        outcomes: list[object] = []

        def ask(i: int, max_tokens: int = 600) -> None:
            try:
                stream = client.completions.create(model=model, prompt=f"{i} " * 8, max_tokens=max_tokens,
                                                   stream=True, temperature=0, extra_body={"ignore_eos": True})
                outcomes.append([c.choices[0].finish_reason for c in stream if c.choices][-1])
            except Exception as e:
                outcomes.append(e)

        # Requests on both decode workers, then scale the tier down: the drained one parks.
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        decode = {c.name: c for c in launcher.cluster.children if c.role == "decode"}
        deadline = time.monotonic() + 60
        while not all(metric(c.ready["metrics"], "tandem_worker_num_running") >= 1 for c in decode.values()):
            assert time.monotonic() < deadline, "the requests never ran on both decode workers"
            time.sleep(0.05)
        result = launcher.scale(1, 1)
        for t in threads:
            t.join(120)
        (name, drain), = result.drained.items()
        assert drain.num_inflight >= 1 and drain.drained, drain
        assert outcomes == ["length"] * 4, outcomes  # no request lost
        parked = decode[name]
        pid = parked.proc.pid
        assert {s.name: s.state for s in launcher.services()}[name] is ServiceState.PARKED
        assert parked.proc.poll() is None  # the process stays
        assert [s.name for s in launcher.workers("decode")] == [n for n in decode if n != name]
        assert router_health(url)["decode_workers"] == 1  # deregistered: it serves no tier
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
        outcomes.clear()
        threads = [threading.Thread(target=ask, args=(i, 40)) for i in range(8)]
        for t in threads:
            t.start()
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
