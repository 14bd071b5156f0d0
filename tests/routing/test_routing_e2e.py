"""KV-aware routing end to end: real router, workers and etcd processes.

- real model on CPU: the second request with the same long system prompt goes to the worker
  that served the first, and its prefill computes only the new blocks;
- sim engine, disaggregated: a follow-up turn goes back to the decode worker holding the
  conversation and is prefilled there (no remote prefill, no transfer);
- router replicas share in-flight load: a second router avoids the worker the first keeps busy;
- without KV events (``--no-kv-events``), the router's own decisions predict the caches;
- a request whose prefix is still on its way to the decode worker that would compute the rest (still
  prefilling on a prefill worker) waits for it to land there instead of computing it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import threading
import time
import urllib.request
from typing import Any

import aetcd

from deploy.local_cluster import Child, LocalCluster
from runtime import keys
from runtime.pb import tandem_control_pb2 as cpb

BS = 16


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


@functools.cache
def model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def complete(url: str, prompt: list[int], max_tokens: int = 4) -> dict[str, Any]:
    body = {"model": model(url), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    assert out["usage"]["completion_tokens"] == max_tokens, out
    return out


def gauges(url: str, prefix: str) -> dict[str, float]:
    """Samples of a Prometheus page whose names start with ``prefix``: 'name{labels}' -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def prompt_tokens(cluster: LocalCluster) -> dict[str, float]:
    """Prompt tokens each decode worker has admitted since it started."""
    return {c.name: gauges(c.ready["metrics"], "tandem_worker_prompt_tokens_total")["tandem_worker_prompt_tokens_total"]
            for c in cluster.workers("decode")}


def served_by(cluster: LocalCluster, before: dict[str, float], num_tokens: int) -> str:
    """The decode worker whose admitted prompt tokens grew by ``num_tokens`` since ``before``."""
    deadline = time.monotonic() + 5
    while True:
        after = prompt_tokens(cluster)
        grew = [w for w in after if after[w] - before[w] == num_tokens]
        if len(grew) == 1 or time.monotonic() > deadline:
            assert len(grew) == 1, (before, after, num_tokens)
            return grew[0]
        time.sleep(0.05)


def route_decisions(url: str) -> dict[str, float]:
    g = gauges(f"{url}/metrics", "tandem_router_route_decisions_total")
    return {path: g.get(f'tandem_router_route_decisions_total{{path="{path}"}}', 0.0) for path in ("local", "remote")}


def test_same_system_prompt_goes_back_and_computes_only_new_blocks(cpu_cluster: LocalCluster) -> None:
    url = cpu_cluster.http_url
    system = tokens(1, 10 * BS)  # ten full blocks
    before = prompt_tokens(cpu_cluster)
    first = complete(url, system + tokens(2, 20))
    worker = served_by(cpu_cluster, before, 10 * BS + 20)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for turn in range(2):
        before = prompt_tokens(cpu_cluster)
        out = complete(url, system + tokens(10 + turn, 20))
        assert served_by(cpu_cluster, before, 10 * BS + 20) == worker
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 10 * BS  # only the new tokens computed
    # The router's exact index holds the worker's blocks, from its KV events.
    indexed = gauges(f"{url}/metrics", "tandem_router_kv_indexed_blocks")
    assert indexed['tandem_router_kv_indexed_blocks{role="decode"}'] >= 10


def test_follow_up_turn_is_prefilled_where_the_conversation_lives(sim_cluster: LocalCluster) -> None:
    url = sim_cluster.http_url
    turn1 = tokens(3, 300)  # over max_local_prefill_tokens: prefilled on the prefill tier
    decisions = route_decisions(url)
    before = prompt_tokens(sim_cluster)
    complete(url, turn1, max_tokens=8)
    worker = served_by(sim_cluster, before, 300)
    assert route_decisions(url)["remote"] == decisions["remote"] + 1
    # The next turn adds 20 tokens: the decode worker that pulled turn 1 lacks only 32 of them.
    decisions = route_decisions(url)
    before = prompt_tokens(sim_cluster)
    out = complete(url, turn1 + tokens(4, 20), max_tokens=8)
    assert served_by(sim_cluster, before, 320) == worker
    assert route_decisions(url)["local"] == decisions["local"] + 1
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 300 // BS * BS


def running(worker: Child) -> float:
    return gauges(worker.ready["metrics"], "tandem_worker_num_running")["tandem_worker_num_running"]


