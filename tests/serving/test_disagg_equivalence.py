"""DESIGN.md's invariant: with greedy sampling, disaggregated output equals aggregated output token
for token, for prompts prefilled on the decode worker (short) and on the prefill worker (long),
whichever transport moves the KV (NIXL DRAM between two processes, or TCP) and whoever moves it
(the decode worker pulls, or the prefill worker pushes)."""

from __future__ import annotations

import pytest
from serving_testlib import (
    BLOCK_SIZE,
    LONG_PROMPTS,
    MAX_LOCAL_PREFILL_TOKENS,
    NIXL,
    SHORT_PROMPTS,
    assert_same_completion,
    client,
    fresh,
    greedy_completion,
    live,
    model,
    router_metrics_url,
    sample,
    wait_until,
)

from deploy.local_cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


def _metrics(cluster: LocalCluster, role: str) -> str:
    (worker,) = live(cluster, role)
    return worker.ready["metrics"]


def _check_equal_to_aggregated(cluster: LocalCluster, agg: LocalCluster, transport: str, mode: str) -> None:
    router, decode = router_metrics_url(cluster), _metrics(cluster, "decode")
    # kv_transfer counts a transfer on the side that starts it: the prefill worker's for a push
    mover = _metrics(cluster, "prefill") if mode == "push" else decode
    short, long = SHORT_PROMPTS, [fresh(p) for p in LONG_PROMPTS]
    want = {p: greedy_completion(agg, p) for p in short + long}
    remote0 = sample(router, "tandem_router_route_decisions_total", path="remote")
    local0 = sample(router, "tandem_router_route_decisions_total", path="local")
    blocks0 = sample(mover, "tandem_kv_transfer_blocks_total", transport=transport)
    handoff0 = sample(decode, "tandem_kv_handoff_blocks_total", mode=mode)
    fallbacks0 = sample(decode, "tandem_kv_pull_fallbacks_total")
    ahead0 = sample(decode, "tandem_kv_handoff_ahead_total")

    for prompt in short + long:
        got = greedy_completion(cluster, prompt)
        assert_same_completion(got, want[prompt], prompt)
        assert (got.usage.prompt_tokens > MAX_LOCAL_PREFILL_TOKENS) == (prompt in long)

    # the long prompts really were prefilled remotely, and their KV crossed over `transport`, `mode`d
    assert sample(router, "tandem_router_route_decisions_total", path="remote") - remote0 == len(long)
    assert sample(router, "tandem_router_route_decisions_total", path="local") - local0 == len(short)
    moved = sample(mover, "tandem_kv_transfer_blocks_total", transport=transport) - blocks0
    assert moved > 0
    assert sample(decode, "tandem_kv_handoff_blocks_total", mode=mode) - handoff0 == moved
    assert sample(decode, "tandem_kv_pull_fallbacks_total") == fallbacks0
    # pushed: the router sent each long prompt's handle ahead, and its blocks landed through it
    assert sample(decode, "tandem_kv_handoff_ahead_total") - ahead0 == (len(long) if mode == "push" else 0)
    prefill = _metrics(cluster, "prefill")
    wait_until(lambda: sample(prefill, "tandem_worker_num_pinned_blocks") == 0, 30, "every hold released")

    chat = [{"role": "system", "content": fresh("You are a poet.")}, *CHAT]
    got, ref = (client(c).chat.completions.create(model=model(c), messages=chat, max_completion_tokens=24,
                                                  temperature=0, logprobs=True) for c in (cluster, agg))
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert [t.token for t in got.choices[0].logprobs.content] == [t.token for t in ref.choices[0].logprobs.content]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (ref.usage.prompt_tokens,
                                                                      ref.usage.completion_tokens)


@pytest.mark.skipif(not NIXL, reason="the nixl package is not installed: the disaggregated cluster runs on TCP")
def test_nixl_disaggregated_equals_aggregated(disagg_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    _check_equal_to_aggregated(disagg_cluster, agg_cluster, "nixl", "pull")


def test_tcp_disaggregated_equals_aggregated(tcp_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    _check_equal_to_aggregated(tcp_cluster, agg_cluster, "tcp", "push")


def test_cached_prefix_is_reused_not_pulled(disagg_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    """A prompt extending one the decode worker has seen, by more than it would prefill itself:
    prefilled remotely, the decode worker reuses its cached blocks and pulls only the rest; the
    output still equals aggregated."""
    transport = "nixl" if NIXL else "tcp"
    worker = _metrics(disagg_cluster, "decode")
    base = fresh(LONG_PROMPTS[1])
    extended = base + " Venus is the hottest planet, hotter than Mercury, because its thick atmosphere of carbon " \
                      "dioxide traps the heat of the sun, and"
    first = greedy_completion(disagg_cluster, base, max_tokens=4)
    blocks0 = sample(worker, "tandem_kv_transfer_blocks_total", transport=transport)
    got = greedy_completion(disagg_cluster, extended)
    pulled = sample(worker, "tandem_kv_transfer_blocks_total", transport=transport) - blocks0
    num_blocks = -(-got.usage.prompt_tokens // BLOCK_SIZE)
    num_shared_blocks = first.usage.prompt_tokens // BLOCK_SIZE
    assert got.usage.prompt_tokens - num_shared_blocks * BLOCK_SIZE > MAX_LOCAL_PREFILL_TOKENS
    assert 0 < pulled <= num_blocks - num_shared_blocks, (pulled, num_blocks, num_shared_blocks)
    # the prefill worker reused its own cached prefix too
    assert got.usage.prompt_tokens_details.cached_tokens >= num_shared_blocks * BLOCK_SIZE
    assert_same_completion(got, greedy_completion(agg_cluster, extended), extended)
