"""The planner on a live cluster: real etcd, router and sim-engine worker processes (the local
launcher), the planner service acting through it. One cluster for the module, in order:

1. a tier switch in place: the worker keeps its process and finishes its in-flight request;
2. the planner drains an idle cluster to its minimums (1 prefill + 1 decode);
3. under ITL pressure it scales decode up, then back down once traffic stops, and every request
   gets all its tokens across the scaling.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from deploy.launcher import router_health
from deploy.local_cluster import LocalCluster
from deploy.local_launcher import LocalLauncher
from deploy.planner_actuator import PlannerRunner
from runtime import keys
from runtime import metric_catalog as mc
from runtime.etcd import ControlPlane
from runtime.pb import tandem_control_pb2 as cpb
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The CPU sim profile: a decode step is ~50 ms alone and ~80 ms with 8 sequences of ~100 tokens,
# so 60 ms is met by one request and missed by eight.
CFG = ClusterConfig(port=0, grpc_port=0, engine="sim", sim_profile="cpu-smollm2-135m", kv_cache_gib=0.25,
                    transport="tcp", lease_ttl_s=2, metrics_interval_s=0.5, max_local_prefill_tokens=64,
                    drain_timeout_s=60, itl_slo_ms=60, adjustment_interval_s=1.0, planner_window_s=3.0,
                    gpu_budget=3)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(CFG, num_prefill=1, num_decode=2, quiet=True).start(240)
    try:
        yield c
    finally:
        c.stop()


def client(c: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{c.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def counts(c: LocalCluster) -> tuple[int, int]:
    body = router_health(c.http_url)
    return body.get("prefill_workers", -1), body.get("decode_workers", -1)


def wait_for(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def read_decision(c: LocalCluster, history: bool = False):
    async def read():
        async with ControlPlane.from_config(c.cfg) as plane:
            if history:
                return list((await plane.get_messages(keys.planner_history_prefix(c.cfg.namespace),
                                                      cpb.PlannerDecision)).values())
            return await plane.get_message(keys.planner_decision_key(c.cfg.namespace), cpb.PlannerDecision)
    return asyncio.run(read())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_switch_keeps_the_process_and_the_inflight_request(cluster: LocalCluster) -> None:
    launcher = LocalLauncher.around(cluster)
    model = cluster.router["model"]
    stream = client(cluster).completions.create(model=model, prompt="switch me", max_tokens=80, stream=True,
                                                 temperature=0, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)  # the request is decoding now
    busy = [s for s in launcher.workers("decode") if _running(s.endpoint)]
    assert len(busy) == 1, busy
    worker = busy[0]
    result = launcher.switch_worker(worker.name, "prefill")
    listed_s = wait_for(lambda: counts(cluster) == (2, 1), 10, "the router lists the switched worker as prefill")
    assert (result.previous_role, result.role) == ("decode", "prefill") and result.num_inflight == 1
    rest = [first, *chunks]
    # the in-flight request finished with all its tokens, on the switched worker, same process
    assert [c.usage.completion_tokens for c in rest if c.usage] == [80]
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    after = {s.name: s for s in launcher.services()}[worker.name]
    child = next(c for c in cluster.children if c.name == worker.name)
    assert after.pid == worker.pid and after.role == "prefill" and child.proc.poll() is None
    # the cluster serves on (2 prefill + 1 decode)
    usage = client(cluster).completions.create(model=model, prompt="after", max_tokens=20, temperature=0).usage
    assert usage.completion_tokens == 20
    back = launcher.switch_worker(worker.name, "decode")
    wait_for(lambda: counts(cluster) == (1, 2), 10, "the router lists it as decode again")
    print(f"\nswitch: {result.call_ms:.1f} ms call ({result.switch_ms:.1f} ms in the worker), "
          f"{listed_s * 1000:.0f} ms to the router's listing; back: {back.call_ms:.1f} ms")


def planner_metrics(url: str) -> dict[str, tuple[str, set[str], list[tuple[str, tuple, float]]]]:
    """The planner's tandem_ families: name (counters with _total) -> (type, labels, samples)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("tandem_"):
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            samples = [(s.name, tuple(sorted(s.labels.items())), s.value) for s in fam.samples]
            out[name] = (fam.type, {k for s in fam.samples for k in s.labels}, samples)
    return out


