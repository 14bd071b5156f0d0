"""The control plane down, sustained overload, and what both leave behind.

- etcd stopped for ``TANDEM_ETCD_OUTAGE_S`` (10 s here; the issue's 30 s: ``TANDEM_ETCD_OUTAGE_S=30``)
  and restarted empty on its port: serving goes on from the last known membership (every request
  answered), the workers and the router re-register under new leases, a worker added afterwards is
  routed to, and a router started afterwards lists every worker.
- ``TANDEM_LOAD_CLIENTS`` (500) streaming clients for ``TANDEM_LOAD_S`` (20 s here; the issue's
  60 s: ``TANDEM_LOAD_S=60``) against a router with a queue bound: only 200s and 429s, admitted
  TTFT bounded, the router's Python heap (traced: ``router.heap``) grown by less than 16 KB per
  request served between idle moments before and after, the workers' RSS flat from half-way;
  afterwards every worker is idle and a router started then lists every worker (the workers'
  registrations outlive a load that starves their lease keep-alives: they are put back under a
  new lease).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
from hardening_lib import (
    completion,
    get,
    live,
    post,
    router_lists,
    start_router,
    stop_router,
    wait_nothing_leaked,
    wait_serves,
    wait_until,
)
from loadgen import run_load

from deploy.local_cluster import LocalCluster
from router import heap
from runtime.etcd_server import EtcdServer

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(420)]
# 10 s: five lease TTLs (LEASE_TTL_S, 2 s) and five of the etcd client's longest reconnect backoffs
# (2 s, runtime/etcd.py): every lease is gone and every client has backed off to its cap well
# before the restart, as in the 30 s, 20 s sooner.
OUTAGE_S = float(os.environ.get("TANDEM_ETCD_OUTAGE_S", "10"))
LOAD_S = float(os.environ.get("TANDEM_LOAD_S", "20"))
LOAD_CLIENTS = int(os.environ.get("TANDEM_LOAD_CLIENTS", "500"))
# The first RSS mark: the 20 s of its 60 s run; in a shorter run, half-way. The router's
# RSS climbs while the open streams pile up and is flat after ~11 s (each second, MB, 20 s runs:
# 93 104 113 119 124 124 129 133 134 137 138 .. 142 alone; 95 .. 138 141 141 .. 144 beside a CPU
# hog), so a mark at a third of 20 s fell on the climb (+11.3%, +11.8% under load, no leak).
EARLY_S = 20.0 if LOAD_S >= 60 else LOAD_S / 2
HEAP_BOUND_B = 16 << 10  # the router's heap growth per request served (below)
SITE_BOUND_B = 8 << 10  # the same at any one allocation site
MAX_QUEUED = 64  # the load test router's max_queued_requests (per tier)


def _expected(cluster: LocalCluster) -> dict[str, int]:
    return {"prefill": len(live(cluster, "prefill")), "decode": len(live(cluster, "decode"))}


def _new_router_lists_everyone(cluster: LocalCluster) -> float:
    """A router started now (it knows only what etcd holds) lists every live worker; how long it took."""
    t0 = time.monotonic()
    router = start_router(cluster)
    try:
        want = _expected(cluster)
        wait_until(lambda: router_lists(cluster, router.ready["http"]) == want, 10,
                   f"a new router to list {want} (etcd holds every registration)")
        return time.monotonic() - t0
    finally:
        stop_router(router)


def test_etcd_outage(sim_cluster: LocalCluster) -> None:
    etcd = sim_cluster.etcd
    assert etcd is not None
    client_port, peer_port = etcd.client_port, etcd.peer_port
    answers: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            answers.append(completion(sim_cluster, prompt=f"{len(answers)} outage", max_tokens=4)[0])
            time.sleep(0.3)

    etcd.stop()  # data dir removed: the new etcd starts empty
    t_down = time.monotonic()
    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(OUTAGE_S)
    sim_cluster.etcd = EtcdServer(host=sim_cluster.cfg.host, client_port=client_port, peer_port=peer_port).start()
    t_up = time.monotonic()
    want = _expected(sim_cluster)
    wait_until(lambda: router_lists(sim_cluster) == want, 20, f"the router to list {want} after the restart")
    relisted_s = time.monotonic() - t_up
    stop.set()
    thread.join()
    assert answers and set(answers) == {200}, answers
    added = sim_cluster.add_worker("decode", timeout_s=120)  # routed to: the router lists it
    seen_s = _new_router_lists_everyone(sim_cluster)
    print(f"etcd outage {t_up - t_down:.1f} s: {len(answers)}/{len(answers)} requests 200 meanwhile; every worker "
          f"listed {relisted_s:.2f} s after the restart; a worker added afterwards listed; a new router saw every "
          f"worker in {seen_s:.2f} s")
    added.proc.terminate()
    added.proc.wait(20)
    wait_until(lambda: router_lists(sim_cluster) == _expected(sim_cluster), 10, "the router to drop the added worker")
    wait_nothing_leaked(sim_cluster)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _heap(url: str, query: str = "") -> dict:
    """The router's traced Python heap (``router.heap``)."""
    status, _, raw = get(f"{url}{heap.PATH}{query}")
    assert status == 200, (status, raw)
    return json.loads(raw)


