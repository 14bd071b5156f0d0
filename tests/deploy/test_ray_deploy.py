"""``tandem deploy`` on a real Ray cluster (conftest: one head, 8 CPUs, 4 logical GPUs).

One deployment serves the module, in the order of the tests: 1 router, 1 prefill and 2 decode
workers (the real model, float32, one thread each, one logical GPU each) and the planner service
(``planner: true``; at the minimums it was deployed with and an hour between ticks, so it decides
once and changes nothing) deployed from a config file; correct streamed answers through the
openai client; status shows the placement and the planner's metrics show what it saw; `tandem
deploy targets` lists what the router does, and the router counts its workers' GPUs; a killed
worker actor comes back and re-registers while serving goes on; scaling to 2 prefill + 1 decode
under load fails no request; a tier switch through the controller keeps the process, and a
restart of the switched worker's actor brings it back in its new tier; down leaves no actor,
placement group or process. Apart from it, a config that needs more GPUs than the cluster has
fails fast, saying so.

Then a deployment of sim-engine workers with a warm pool of one (``warm_pool: 1``), scaled
through its controller as the planner does: a drained worker parks (same actor and process, its
requests finished, its Ray GPU still reserved and counted free for this deployment's next start),
a scale-up takes it back without a restart, a full pool stops the next drained worker, a parked
actor that Ray restarts starts nothing and the next start replaces it with a fresh actor, and down
stops the parked too.

Then a third deployment, of sim-engine workers (the engine is not the point there), has its
planner act: a load that shifts from long answers to long prompts makes it start a decode worker
(a new actor), then switch one to prefill in place (same process), then drain back to the
minimums once traffic stops, with no request failing and its decisions in etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

ray = pytest.importorskip("ray")

from deploy.launcher import ServiceInfo, ServiceState  # noqa: E402
from deploy.ray_head import RayHead  # noqa: E402
from deploy.ray_launcher import RAY_NAMESPACE, RayLauncher  # noqa: E402
from runtime.settings import ClusterConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAMESPACE = "dt" + uuid.uuid4().hex[:6]
CONFIG: dict[str, Any] = dict(
    namespace=NAMESPACE, host="127.0.0.1", port=0, grpc_port=0, dtype="float32", threads=1, kv_cache_gib=0.25,
    transport="tcp", lease_ttl_s=2, max_local_prefill_tokens=16, num_routers=1, num_prefill=1, num_decode=2,
    num_gpus_per_worker=1, num_cpus_per_worker=1, worker_restarts=2, drain_timeout_s=30, placement_timeout_s=20,
    planner=True, min_prefill=1, min_decode=2, adjustment_interval_s=3600, planner_fast_interval_s=0)  # no decision
SHORT_PROMPT = "The capital of France is"  # prefilled on the decode worker
LONG_PROMPT = ("Once upon a time, in a land far away, there lived a king who had three daughters. The youngest "
               "daughter was")  # over max_local_prefill_tokens: prefilled on the prefill worker
MAX_TOKENS = 16


def tandem(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``tandem deploy ...`` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", "deploy", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def write_config(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, **overrides}))
    return path


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, context: Callable[[], Any] | None = None,
               interval_s: float = 0.5) -> Any:
    """``check()`` once it is true; past ``timeout_s`` fails, saying ``what`` and ``context()``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; {context()}" if context else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {value!r}{seen})")
        time.sleep(interval_s)


def named_actors(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(f"{namespace}."))


