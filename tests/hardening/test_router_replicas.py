"""Two router replicas on one cluster, one SIGKILLed under load: the other goes on serving (its
clients see no error), and the in-flight load the dead one had published in etcd
(``metrics/router_inflight/{router_id}``, under its lease) is forgotten by the live one within
that lease: ``tandem_router_peer_inflight_requests`` drops to 0. The workers free the dead
router's requests (its gRPC calls end with its process) and nothing leaks."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest
from hardening_lib import (
    CONFIG,
    LEASE_TTL_S,
    get,
    live,
    load,
    start_router,
    wait_nothing_leaked,
    wait_serves,
    wait_until,
)

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)
STREAMS = 6  # long streams held open through the replica that is killed
# The dead replica's key goes with its lease: at most the TTL after its last keep-alive, then the
# live replica's next read (every metrics_interval_s); + 2 s for a loaded machine (etcd checks
# expiries every 0.5 s, and the keep-alive may have been sent just before the kill).
FORGOTTEN_WITHIN_S = LEASE_TTL_S + CONFIG["metrics_interval_s"] + 2.0


def _peer_inflight(url: str, role: str = "decode") -> float:
    for line in get(f"{url}/metrics")[2].decode().splitlines():
        if line.startswith(f'tandem_router_peer_inflight_requests{{role="{role}"}}'):
            return float(line.split()[-1])
    return 0.0


def _hold_stream(client: openai.OpenAI, model: str, started: threading.Semaphore) -> None:
    """A long stream through the replica that will die; it ends with the process."""
    try:
        stream = client.completions.create(model=model, prompt="Count:", max_tokens=3000, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                started.release()
    except Exception:  # its router was killed (a connection error, a cut chunked body)
        pass


def _keep_asking(client: openai.OpenAI, model: str, stop: threading.Event, answers: list[str]) -> None:
    """Short completions through the live replica, back to back, until ``stop``."""
    while not stop.is_set():
        try:
            out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4,
                                            extra_body={"ignore_eos": True})
            answers.append(out.choices[0].finish_reason or "?")
        except openai.OpenAIError as e:
            answers.append(f"error: {e!r}")


def test_router_replica_killed_under_load(sim_cluster: LocalCluster) -> None:
    model = sim_cluster.router["model"]
    doomed = start_router(sim_cluster)
    wait_serves(doomed.ready["http"])
    survivor = openai.OpenAI(base_url=f"{sim_cluster.http_url}/v1", api_key="none", max_retries=0, timeout=30)
    victim_client = openai.OpenAI(base_url=f"{doomed.ready['http']}/v1", api_key="none", max_retries=0, timeout=60)
    started = threading.Semaphore(0)
    streams = [threading.Thread(target=_hold_stream, args=(victim_client, model, started), daemon=True)
               for _ in range(STREAMS)]
    stop, answers = threading.Event(), []
    askers = [threading.Thread(target=_keep_asking, args=(survivor, model, stop, answers)) for _ in range(2)]
    try:
        for t in streams + askers:
            t.start()
        for _ in range(STREAMS):
            assert started.acquire(timeout=30), "the streams through the second replica did not start"
        # the survivor sees the doomed replica's streams as its peer's load
        wait_until(lambda: _peer_inflight(sim_cluster.http_url) >= STREAMS, 10,
                   "the live router to see the other replica's in-flight requests")
        before = len(answers)
        os.kill(doomed.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: _peer_inflight(sim_cluster.http_url) == 0, FORGOTTEN_WITHIN_S + 5,
                   "the dead replica's in-flight load to be forgotten", interval_s=0.05)
        forgotten_s = time.monotonic() - t0
        for t in streams:
            t.join(10)
        wait_until(lambda: len(answers) >= before + 10, 30, "the live router to keep answering")
    finally:
        stop.set()
        for t in askers:
            t.join(30)
        if doomed.proc.poll() is None:
            doomed.proc.kill()
        doomed.proc.wait(10)
    errors = [a for a in answers if a.startswith("error")]
    print(f"router replica SIGKILLed with {STREAMS} streams in flight: its load forgotten by the other "
          f"{forgotten_s:.2f} s after the kill (bound {FORGOTTEN_WITHIN_S:.2f} s); the other answered "
          f"{len(answers)} requests meanwhile, {len(errors)} errors")
    assert not errors, errors[:3]
    assert forgotten_s < FORGOTTEN_WITHIN_S
    # the dead router's streams ended on the workers too (its channels closed with its process)
    wait_until(lambda: not any(load(c).num_running for c in live(sim_cluster, "decode")), 15,
               "the decode workers to drop the dead router's streams")
    wait_nothing_leaked(sim_cluster)