def _running(endpoint: str) -> bool:
    import grpc

    from runtime.pb import tandem_worker_pb2 as pb
    from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(endpoint) as ch:
        load = pb_grpc.WorkerServiceStub(ch).Health(pb.HealthRequest(), timeout=5).load
    return load.num_running + load.num_waiting > 0


@pytest.fixture(scope="module")
def planner(cluster: LocalCluster) -> Iterator[PlannerRunner]:
    runner = PlannerRunner(cluster.cfg, LocalLauncher.around(cluster)).start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_idle_cluster_drains_to_the_minimums(cluster: LocalCluster, planner: PlannerRunner) -> None:
    assert counts(cluster) == (1, 2)
    wait_for(lambda: counts(cluster) == (1, 1), 30, "the idle cluster drains to 1 prefill + 1 decode")
    wait_for(lambda: sum(c.proc.poll() is None for c in cluster.workers("decode")) == 1, 30,
             "the drained worker's process exits")
    history = read_decision(cluster, history=True)
    assert any("zero-traffic" in [r.code for r in d.reasons] and d.actions and
               d.actions[0].kind == cpb.PlannerAction.KIND_DRAIN for d in history), history
    last = read_decision(cluster)
    assert last is not None and (last.num_prefill, last.num_decode) == (1, 1)
    # its /metrics: the catalog's tandem_planner_* (types, labels), all of them, and this decision
    served = planner_metrics(planner.metrics_url)
    catalog = {n: m for n, m in mc.CATALOG.items() if m.exporter == "planner"}
    assert {n: kind for n, (kind, _, _) in served.items()} == {n: m.kind for n, m in catalog.items()}
    for name, (_, labels, _) in served.items():
        assert labels <= set(catalog[name].labels), (name, labels)
    samples = {s for _, _, fam in served.values() for s in fam}
    assert ("tandem_planner_desired_workers", (("role", "decode"),), 1.0) in samples
    assert ("tandem_planner_actions_total", (("action", "drain"), ("role", "decode")), 1.0) in samples


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_itl_pressure_scales_decode_up_and_back_down(cluster: LocalCluster, planner: PlannerRunner) -> None:
    wait_for(lambda: counts(cluster) == (1, 1), 30, "the cluster starts at its minimums")
    model = cluster.router["model"]
    done: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    scaled_up = threading.Event()

    def user(i: int) -> None:
        c = client(cluster)
        n = 0
        while not stop.is_set():
            try:
                usage = c.completions.create(model=model, prompt=f"user {i} asks {n}", max_tokens=60,
                                             temperature=0).usage
                done.append(usage.completion_tokens)
            except Exception as e:
                errors.append(e)
            n += 1

    users = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in users:
        t.start()
    try:
        wait_for(lambda: counts(cluster)[1] == 2, 60, "ITL over the target scales decode to 2")
        scaled_up.set()
        time.sleep(4)  # requests on both decode workers
    finally:
        stop.set()
        for t in users:
            t.join(60)
    assert not errors, errors[:3]
    assert done and all(n == 60 for n in done), done
    decisions = read_decision(cluster, history=True)
    ups = [d for d in decisions if any(a.kind == cpb.PlannerAction.KIND_START and a.role == "decode"
                                       for a in d.actions)]
    assert ups and "itl-over-slo" in [r.code for r in ups[-1].reasons], ups
    wait_for(lambda: counts(cluster) == (1, 1), 40, "decode back to 1 once traffic stops")
    print(f"\n{len(done)} requests, all with 60 tokens; decisions with actions: {len(decisions)}")