def deployment_pids(namespace: str) -> list[int]:
    """Processes the deployment started (every service and its etcd carry TANDEM_DEPLOYMENT)."""
    marker = f"TANDEM_DEPLOYMENT={namespace}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class Deployment:
    namespace: str
    address: str
    url: str  # the router's OpenAI base URL
    model: str
    deploy_s: float

    def launcher(self) -> RayLauncher:
        return RayLauncher(ClusterConfig(namespace=self.namespace))

    def services(self) -> dict[str, ServiceInfo]:
        return {s.name: s for s in self.launcher().services()}

    def status(self) -> dict[str, Any]:
        r = tandem("status", "--namespace", self.namespace, "--address", self.address, "--json", timeout_s=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict[str, Any]:
        from deploy.launcher import router_health

        return router_health(self.url)


@contextlib.contextmanager
def deployed(ray_head: RayHead, path: Path, **overrides: Any) -> Iterator[Deployment]:
    """``tandem deploy ray`` of CONFIG with ``overrides``; down at the end unless a test took it down."""
    namespace = overrides.get("namespace", NAMESPACE)
    config = write_config(path, **overrides)
    t0 = time.monotonic()
    r = tandem("ray", "--config", str(config), "--address", ray_head.address, timeout_s=480)
    deploy_s = time.monotonic() - t0
    try:
        assert r.returncode == 0, f"deploy failed:\n{r.stderr[-4000:]}\n{r.stdout}"
        routers = [s for s in RayLauncher(ClusterConfig(namespace=namespace)).services() if s.role == "router"]
        url = routers[0].endpoint
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        yield Deployment(namespace, ray_head.address, url, model, deploy_s)
    finally:
        if named_actors(namespace):  # the down test did not run or failed: clean up
            tandem("down", "--namespace", namespace, "--address", ray_head.address)


@pytest.fixture(scope="module")
def deployment(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(ray_head, tmp_path_factory.mktemp("deploy") / "cluster.yaml") as d:
        yield d


@pytest.fixture(scope="module")
def reference() -> Callable[[str, int], str]:
    """The in-process engine's greedy text for (prompt, max_tokens): what every answer must equal."""
    from engine.llm import LLM
    from protocol.sampling import SamplingParams

    llm = LLM("default", dtype="float32", num_threads=1, kv_cache_bytes=64 << 20, progress=False)
    cache: dict[tuple[str, int], str] = {}

    def text(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            cache[prompt, max_tokens] = llm.generate(prompt, params)[0].outputs[0].text
        return cache[prompt, max_tokens]

    return text


@dataclass
class Outcome:
    t_start: float
    t_end: float
    prompt: str
    text: str
    num_tokens: int  # completion tokens, from the stream's usage chunk
    finish_reason: str | None
    error: BaseException | None


class Load:
    """Clients streaming greedy completions back to back until stopped."""

    def __init__(self, d: Deployment, num_clients: int = 3, max_tokens: int = 40,
                 prompt: Callable[[int, int], str] = lambda i, n: (LONG_PROMPT, SHORT_PROMPT)[i % 2]) -> None:
        """``prompt(i, n)``: client i's n-th prompt."""
        self.d, self.num_clients, self.max_tokens, self.prompt = d, num_clients, max_tokens, prompt
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(num_clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        self.wait_answers_since(0.0, self.num_clients, "the load's first answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Every client finishes the request it has in flight, then stops."""
        self._stop.set()
        for t in self._threads:
            t.join(150)

    def _loop(self, i: int) -> None:
        client = self.d.client()
        n = 0
        while not self._stop.is_set():
            prompt, n = self.prompt(i, n), n + 1
            t0 = time.monotonic()
            try:
                stream = client.completions.create(model=self.d.model, prompt=prompt, max_tokens=self.max_tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                   stream_options={"include_usage": True})
                chunks = list(stream)
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                usage = [c.usage for c in chunks if c.usage is not None]
                self.outcomes.append(Outcome(t0, time.monotonic(), prompt, text,
                                             usage[-1].completion_tokens if usage else -1,
                                             reasons[-1] if reasons else None, None))
            except Exception as e:
                self.outcomes.append(Outcome(t0, time.monotonic(), prompt, "", 0, None, e))
                time.sleep(0.2)  # a failed request comes back at once: do not spin on a broken cluster

    def wait_answers_since(self, t: float, num: int, what: str) -> None:
        """Until ``num`` requests started after monotonic time ``t`` have been answered."""
        wait_until(lambda: sum(o.error is None and o.t_start > t for o in self.outcomes) >= num, 120, what)

    @property
    def errors(self) -> list[BaseException]:
        return [o.error for o in self.outcomes if o.error is not None]

    def assert_answers_correct(self, reference: Callable[[str, int], str]) -> None:
        """Every answer is the reference's text, all ``max_tokens`` of it, finished by length."""
        answers = [o for o in self.outcomes if o.error is None]
        assert answers
        for o in answers:
            assert (o.text, o.num_tokens, o.finish_reason) == (reference(o.prompt, self.max_tokens), self.max_tokens,
                                                               "length"), o


# ---- the tests, in order ---------------------------------------------------------------------------
def test_more_gpus_than_the_cluster_has_fails_fast(ray_head: RayHead, tmp_path: Path) -> None:
    namespace = NAMESPACE + "big"
    config = write_config(tmp_path / "big.yaml", namespace=namespace, num_prefill=1, num_decode=4)
    t0 = time.monotonic()
    r = tandem("ray", "--config", str(config), "--address", ray_head.address, timeout_s=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "not enough GPUs" in r.stderr and "need 5 GPUs" in r.stderr and "the cluster has 4" in r.stderr, r.stderr
    assert took < 60, f"failing took {took:.0f} s"  # the point: refused up front, not after placement_timeout_s
    assert named_actors(namespace) == []


def test_deploy_serves_correct_streamed_answers(deployment: Deployment, reference: Callable[[str, int], str]) -> None:
    client = deployment.client()
    for prompt in (SHORT_PROMPT, LONG_PROMPT):
        want = reference(prompt, MAX_TOKENS)
        stream = client.completions.create(model=deployment.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = [c.choices[0].text for c in stream if c.choices]
        assert len(chunks) > 1, "not streamed"
        assert "".join(chunks) == want, prompt
    chat = client.chat.completions.create(model=deployment.model, stream=True, max_tokens=MAX_TOKENS, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    parts = list(chat)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices).strip()
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    # The long prompt went through the prefill worker.
    with urllib.request.urlopen(f"{deployment.url}/metrics", timeout=10) as resp:
        assert 'tandem_router_route_decisions_total{path="remote"}' in resp.read().decode()


def test_status_shows_placement(deployment: Deployment) -> None:
    status = deployment.status()
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == {"etcd", "router-0", "prefill-0", "decode-0", "decode-1", "planner-0"}
    for s in services.values():
        assert s["state"] == "serving" and s["node"] == "127.0.0.1" and s["pid"] > 0, s
    workers = [services[n] for n in ("prefill-0", "decode-0", "decode-1")]
    assert all(w["registered"] and len(w["gpus"]) == 1 for w in workers), workers
    assert len({w["gpus"][0] for w in workers}) == 3, "two workers share a GPU"
    assert services["router-0"]["gpus"] == [] and services["etcd"]["gpus"] == [] == services["planner-0"]["gpus"]
    assert (status["num_gpus"], status["num_free_gpus"]) == (4, 1)
    text = tandem("status", "--namespace", deployment.namespace, "--address", deployment.address, timeout_s=60)
    assert "GPUs 3 of 4 in use" in text.stdout and "decode   2 of 2 serving" in text.stdout, text.stdout
    print(f"\ndeploy (1 router, 1 prefill, 2 decode) took {deployment.deploy_s:.1f} s")


def test_scrape_targets_and_gpus_per_tier(deployment: Deployment, tmp_path: Path) -> None:
    """`tandem deploy targets` on Ray (etcd and routers from the controller) writes what the
    router's /metrics/targets lists; the router counts the GPUs its workers registered (one
    logical GPU each, num_gpus_per_worker)."""
    out = tmp_path / "targets.json"
    r = tandem("targets", "--out", str(out), "--namespace", deployment.namespace, "--address", deployment.address,
               timeout_s=60)
    assert r.returncode == 0, r.stderr
    with urllib.request.urlopen(f"{deployment.url}/metrics/targets", timeout=10) as resp:
        assert json.loads(out.read_text()) == json.loads(resp.read())
    with urllib.request.urlopen(f"{deployment.url}/metrics", timeout=10) as resp:
        gpus = {ln.rpartition(" ")[0]: float(ln.rpartition(" ")[2]) for ln in resp.read().decode().splitlines()
                if ln.startswith("tandem_router_gpus{")}
    assert gpus == {'tandem_router_gpus{role="prefill"}': 1.0, 'tandem_router_gpus{role="decode"}': 2.0}, gpus


def test_planner_service_runs(deployment: Deployment) -> None:
    """`planner: true` runs the planner as a service: it reached etcd and the controller, and its
    first tick saw the deployment (its /metrics, the catalog's tandem_planner_*)."""
    planner = deployment.services()["planner-0"]
    assert planner.state is ServiceState.SERVING and planner.endpoint.endswith("/metrics"), planner

    def metrics() -> dict[str, float]:
        with urllib.request.urlopen(planner.endpoint, timeout=10) as resp:
            lines = [ln.rpartition(" ") for ln in resp.read().decode().splitlines() if ln.startswith("tandem_")]
        return {k: float(v) for k, _, v in lines}

    seen = wait_until(lambda: (m := metrics()).get("tandem_planner_last_decision_timestamp_seconds") and m, 60,
                      "the planner's first decision")
    assert seen['tandem_planner_ready_workers{role="prefill"}'] == 1, seen
    assert seen['tandem_planner_ready_workers{role="decode"}'] == 2, seen
    assert seen['tandem_planner_desired_workers{role="decode"}'] == 2, seen


def test_killed_worker_actor_restarts_and_reregisters(deployment: Deployment,
                                                     reference: Callable[[str, int], str]) -> None:
    before = deployment.services()["decode-1"]
    with Load(deployment) as load:
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(f"{deployment.namespace}.decode-1", namespace=RAY_NAMESPACE), no_restart=False)

        def back() -> ServiceInfo | None:
            s = deployment.services()["decode-1"]
            ok = s.state is ServiceState.SERVING and s.registered and s.worker_id != before.worker_id
            return s if ok else None

        after = wait_until(back, 180, "decode-1 to come back")
        back_at = time.monotonic()
        wait_until(lambda: deployment.health().get("decode_workers") == 2, 30, "the router to list it")
        listed_at = time.monotonic()
        load.wait_answers_since(listed_at, load.num_clients, "answers after the restart")  # serving goes on
    print(f"\nkilled decode-1: back and registered in {back_at - killed_at:.1f} s")
    assert after.num_restarts == 1 and after.gpus == before.gpus and after.pid != before.pid
    with pytest.raises(ProcessLookupError):
        os.kill(before.pid, 0)  # the old service process went with its actor
    # Requests on the killed worker failed cleanly (an HTTP error or an error event, at once), or were retried:
    # at most one per client (each had one request in flight), and none once the router listed it again.
    failed = [o for o in load.outcomes if o.error is not None]
    for o in failed:
        assert isinstance(o.error, openai.APIError) and not isinstance(o.error, openai.APITimeoutError), repr(o.error)
        assert o.t_start < listed_at, f"a request that started after the restart failed: {o.error!r}"
    assert len(failed) <= load.num_clients, [repr(o.error) for o in failed]
    load.assert_answers_correct(reference)


def test_scale_without_failing_inflight_requests(deployment: Deployment,
                                                 reference: Callable[[str, int], str]) -> None:
    with Load(deployment, num_clients=4, max_tokens=32) as load:
        t0 = time.monotonic()
        r = tandem("scale", "--namespace", deployment.namespace, "--address", deployment.address, "--prefill", "2",
                   "--decode", "1", timeout_s=300)
        took = time.monotonic() - t0
        load.wait_answers_since(t0 + took, load.num_clients, "answers after the scale")  # serving goes on
    assert r.returncode == 0, r.stderr + r.stdout
    summary = r.stdout.strip().splitlines()[-1]
    print(f"\nscale 1P+2D -> 2P+1D under load took {took:.1f} s: {summary}")
    # The drained decode worker was serving requests; they all finished, and no client saw an error.
    drained = re.search(r"drained 1 \((decode-\d): (\d+) in flight, all finished\)", summary)
    assert drained and int(drained.group(2)) >= 1, summary
    assert load.errors == [], load.errors[:3]
    load.assert_answers_correct(reference)
    services = deployment.services()
    live = {n: s for n, s in services.items() if s.state is ServiceState.SERVING}
    assert sorted(n for n in live if n.startswith("prefill")) == ["prefill-0", "prefill-1"]
    assert [n for n in live if n.startswith("decode")] == [n for n in ("decode-0", "decode-1")
                                                           if n != drained.group(1)]
    assert all(s.registered for n, s in live.items() if n.partition("-")[0] in ("prefill", "decode"))
    health = deployment.health()
    assert (health.get("prefill_workers"), health.get("decode_workers")) == (2, 1), health


def test_switch_tier_in_place_through_the_controller(deployment: Deployment,
                                                    reference: Callable[[str, int], str]) -> None:
    """What the planner's actuator does on Ray: a worker moves to the other tier, same process."""
    from deploy.controller import find_controller

    before = deployment.services()["prefill-1"]
    controller = find_controller(deployment.namespace)
    with Load(deployment, num_clients=3, max_tokens=32) as load:
        t0 = time.monotonic()
        result = ray.get(controller.switch_worker.remote("prefill-1", "decode"), timeout=120)
        load.wait_answers_since(time.monotonic(), load.num_clients, "answers after the switch")  # serving goes on
    after = deployment.services()["prefill-1"]
    print(f"\nswitch prefill-1 -> decode on Ray: {result.call_ms:.1f} ms ({result.switch_ms:.1f} ms in the worker), "
          f"{time.monotonic() - t0:.1f} s with the answers after it")
    assert (result.previous_role, result.role) == ("prefill", "decode")
    assert after.role == "decode" and after.pid == before.pid and after.registered
    assert load.errors == [], load.errors[:3]
    load.assert_answers_correct(reference)
    health = deployment.health()
    assert (health.get("prefill_workers"), health.get("decode_workers")) == (1, 2), health

    # Ray restarts the switched worker's actor: it comes back in the tier it was switched to.
    ray.kill(ray.get_actor(f"{deployment.namespace}.prefill-1", namespace=RAY_NAMESPACE), no_restart=False)

    def back() -> ServiceInfo | None:
        s = deployment.services()["prefill-1"]
        return s if s.state is ServiceState.SERVING and s.registered and s.worker_id != after.worker_id else None

    restarted = wait_until(back, 180, "prefill-1 to come back")
    assert restarted.role == "decode" and restarted.num_restarts == 1, restarted
    wait_until(lambda: deployment.health().get("decode_workers") == 2, 30, "the router to list it as decode")
    assert deployment.health().get("prefill_workers") == 1


def test_down_leaves_nothing_behind(deployment: Deployment) -> None:
    pids = deployment_pids(deployment.namespace)
    assert len(pids) >= 5  # the services and etcd
    t0 = time.monotonic()
    r = tandem("down", "--namespace", deployment.namespace, "--address", deployment.address, timeout_s=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr + r.stdout
    print(f"\ndown took {took:.1f} s: {r.stdout.strip()}")
    assert named_actors(deployment.namespace) == []
    groups = [g for g in ray.util.placement_group_table().values()
              if g.get("name", "").startswith(f"{deployment.namespace}.") and g.get("state") != "REMOVED"]
    assert groups == []
    wait_until(lambda: not deployment_pids(deployment.namespace), 20, "the deployment's processes to exit")
    assert not list(Path(tempfile.gettempdir()).glob(f"tandem-{deployment.namespace}.*")), "temp files left"
    assert "error" in deployment.health()
    wait_until(lambda: ray.available_resources().get("GPU") == 4, 20, "the GPUs to be free")


# ---- the warm pool on Ray: a sim-engine deployment of its own -------------------------------------
SIM: dict[str, Any] = dict(engine="sim", sim_profile="cpu-smollm2-135m", model="dummy:smollm2-135m")
POOLED: dict[str, Any] = dict(SIM, namespace=NAMESPACE + "w", mode="aggregated", num_prefill=0, num_decode=2,
                              warm_pool=1, planner=False)


@dataclass
class _Pooled:
    """The pooled deployment, as the planner drives it: through its controller."""
    d: Any
    controller: Any
    launcher: RayLauncher

    def scale(self, num_decode: int) -> Any:
        return ray.get(self.controller.scale.remote(0, num_decode, 120.0), timeout=180)

    def workers(self) -> dict[str, ServiceInfo]:
        return {n: s for n, s in self.d.services().items() if s.role in ("prefill", "decode")}


def _ray_free_gpus() -> float:
    return ray.available_resources().get("GPU", 0.0)


def _parks_under_load_and_comes_back(p: _Pooled, before: dict[str, ServiceInfo], free0: float) -> None:
    d = p.d
    # Scale down under load: the drained worker parks, its requests finished.
    with Load(d, num_clients=4, max_tokens=40, prompt=short_prompt) as load:
        t0 = time.monotonic()
        result = p.scale(1)
        down_s = time.monotonic() - t0
        load.wait_answers_since(time.monotonic(), load.num_clients, "answers after the scale-down")
    (name, drain), = result.drained.items()
    assert drain.drained and drain.num_inflight >= 1, drain
    assert load.errors == [], load.errors[:3]
    assert all((o.num_tokens, o.finish_reason) == (40, "length") for o in load.outcomes)
    parked = p.workers().get(name)
    assert parked and parked.state is ServiceState.PARKED and parked.parked_since > 0, (name, p.workers())
    assert (parked.pid, parked.actor_id) == (before[name].pid, before[name].actor_id) and not parked.registered
    os.kill(parked.pid, 0)  # the service process stays
    assert d.health().get("decode_workers") == 1  # deregistered: it serves no tier
    assert _ray_free_gpus() == free0  # a live actor keeps its Ray reservation...
    assert p.launcher.free_gpus() == free0 + 1  # ...which this deployment's next start takes first
    assert "warm pool: 1 parked" in tandem("status", "--namespace", d.namespace, "--address", d.address,
                                           timeout_s=60).stdout

    # Scale up: the same actor and process serve again (the sim engine's warm start: no restart, no load).
    t0 = time.monotonic()
    result = p.scale(2)
    up_s = time.monotonic() - t0
    assert result.plan.start == ("decode",)
    back = p.workers()
    assert set(back) == set(before)  # no new actor
    assert back[name].state is ServiceState.SERVING and back[name].registered, back[name]
    assert (back[name].pid, back[name].actor_id, back[name].num_restarts) == (parked.pid, parked.actor_id, 0)
    assert _ray_free_gpus() == free0 and d.health().get("decode_workers") == 2
    with Load(d, num_clients=4, max_tokens=8, prompt=short_prompt) as load:
        load.wait_answers_since(time.monotonic(), 8, "answers from both workers")
    assert load.errors == [], load.errors[:3]
    print(f"\nwarm pool on Ray: scale-down (drain + park) {down_s:.1f} s, scale-up from the pool {up_s:.1f} s")


def _a_dead_pool_member_is_replaced(p: _Pooled, seen: set[str], after: dict[str, ServiceInfo], free0: float) -> None:
    """A parked actor killed and restarted by Ray starts nothing; the next start replaces it with a fresh actor."""
    d = p.d
    (pname,) = [n for n, s in after.items() if s.state is ServiceState.PARKED]
    ray.kill(ray.get_actor(f"{d.namespace}.{pname}", namespace=RAY_NAMESPACE), no_restart=False)
    dead = wait_until(lambda: (s := p.workers().get(pname)) and s.state is ServiceState.DEAD and s.num_restarts == 1
                      and s, 60, f"{pname} to come back empty", lambda: p.workers())
    assert dead.pid == 0 and not dead.registered, dead
    with pytest.raises(ProcessLookupError):
        os.kill(after[pname].pid, 0)
    assert d.health().get("decode_workers") == 1
    p.scale(2)
    now = p.workers()
    (fresh,) = [s for s in now.values() if s.actor_id not in seen]
    assert fresh.state is ServiceState.SERVING and fresh.registered and fresh.num_restarts == 0, fresh
    assert len(now) == 2 and after[pname].actor_id not in {s.actor_id for s in now.values()}, now
    assert d.health().get("decode_workers") == 2
    wait_until(lambda: _ray_free_gpus() == free0, 20, "the dead pool member's reservation back to Ray")


def test_warm_pool_on_ray(ray_head: RayHead, tmp_path: Path) -> None:
    from deploy.controller import find_controller

    with deployed(ray_head, tmp_path / "pooled.yaml", **POOLED) as d:
        p = _Pooled(d, find_controller(d.namespace), RayLauncher(ClusterConfig(namespace=d.namespace,
                                                                               num_gpus_per_worker=1)))
        before, free0 = p.workers(), _ray_free_gpus()
        assert len(before) == 2 and free0 == 2, (before, free0)
        _parks_under_load_and_comes_back(p, before, free0)

        # A full pool stops the next drained worker: from 3 workers (a new actor: the pool is empty) to 1.
        p.scale(3)
        three = p.workers()
        assert len(three) == 3 and all(s.state is ServiceState.SERVING for s in three.values()), three
        result = p.scale(1)
        assert len(result.drained) == 2 and all(r.drained for r in result.drained.values()), result.drained
        after = p.workers()
        assert sorted(s.state for s in after.values()) == sorted([ServiceState.PARKED, ServiceState.SERVING]), after
        (stopped,) = set(three) - set(after)  # its actor killed, its placement group removed
        wait_until(lambda: three[stopped].pid not in deployment_pids(d.namespace), 20, "the stopped worker to exit")
        wait_until(lambda: _ray_free_gpus() == free0, 20, "its reservation back to Ray (1 serving + 1 parked hold 2)",
                   lambda: [(g["name"], g["state"]) for g in ray.util.placement_group_table().values()])

        _a_dead_pool_member_is_replaced(p, {s.actor_id for s in [*before.values(), *three.values()]}, after, free0)

        p.scale(1)
        (pname,) = [n for n, s in p.workers().items() if s.state is ServiceState.PARKED]
        _shrinking_the_pool_stops_the_parked(p, pname, free0)

        # Down stops the parked worker too: nothing left.
        assert ray.get(p.controller.resize_warm_pool.remote(1), timeout=60) == []
        p.scale(2)
        p.scale(1)
        assert sum(s.state is ServiceState.PARKED for s in p.workers().values()) == 1
        r = tandem("down", "--namespace", d.namespace, "--address", d.address, timeout_s=120)
        assert r.returncode == 0, r.stderr + r.stdout
        assert named_actors(d.namespace) == []
        assert [g for g in ray.util.placement_group_table().values()
                if g.get("name", "").startswith(f"{d.namespace}.") and g.get("state") != "REMOVED"] == []
        wait_until(lambda: not deployment_pids(d.namespace), 20, "the deployment's processes to exit")
        wait_until(lambda: _ray_free_gpus() == 4, 20, "the GPUs to be free")


def _shrinking_the_pool_stops_the_parked(p: _Pooled, pname: str, free0: float) -> None:
    """``tandem deploy pool 0``: the parked worker stops, its GPU back to Ray; later drains stop."""
    d = p.d
    r = tandem("pool", "0", "--namespace", d.namespace, "--address", d.address, timeout_s=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"stopped 1 ({pname})" in r.stdout, r.stdout
    assert pname not in p.workers() or p.workers()[pname].state is not ServiceState.PARKED, p.workers()
    wait_until(lambda: _ray_free_gpus() == free0 + 1, 20, "the parked worker's reservation back to Ray")
    p.scale(2)
    result = p.scale(1)
    (drained,) = result.drained
    assert drained not in p.workers() and not any(s.state is ServiceState.PARKED for s in p.workers().values())
    wait_until(lambda: _ray_free_gpus() == free0 + 1, 20, "the drained worker's reservation back to Ray")
    bad = tandem("pool", "-1", "--namespace", d.namespace, "--address", d.address, timeout_s=60)
    assert bad.returncode == 2 and "must be >= 0" in bad.stderr, bad.stderr


# ---- the planner acting on Ray: a sim-engine deployment of its own -------------------------------
# As tests/planner/test_planner_live.py: the CPU sim profile's decode step is ~50 ms alone and ~80 ms
# with 8 sequences, so an ITL target of 60 ms is met by one request and missed by eight; it prefills
# 256 tokens in ~0.3 s, so 8 users' ~320-token prompts queue on one prefill worker past a 500 ms TTFT
# target. From 1 prefill + 1 decode, one start fills the budget of 3: the next need is a switch. With a
# warm pool of one, the worker the planner drains at the end parks (the planner, acting through the
# controller, gets the pool).
PLANNED: dict[str, Any] = dict(
    SIM, namespace=NAMESPACE + "p", metrics_interval_s=0.5, max_local_prefill_tokens=64, num_prefill=1, num_decode=1,
    drain_timeout_s=60, min_prefill=1, min_decode=1, gpu_budget=3, itl_slo_ms=60, ttft_slo_ms=500,
    adjustment_interval_s=1, planner_window_s=3, warm_pool=1)


def short_prompt(i: int, n: int) -> str:
    return f"user {i} asks {n}"  # under max_local_prefill_tokens: prefilled on the decode worker


def long_prompt(i: int, n: int) -> str:
    return f"user {i} asks {n} " + "x" * 300  # to the prefill tier; its first block is its own (no cache hit)


@pytest.fixture(scope="module")
def planned(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(ray_head, tmp_path_factory.mktemp("planned") / "cluster.yaml", **PLANNED) as d:
        yield d


def planner_decisions(d: Deployment) -> tuple[Any, list[Any]]:
    """The planner's last decision and its history of changes, as etcd holds them."""
    from runtime import keys
    from runtime.etcd import ControlPlane
    from runtime.pb import tandem_control_pb2 as cpb

    cfg = ClusterConfig(namespace=d.namespace, etcd_endpoints=d.launcher().etcd_endpoints())

    async def read() -> tuple[Any, list[Any]]:
        async with ControlPlane.from_config(cfg) as plane:
            last = await plane.get_message(keys.planner_decision_key(d.namespace), cpb.PlannerDecision)
            history = await plane.get_messages(keys.planner_history_prefix(d.namespace), cpb.PlannerDecision)
            return last, [history[k] for k in sorted(history)]

    return asyncio.run(read())


def acted(d: Deployment) -> list[tuple[int, str, set[str], str]]:
    """Every action in the planner's history: (kind, role, the decision's reason codes, worker id)."""
    return [(a.kind, a.role, {r.code for r in h.reasons}, a.worker_id) for h in planner_decisions(d)[1]
            for a in h.actions]


def test_planner_on_ray_moves_capacity_and_back(planned: Deployment) -> None:
    """The deployment's own planner (actor planner-0, acting through the controller) under a load
    that shifts: decode-heavy load starts a decode worker (a new actor); prefill-heavy load, the
    budget full, switches a decode worker to prefill in place (same process); no traffic drains
    back to the minimums (the drained worker parks: warm_pool 1). No request fails or comes
    short, and the decisions are in etcd."""
    from runtime.pb import tandem_control_pb2 as cpb

    d = planned

    def counts() -> tuple[int, int]:
        health = d.health()
        return health.get("prefill_workers", -1), health.get("decode_workers", -1)

    assert counts() == (1, 1)
    t0 = time.monotonic()
    with Load(d, num_clients=8, max_tokens=60, prompt=short_prompt) as decode_heavy:
        wait_until(lambda: counts() == (1, 2), 90, "ITL over the target: the planner starts a decode worker",
                   lambda: acted(d))
        up_s = time.monotonic() - t0
        decoders = {s.name: s.pid for s in d.services().values() if s.role == "decode"}
        assert set(decoders) == {"decode-0", "decode-1"}, decoders  # decode-1: the actor the planner started

        t1 = time.monotonic()
        with Load(d, num_clients=8, max_tokens=2, prompt=long_prompt) as prefill_heavy:
            # The shift: prompts queue on the prefill tier, then the long answers end, so decode can
            # spare a worker before three low ticks would have drained it: the budget is full, a switch.
            decode_heavy.stop()
            wait_until(lambda: counts() == (2, 1), 90, "TTFT over the target, the budget full: a decode worker "
                       "switches to prefill")
            switch_s = time.monotonic() - t1

            def switched_actor() -> dict[str, ServiceInfo]:  # the actor learns its new tier once the call returns
                services = {n: s for n, s in d.services().items() if s.role in ("prefill", "decode")}
                return services if any(n.startswith("decode-") and s.role == "prefill"
                                       for n, s in services.items()) else {}

            workers = wait_until(switched_actor, 20, "a decode actor in the prefill tier", lambda: acted(d))
    (switched,) = [s for n, s in workers.items() if n.startswith("decode-") and s.role == "prefill"]
    assert switched.pid == decoders[switched.name] and switched.num_restarts == 0, switched  # the same process

    t2 = time.monotonic()
    wait_until(lambda: counts() == (1, 1), 60, "no traffic: the planner drains back to 1 prefill + 1 decode",
               lambda: acted(d))
    down_s = time.monotonic() - t2
    # the drained worker deregistered first; it parks once its requests are done: same actor and process
    (drained,) = wait_until(lambda: [s for s in d.services().values() if s.state is ServiceState.PARKED], 30,
                            "the drained worker to park", lambda: d.services())
    assert drained.role == "prefill" and drained.name in workers, (drained, workers)
    assert (drained.pid, drained.actor_id) == (workers[drained.name].pid, workers[drained.name].actor_id), drained
    assert drained.pid in deployment_pids(d.namespace)
    print(f"\nplanner on Ray: decode started in {up_s:.1f} s, switch in {switch_s:.1f} s, drained back in "
          f"{down_s:.1f} s ({len(decode_heavy.outcomes) + len(prefill_heavy.outcomes)} requests)")

    for load in (decode_heavy, prefill_heavy):
        assert load.errors == [], load.errors[:3]
        assert all((o.num_tokens, o.finish_reason) == (load.max_tokens, "length") for o in load.outcomes)
    last, _ = planner_decisions(d)
    assert (last.num_prefill, last.num_decode) == (1, 1) and not last.dry_run, last
    actions = acted(d)
    assert [(kind, role) for kind, role, _, _ in actions] == [
        (cpb.PlannerAction.KIND_START, "decode"), (cpb.PlannerAction.KIND_SWITCH, "prefill"),
        (cpb.PlannerAction.KIND_DRAIN, "prefill")], actions
    assert "itl-over-slo" in actions[0][2] and "ttft-over-slo" in actions[1][2] and "zero-traffic" in actions[2][2], \
        actions
