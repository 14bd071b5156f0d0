"""The push handoff through real worker processes (the TCP cluster: the prefill worker writes into
blocks the decode worker allocated, ``PushKV``): many requests' pushes from one prefill worker at
once, one of them forced to time out inside the transport: only that request recomputes, every
output equals aggregated, and every hold on the prefill worker is released."""

from __future__ import annotations

import concurrent.futures
import random
import time
import uuid

import grpc
import pytest
from serving_testlib import generate_direct, live, sample, wait_until, worker_load, worker_stub

from deploy.local_cluster import LocalCluster
from runtime.pb import tandem_worker_pb2 as wpb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_one_forced_timeout_among_concurrent_pushes_recomputes_only_that_request(
        tcp_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    (decode,), (prefill,) = live(tcp_cluster, "decode"), live(tcp_cluster, "prefill")
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(6)]
    want = [generate_direct(live(agg_cluster, "decode")[0], f"ref-{uuid.uuid4().hex}", p, 8)[0] for p in prompts]
    ids = [f"push-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
    ids[2] = f"forced-timeout-{uuid.uuid4().hex[:6]}"
    sampling = wpb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    channel, stub = worker_stub(prefill)
    with channel:
        firsts = [stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=p, sampling=sampling), timeout=60)
                  for rid, p in zip(ids, prompts)]
    assert worker_load(prefill).num_pinned_blocks == sum(len(f.handle.block_ids) for f in firsts)
    metrics = decode.ready["metrics"], prefill.ready["metrics"]
    fallbacks0 = sample(metrics[0], "tandem_kv_pull_fallbacks_total")
    timeouts0 = sample(metrics[1], "tandem_kv_transfer_failures_total", transport="tcp", reason="timeout")
    pushed0 = sample(metrics[1], "tandem_kv_held_releases_total", reason="pushed")

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda a: generate_direct(decode, a[0], a[1], 8, handle=a[2].handle),
                                zip(ids, prompts, firsts)))
    for i, ((rest, stats), first) in enumerate(zip(results, firsts)):
        assert list(first.outputs[0].token_ids) + rest == want[i], i
        assert stats is not None and stats.pushed and stats.recomputed == (i == 2), (i, stats)
        assert stats.num_pulled_blocks == (0 if i == 2 else len(first.handle.block_ids)), (i, stats)
    assert sample(metrics[0], "tandem_kv_pull_fallbacks_total") - fallbacks0 == 1
    assert sample(metrics[1], "tandem_kv_transfer_failures_total", transport="tcp", reason="timeout") - timeouts0 == 1
    # every push ended its hold, the failed one too
    assert sample(metrics[1], "tandem_kv_held_releases_total", reason="pushed") - pushed0 == len(prompts)
    wait_until(lambda: worker_load(prefill).num_pinned_blocks == 0, 30, "every hold released")


@pytest.mark.parametrize("release", ["unpin", "abort"])
def test_a_push_of_a_released_hold_is_refused_and_recomputed(release: str, tcp_cluster: LocalCluster,
                                                             agg_cluster: LocalCluster) -> None:
    """The router gave the handle up (Unpin) or aborted the request before the decode worker asked
    for its blocks: PushKV answers NOT_FOUND, the decode worker recomputes, the output is still
    aggregated's."""
    (decode,), (prefill,) = live(tcp_cluster, "decode"), live(tcp_cluster, "prefill")
    prompt = [random.Random(9).randrange(100, 40000) for _ in range(40)]
    want, _ = generate_direct(live(agg_cluster, "decode")[0], f"ref-{uuid.uuid4().hex}", prompt, 8)
    rid = f"released-{uuid.uuid4().hex[:6]}"
    sampling = wpb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reason = {"unpin": "unpinned", "abort": "aborted"}[release]
    released0 = sample(prefill.ready["metrics"], "tandem_kv_held_releases_total", reason=reason)
    channel, stub = worker_stub(prefill)
    with channel:
        first = stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                             timeout=60)
        if release == "unpin":
            assert stub.Unpin(wpb.UnpinRequest(request_id=rid), timeout=10).unpinned
            assert not stub.Unpin(wpb.UnpinRequest(request_id=rid), timeout=10).unpinned
        else:
            assert stub.Abort(wpb.AbortRequest(request_id=rid), timeout=10).aborted
            assert not stub.Abort(wpb.AbortRequest(request_id=rid), timeout=10).aborted
    assert sample(prefill.ready["metrics"], "tandem_kv_held_releases_total", reason=reason) - released0 == 1
    rest, stats = generate_direct(decode, rid, prompt, 8, handle=first.handle)
    assert stats is not None and stats.recomputed and stats.num_pulled_blocks == 0
    assert list(first.outputs[0].token_ids) + rest == want
    wait_until(lambda: worker_load(prefill).num_pinned_blocks == 0, 30, "every hold released")