def _warm(url: str, model: str) -> None:
    """What a router builds once, at its first requests (lazily imported modules, compiled
    validators), built before the heap's baseline: streamed and whole, text and token prompts."""
    for i, stream in enumerate((True, False, True)):
        status, _, raw = post(f"{url}/v1/completions", {"model": model, "prompt": [100 + i] * 80 if i else "warm",
                                                        "max_tokens": 4, "stream": stream, "ignore_eos": True})
        assert status == 200, raw


def test_500_streaming_clients(sim_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(heap.ENV, "1")  # this router traces its Python heap: the leak check below
    router = start_router(sim_cluster, max_queued_requests=MAX_QUEUED)
    try:
        url, model = router.ready["http"], sim_cluster.router["model"]
        wait_serves(url)
        _warm(url, model)
        before = _heap(url, "?baseline=1")["traced_bytes"]
        workers = {"prefill": live(sim_cluster, "prefill")[0].proc.pid,
                   **{c.name: c.proc.pid for c in live(sim_cluster, "decode")}}
        marks: dict[str, dict[str, float]] = {}
        router_rss: list[int] = []

        def tick(elapsed_s: float, _result: object) -> None:
            router_rss.append(round(_rss_mb(router.proc.pid)))
            if "early" not in marks and elapsed_s >= EARLY_S:
                marks["early"] = {name: _rss_mb(pid) for name, pid in workers.items()}

        t0 = time.monotonic()
        result = asyncio.run(run_load(url, model, LOAD_CLIENTS, LOAD_S, on_tick=tick))
        load_s = time.monotonic() - t0  # the clients' last requests drained too
        marks["end"] = {name: _rss_mb(pid) for name, pid in workers.items()}
        growth = {name: marks["end"][name] / marks["early"][name] - 1 for name in workers}
        wait_nothing_leaked(sim_cluster, timeout_s=60)  # drained: the router is idle again too
        after = _heap(url, "?top=8")
        served = result.statuses[200]
        per_request = (after["traced_bytes"] - before) / max(served, 1)
        grown = [site for site in after["top"] if site["grown_bytes"] > 0]
        print(f"{LOAD_CLIENTS} clients, {time.monotonic() - t0:.0f} s: {dict(result.statuses)}; errors "
              f"{dict(result.errors)} {result.error_messages}; admitted TTFT p50 {result.percentile(0.5):.2f} s, p99 "
              f"{result.percentile(0.99):.2f} s; router heap {before / 2**20:.1f} -> "
              f"{after['traced_bytes'] / 2**20:.1f} MB idle before and after "
              f"({per_request / 1024:.1f} KB per request served, peak "
              f"{after['peak_bytes'] / 2**20:.0f} MB); worker RSS growth {EARLY_S:.0f} s -> end: "
              + ", ".join(f"{k} {v * 100:+.1f}% ({marks['end'][k]:.0f} MB)" for k, v in growth.items()))
        print(f"router RSS (MB) each second: {router_rss}; heap grown most at: "
              + ", ".join(f"{s['site']} {s['grown_bytes'] / 1024:+.0f} KB" for s in grown))
        assert not result.errors and set(result.statuses) <= {200, 429}, result
        # Admitted requests keep being served (about 2 waves of clients here alone; a loaded CI
        # machine served 491 in 20 s): a wedged queue would answer a few, then only 429s.
        assert served > LOAD_CLIENTS // 4 and result.statuses[429] > 0
        # Admitted TTFT is bounded by the queue bound: a request waits behind at most what the two
        # tiers' queues hold (2 x max_queued_requests), served at the run's own rate. Measured here
        # as (p99 TTFT) x (served per second): 92 (500 in 27 s, p99 4.96 s) and on a slower CI
        # machine 124 (392 in 32 s, p99 10.13 s, over the fixed 10 s bound this replaced). A
        # request held back 20 s (every 50th, on purpose in the router) gives p99 >= 20 s: fails.
        rate = served / load_s
        bound_s = 1.5 * 2 * MAX_QUEUED / rate
        assert result.percentile(0.99) < bound_s, (result.percentile(0.99), bound_s, rate)
        # The router's leak check: what its live Python objects hold once idle again, against the
        # same before the load (after warm-up requests), per request served. What it keeps by
        # design grows with the requests too, up to bounds a 20 s run does not reach (the routed
        # prompts' blocks, kv_index_ttl_s; the request window): 5.6-8.5 KB a request alone (500-930
        # served), its largest site ~1.2 KB. A leak of 20 KB per admitted request measured 26.9
        # KB (RSS from the mark: +4.6%, under the old 10% bound), 100 KB 103.5 KB.
        # Not RSS: it follows the streams open at a moment (it climbs through the run, +11% from
        # half-way once on a loaded CI machine, no leak).
        assert per_request < HEAP_BOUND_B, (per_request, grown)
        assert all(s["grown_bytes"] / max(served, 1) < SITE_BOUND_B for s in grown), grown
        # The workers' RSS (no tracing there): flat from the mark to the end. The issue's bound (5%
        # from the 20 s mark to the end) is for its 60 s run (TANDEM_LOAD_S=60); a shorter run's
        # mark is half-way (EARLY_S).
        bound = 0.05 if LOAD_S >= 60 else 0.10
        assert all(g <= bound for g in growth.values()), (growth, bound)
        seen_s = _new_router_lists_everyone(sim_cluster)
        print(f"after the load: a new router saw every worker in {seen_s:.2f} s")
    finally:
        stop_router(router)