def published_inflight(cluster: LocalCluster) -> dict[str, tuple[int, cpb.RouterInflight]]:
    """The routers' in-flight loads as published in etcd: router id -> (mod revision, message)."""
    async def read() -> dict[str, tuple[int, cpb.RouterInflight]]:
        host, port = cluster.cfg.etcd_endpoints[0].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as etcd:
            got = await etcd.get_prefix(keys.metrics_prefix(cluster.cfg.namespace, keys.ROUTER_INFLIGHT).encode())
        return {kv.key.decode().rpartition("/")[2]: (kv.mod_revision, cpb.RouterInflight.FromString(bytes(kv.value)))
                for kv in got.kvs}
    return asyncio.run(read())


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_router_replicas_share_inflight_load(sim_cluster: LocalCluster) -> None:
    replica = sim_cluster.add_router()
    try:
        # A long request through the first router keeps one decode worker busy for seconds.
        long = threading.Thread(target=complete, args=(sim_cluster.http_url, tokens(5, 40), 300))
        long.start()
        busy = wait_for(lambda: next((w.name for w in sim_cluster.workers("decode") if running(w)), None), 10,
                        "the long request to run")

        # The first router has published the request on the busy worker (at etcd revision `seen`) ...
        def first_router_published() -> tuple[str, int] | None:
            for router_id, (revision, msg) in published_inflight(sim_cluster).items():
                for worker_id, entry in msg.tiers["decode"].workers.items() if "decode" in msg.tiers else ():
                    if entry.num_requests >= 1:
                        assert worker_id.startswith(busy + "-"), (worker_id, busy)
                        return router_id, revision
            return None

        first_id, seen = wait_for(first_router_published, 10, "the first router to publish its in-flight request")
        # ... and the replica has since read it: it publishes its own, then reads its peers', so two
        # of its puts after `seen` mean one whole read after it.
        puts_after: set[int] = set()

        def replica_read_it() -> bool:
            puts_after.update(rev for rid, (rev, _) in published_inflight(sim_cluster).items()
                              if rid != first_id and rev > seen)
            return len(puts_after) >= 2

        wait_for(replica_read_it, 10, "the replica to read the first router's in-flight load")
        # The replica has no request of its own there, yet sends its short ones elsewhere.
        for i in range(5):
            before = prompt_tokens(sim_cluster)
            complete(replica.ready["http"], tokens(100 + i, 40), max_tokens=2)
            assert served_by(sim_cluster, before, 40) != busy
            assert long.is_alive()
        long.join(60)
    finally:
        replica.proc.terminate()
        replica.proc.wait(10)


def test_without_kv_events_past_decisions_predict_the_cache(sim_cluster: LocalCluster) -> None:
    replica = sim_cluster.add_router(kv_events=False)
    try:
        url = replica.ready["http"]
        system = tokens(6, 10 * BS)
        before = prompt_tokens(sim_cluster)
        complete(url, system + tokens(7, 20))
        worker = served_by(sim_cluster, before, 10 * BS + 20)
        decisions = route_decisions(url)
        before = prompt_tokens(sim_cluster)
        out = complete(url, system + tokens(8, 20))
        # Predicted overlap 10 blocks: 20 tokens left, under max_local_prefill_tokens: local.
        assert served_by(sim_cluster, before, 10 * BS + 20) == worker
        assert route_decisions(url)["local"] == decisions["local"] + 1
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 10 * BS
        indexed = gauges(f"{url}/metrics", "tandem_router_kv_indexed_blocks")
        assert indexed['tandem_router_kv_indexed_blocks{role="decode"}'] >= 10  # the TTL index
    finally:
        replica.proc.terminate()
        replica.proc.wait(10)


def planned(url: str) -> tuple[float, float]:
    """Requests the router has planned (each is planned once before any wait), and those it has sent on
    to a decode worker (with their final plan)."""
    g = gauges(f"{url}/metrics", "tandem_router_")
    return (g.get("tandem_router_decision_seconds_count", 0.0),
            g.get('tandem_router_kv_overlap_blocks_count{role="decode"}', 0.0))


@contextlib.contextmanager
def frozen(children: list[Child]):
    """SIGSTOP the processes (they accept calls and answer none), SIGCONT them on the way out."""
    for child in children:
        os.kill(child.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for child in children:
            os.kill(child.proc.pid, signal.SIGCONT)


def first_then_same_prefix(url: str, frozen_workers: list[Child], first: list[int], second: list[int],
                           max_tokens: int) -> dict[str, Any]:
    """``first`` routed while ``frozen_workers`` answer nothing, then ``second``, whose prefix is then on
    its way to the worker that would compute the rest: the second is planned but not sent on before
    the first's prompt is there. The workers resume once the router has planned both. The second's answer."""
    out: dict[str, dict[str, Any]] = {}

    def send(name: str, prompt: list[int]) -> threading.Thread:
        thread = threading.Thread(target=lambda: out.__setitem__(name, complete(url, prompt, max_tokens)))
        thread.start()
        return thread

    decided, sent = planned(url)
    with frozen(frozen_workers):  # a short stop: their etcd leases (2 s) outlive it
        threads = [send("first", first)]
        wait_for(lambda: planned(url) == (decided + 1, sent + 1), 10, "the first request to be sent")
        threads.append(send("second", second))
        wait_for(lambda: planned(url)[0] == decided + 2, 10, "the second request's plan")
        assert planned(url) == (decided + 2, sent + 1)  # the second waits
    for thread in threads:
        thread.join(60)
    assert set(out) == {"first", "second"} and planned(url) == (decided + 2, sent + 2)
    return out["second"]


def test_prefix_on_its_way_to_the_decode_worker_is_waited_for(sim_cluster: LocalCluster) -> None:
    # The first prompt prefills on a prefill worker (frozen meanwhile) and moves to its decode worker D.
    # The second shares its 18 blocks and adds 20 tokens: D computes those 20 itself (they are under
    # max_local_prefill_tokens), but only once the 18 blocks have landed there, not all 308 at once.
    prefix = tokens(9, 18 * BS)
    before = prompt_tokens(sim_cluster)
    second = first_then_same_prefix(sim_cluster.http_url, sim_cluster.workers("prefill"), prefix + tokens(10, 12),
                                    prefix + tokens(11, 20), 4)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 18 * BS
    after = prompt_tokens(sim_cluster)
    assert sorted(after[w] - before[w] for w in after) == [0, 300 + 308]  # both on D
