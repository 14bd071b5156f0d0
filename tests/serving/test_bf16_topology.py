"""bfloat16 answers do not depend on the topology: the same greedy request gives the same tokens
and the same logprobs, bit for bit, from an aggregated worker on two threads and from a
disaggregated pair on one thread each (the prompt prefilled on the prefill worker, its KV moved
over TCP). On torch's own CPU path (oneDNN) they differ: its bf16 results change with the thread
count, which `tandem serve` chose per mode from the number of workers (issue 16). The CPU kernels (engine/csrc)
make every result a fixed function of a row's inputs."""

from __future__ import annotations

import pytest
from serving_testlib import LONG_PROMPTS, SHORT_PROMPTS, fresh, greedy_completion, router_metrics_url, sample

from deploy.local_cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STORY = ("The history of the city begins with a small settlement on the river, where traders from the north and "
         "the south met to exchange salt, grain and cloth. Over the centuries the market grew into a town. ")


def _answer(cluster: LocalCluster, prompt: str) -> tuple[str, list[str], list[float], int]:
    c = greedy_completion(cluster, prompt, max_tokens=16)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    return c.choices[0].text, lp.tokens, lp.token_logprobs, c.usage.prompt_tokens


def test_bf16_aggregated_equals_disaggregated(agg_bf16_cluster: LocalCluster, disagg_bf16_cluster: LocalCluster
                                              ) -> None:
    router = router_metrics_url(disagg_bf16_cluster)
    remote0 = sample(router, "tandem_router_route_decisions_total", path="remote")
    long = [fresh(STORY * 14), fresh(LONG_PROMPTS[1])]  # ~600 tokens (the case), ~50
    for prompt in long + SHORT_PROMPTS:
        got = _answer(disagg_bf16_cluster, prompt)
        want = _answer(agg_bf16_cluster, prompt)
        assert got == want, prompt[:40]  # logprobs compared exactly, not up to a tolerance
        if prompt == long[0]:
            assert want[3] > 550
    # the long prompts were prefilled on the prefill worker (one thread) and decoded on the other
    assert sample(router, "tandem_router_route_decisions_total", path="remote") - remote0 == len(long)
