"""A client that goes away aborts its request on the workers: their block accounting (Health)
shows every block free, nothing running and nothing pinned within a bounded time."""

from __future__ import annotations

import pytest
import requests
from serving_testlib import (
    LONG_PROMPTS,
    fresh,
    live,
    model,
    router_metrics_url,
    sample,
    wait_until,
    wait_workers_idle,
    worker_load,
)

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(300)

FREED_WITHIN_S = 10.0
# Generating this many tokens takes minutes here: if the workers are idle seconds after the
# client left, the request was aborted, not finished.
LONG_RUN = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def _decode_running(cluster: LocalCluster) -> bool:
    return worker_load(live(cluster, "decode")[0]).num_running > 0


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_streaming_client_disconnect_frees_blocks(disagg_cluster: LocalCluster, api: str) -> None:
    wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    if api == "completions":
        path, body = "/v1/completions", {"prompt": fresh(LONG_PROMPTS[0])}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": fresh(LONG_PROMPTS[0])}]}
    remote0 = sample(router_metrics_url(disagg_cluster), "tandem_router_route_decisions_total", path="remote")
    with requests.Session() as session:
        resp = session.post(disagg_cluster.http_url + path, json={"model": model(disagg_cluster), "stream": True,
                                                                   **body, **LONG_RUN}, stream=True, timeout=30)
        assert resp.status_code == 200
        events = (line for line in resp.iter_lines() if line)
        for _ in range(5):
            assert next(events).startswith(b"data: {")
        assert _decode_running(disagg_cluster)
        resp.close()  # drops the connection mid-stream
    # prefilled on the prefill worker, so both workers held its blocks
    assert sample(router_metrics_url(disagg_cluster), "tandem_router_route_decisions_total", path="remote") == \
        remote0 + 1
    took = wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    print(f"blocks freed {took:.2f} s after the disconnect")


def test_non_streaming_client_timeout_frees_blocks(disagg_cluster: LocalCluster) -> None:
    wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    router = router_metrics_url(disagg_cluster)
    disconnected0 = sample(router, "tandem_router_requests_total", api="completions", status="499")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(disagg_cluster.http_url + "/v1/completions",
                      json={"model": model(disagg_cluster), "prompt": LONG_PROMPTS[1], **LONG_RUN}, timeout=(5, 3))
    took = wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    print(f"blocks freed {took:.2f} s after the client timed out")
    wait_until(lambda: sample(router, "tandem_router_requests_total", api="completions", status="499")
               == disconnected0 + 1, 5, "the router to count the disconnect")


@pytest.mark.slow
def test_disconnect_during_remote_prefill_frees_blocks(disagg_cluster: LocalCluster) -> None:
    """The client leaves while the prefill worker is still computing the prompt: the prefill is
    aborted (or its pinned handle released) rather than left pinned until its lease ends."""
    wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    prompt = fresh(" ".join(f"item {i}," for i in range(175)))  # ~700 tokens: seconds of prefill on one thread
    (prefill,) = live(disagg_cluster, "prefill")
    (decode,) = live(disagg_cluster, "decode")
    prefill_tokens0 = sample(prefill.ready["metrics"], "tandem_worker_prompt_tokens_total")
    decode_tokens0 = sample(decode.ready["metrics"], "tandem_worker_prompt_tokens_total")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(disagg_cluster.http_url + "/v1/completions",
                      json={"model": model(disagg_cluster), "prompt": prompt, **LONG_RUN}, timeout=(5, 1.0))
    took = wait_workers_idle(disagg_cluster, FREED_WITHIN_S)
    print(f"blocks freed {took:.2f} s after the client left during the prefill")
    # the prefill worker took the prompt; the request never reached the decode worker
    assert sample(prefill.ready["metrics"], "tandem_worker_prompt_tokens_total") - prefill_tokens0 > 600
    assert sample(decode.ready["metrics"], "tandem_worker_prompt_tokens_total") == decode_tokens0