def test_a_handle_sent_ahead_is_pushed_when_the_prefill_ends_or_aborted_for_a_call_with_the_whole_handle(
        tcp_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    """As the router does it: Generate on the decode worker with the handle sent ahead (no blocks,
    no first token) before Prefill has even reached the prefill worker. The push waits there for
    the prefill and lands; the decode worker's stream is aggregated's less the first token. When
    that push fails (forced timeout), the call ends ABORTED with nothing streamed; the same request
    id called again on the same worker with the whole handle recomputes (the hold is gone) from the
    prefill worker's first token: the output is still aggregated's, no token twice."""
    (decode,), (prefill,) = live(tcp_cluster, "decode"), live(tcp_cluster, "prefill")
    rng = random.Random(11)
    prompts = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(2)]
    want = [generate_direct(live(agg_cluster, "decode")[0], f"ref-{uuid.uuid4().hex}", p, 8)[0] for p in prompts]
    ids = [f"ahead-{uuid.uuid4().hex[:6]}", f"forced-timeout-ahead-{uuid.uuid4().hex[:6]}"]
    sampling = wpb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    metrics = decode.ready["metrics"]
    ahead0, fallbacks0 = sample(metrics, "tandem_kv_handoff_ahead_total"), sample(metrics,
                                                                                  "tandem_kv_pull_fallbacks_total")
    channel, stub = worker_stub(prefill)
    with channel, concurrent.futures.ThreadPoolExecutor(2) as pool:
        probe = stub.Prefill(wpb.PrefillRequest(request_id=f"probe-{uuid.uuid4().hex[:6]}", prompt_token_ids=prompts[0],
                                                sampling=sampling), timeout=60).handle  # P's address and metadata
        stub.Unpin(wpb.UnpinRequest(request_id=probe.request_id), timeout=10)
        for i, (rid, prompt) in enumerate(zip(ids, prompts)):
            ahead = wpb.KVHandle(request_id=rid, worker_id=probe.worker_id, worker_endpoint=probe.worker_endpoint,
                                 transport_metadata=probe.transport_metadata, num_tokens=len(prompt))
            decoding = pool.submit(generate_direct, decode, rid, prompt, 8, ahead)
            time.sleep(0.5)  # the push is waiting on the prefill worker before its Prefill arrives
            assert not decoding.done()
            first = stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                                 timeout=60)
            assert list(first.outputs[0].token_ids) == want[i][:1]
            if i == 0:
                rest, stats = decoding.result(60)
                assert stats is not None and stats.pushed and not stats.recomputed and stats.num_pulled_blocks == 3
                assert want[0][:1] + rest == want[0]
                continue
            with pytest.raises(grpc.RpcError) as aborted:
                decoding.result(60)
            assert aborted.value.code() == grpc.StatusCode.ABORTED
            rest, stats = generate_direct(decode, rid, prompt, 8, first.handle)
            assert stats is not None and stats.recomputed and stats.num_pulled_blocks == 0
            assert want[1][:1] + rest == want[1]
    assert sample(metrics, "tandem_kv_handoff_ahead_total") - ahead0 == 1
    assert sample(metrics, "tandem_kv_pull_fallbacks_total") - fallbacks0 == 1
    wait_until(lambda: worker_load(prefill).num_pinned_blocks == 0, 30, "every hold released")
    wait_until(lambda: worker_load(decode).num_pulling == 0 and worker_load(decode).num_running == 0, 30,
               "the decode worker idle")
