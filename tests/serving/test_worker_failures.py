"""Workers dying (SIGKILL) under load: no request is lost to a failed KV pull, a decode worker's
clients get a clean error rather than a hang, the router forgets dead workers within the etcd
lease TTL, and a replacement worker serves at once.

These kill cluster workers (the TCP cluster's, and the NIXL cluster's prefill worker), so they
run after every other serving test."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import openai
import pytest
import requests
from serving_testlib import (
    LEASE_TTL_S,
    LONG_PROMPTS,
    NIXL,
    assert_same_completion,
    client,
    generate_direct,
    greedy_completion,
    live,
    model,
    router_metrics_url,
    sample,
    wait_until,
    wait_workers_idle,
    worker_load,
    worker_stub,
)

from deploy.local_cluster import Child, LocalCluster
from kv_transfer import PeerMetadata
from runtime.pb import tandem_worker_pb2 as wpb

pytestmark = [pytest.mark.destructive, pytest.mark.slow, pytest.mark.timeout(400)]

# etcd expires a lease within its TTL of the last keep-alive (its lessor looks every 0.5 s and the
# revoke goes through raft); then the watch event reaches the router's event loop. On CI's loaded
# two-core machine the whole took 4.27-4.29 s with a 2 s TTL, so allow the TTL twice over: a router
# that polled etcd, or forgot workers only when a call to them failed, would still be caught.
DROPPED_WITHIN_S = LEASE_TTL_S + 4.0
PROMPT_IDS = [(i * 7919) % 20000 + 100 for i in range(40)]  # 40 tokens: 3 blocks, the last one partial


def _kill(child: Child) -> float:
    """SIGKILL a worker; return the monotonic time of the kill."""
    child.proc.kill()
    t = time.monotonic()
    child.proc.wait(10)
    return t


def _wait_router_drops(cluster: LocalCluster, role: str, killed_at: float) -> float:
    """How long after the kill the router's etcd view lost the worker."""
    url = router_metrics_url(cluster)
    wait_until(lambda: sample(url, "tandem_router_workers", role=role) == 0, DROPPED_WITHIN_S + 5,
               f"the router to drop the dead {role} worker")
    return time.monotonic() - killed_at


@pytest.mark.parametrize("transport", ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not NIXL, reason="the nixl package is not installed"))])
def test_prefill_killed_between_prefill_and_pull_recomputes(request: pytest.FixtureRequest, transport: str,
                                                            agg_cluster: LocalCluster) -> None:
    """Driven over the workers' own gRPC: Prefill on the prefill worker, SIGKILL it, then
    Generate on the decode worker with the handle: the pull fails and the decode worker
    recomputes the prompt, with the aggregated answer."""
    cluster: LocalCluster = request.getfixturevalue("tcp_cluster" if transport == "tcp" else "disagg_cluster")
    want, _ = generate_direct(live(agg_cluster, "decode")[0], f"ref-{uuid.uuid4().hex}", PROMPT_IDS, 12)
    (prefill,) = live(cluster, "prefill")
    (decode,) = live(cluster, "decode")
    rid = f"kill-{uuid.uuid4().hex}"
    sampling = wpb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    channel, stub = worker_stub(prefill)
    with channel:
        first = stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT_IDS, sampling=sampling),
                             timeout=60)
    peer = PeerMetadata.decode(first.handle.transport_metadata)
    assert first.HasField("handle") and peer.transport == transport and len(first.handle.block_ids) == 3
    assert list(first.outputs[0].token_ids) == list(first.handle.first_token_ids) == want[:1]

    timeouts = sample(decode.ready["metrics"], "tandem_kv_transfer_failures_total", transport=transport,
                      reason="timeout")
    killed_at = _kill(prefill)  # the blocks the handle points at are gone with the process
    t0 = time.monotonic()
    rest, pull = generate_direct(decode, rid, PROMPT_IDS, 12, handle=first.handle)
    recompute_s = time.monotonic() - t0
    assert pull is not None and pull.recomputed and pull.num_pulled_blocks == 0
    assert want[:1] + rest == want
    assert sample(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total") >= 1
    # The handoff found the prefill worker gone: no transfer ran into its deadline, and the decode
    # worker did not wait kv_pull_timeout_s (which also bounds holding blocks after a failed push).
    assert sample(decode.ready["metrics"], "tandem_kv_transfer_failures_total", transport=transport,
                  reason="timeout") == timeouts
    assert pull.pull_ms < cluster.cfg.kv_pull_timeout_s * 1000, pull
    wait_workers_idle(cluster, 30)

    # No request touched the dead worker through the router: only etcd can tell it.
    dropped_s = _wait_router_drops(cluster, "prefill", killed_at)
    print(f"{transport}: recomputed in {recompute_s:.2f} s; the router dropped the prefill worker {dropped_s:.2f} s "
          "after SIGKILL")
    assert dropped_s < DROPPED_WITHIN_S
    # Long prompts are now prefilled on the decode worker, still with the aggregated answer.
    got = greedy_completion(cluster, LONG_PROMPTS[0])
    assert_same_completion(got, greedy_completion(agg_cluster, LONG_PROMPTS[0]), LONG_PROMPTS[0])


def test_decode_killed_mid_stream(tcp_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    (decode,) = live(tcp_cluster, "decode")
    name = model(tcp_cluster)
    long_run: dict[str, Any] = {"max_tokens": 4000, "temperature": 0}
    stream = client(tcp_cluster, timeout_s=30).completions.create(model=name, prompt=LONG_PROMPTS[1], stream=True,
                                                                  extra_body={"ignore_eos": True}, **long_run)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    # and a non-streamed request in flight on the same worker
    blocking: dict[str, Any] = {}

    def call() -> None:
        resp = requests.post(tcp_cluster.http_url + "/v1/completions", timeout=30,
                             json={"model": name, "prompt": "Count to a thousand:", "ignore_eos": True, **long_run})
        blocking.update(status=resp.status_code, body=resp.json())

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: worker_load(decode).num_running == 2, 10, "both requests to run on the decode worker")

    router_url = router_metrics_url(tcp_cluster)
    failures = sample(router_url, "tandem_router_worker_failures_total", role="decode")
    killed_at = _kill(decode)
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    error_s = time.monotonic() - killed_at
    # The router's own error (a hang would end in the client's 30 s timeout, which has no body),
    # from the broken streams themselves: its failure counter moved once for each.
    assert failed.value.body is not None and failed.value.body["code"] == "worker_failed", failed.value
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert blocking["status"] == 502 and blocking["body"]["error"]["code"] == "worker_failed", blocking
    assert sample(router_url, "tandem_router_worker_failures_total", role="decode") == failures + 2

    # The router stops routing to it at once (no_workers: it did not try the dead worker; a try
    # would say worker_failed and count a failure), and forgets it when etcd expires its lease.
    resp = requests.post(tcp_cluster.http_url + "/v1/completions", json={"model": name, "prompt": "hi"}, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_workers", resp.text
    assert sample(router_url, "tandem_router_worker_failures_total", role="decode") == failures + 2
    health = requests.get(tcp_cluster.http_url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["decode_workers"] == 0
    dropped_s = _wait_router_drops(tcp_cluster, "decode", killed_at)
    print(f"clients got an error {error_s:.2f} s and the router dropped the decode worker {dropped_s:.2f} s "
          "after SIGKILL")
    assert dropped_s < DROPPED_WITHIN_S

    # A new decode worker serves new requests, with the aggregated answer.
    tcp_cluster.add_worker("decode")
    assert requests.get(tcp_cluster.http_url + "/health", timeout=10).json()["decode_workers"] == 1
    got = greedy_completion(tcp_cluster, LONG_PROMPTS[1])
    assert_same_completion(got, greedy_completion(agg_cluster, LONG_PROMPTS[1]), LONG_PROMPTS[1])
    streamed = client(tcp_cluster).chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                                           max_completion_tokens=4, stream=True)
    assert any(c.choices and c.choices[0].finish_reason for c in streamed)
