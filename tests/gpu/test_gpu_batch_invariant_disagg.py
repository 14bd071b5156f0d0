"""Disaggregated equals aggregated on the GPU in bfloat16 for any prompt, under concurrent load,
in the batch-invariant mode (``batch_invariant``): real etcd, router and worker processes (a dummy
SmolLM2-135M, NIXL push), 16 greedy requests sent 8 at a time to each cluster, token ids and
logprobs compared bit for bit. No prompt filter: ``test_gpu_park_race.py`` without the mode must
keep only prompts whose greedy path has a wide top-1 margin, since the batch a request shares
(and the prefill worker's batches against the aggregated worker's chunked steps) changes bf16 bits.

The control, the same clusters without the mode, must differ somewhere in those logprobs: the
comparison can fail."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Iterator

import pytest
from test_gpu_disagg import COMMON, httpx, launch_clusters

from deploy.local_cluster import LocalCluster
from kv_transfer import nixl_available

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")]

SPECS = {f"{mode}-{inv}": dict(mode=mode, transport="nixl", kv_transfer_mode="push", batch_invariant=inv == "on")
         for inv in ("on", "off") for mode in ("aggregated", "disaggregated")}
RNG = random.Random(13)
PROMPTS = [[RNG.randrange(300, 40000) for _ in range(RNG.randrange(8, 500))] for _ in range(16)]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    yield from launch_clusters(tmp_path_factory.mktemp("gpu_bi_clusters"), COMMON, SPECS)


def _answer(cluster: LocalCluster, prompt: list[int]) -> tuple[list[str], list[float]]:
    body = {"model": cluster.router["model"], "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "logprobs": 1, "ignore_eos": True}
    resp = httpx.post(f"{cluster.http_url}/v1/completions", json=body, timeout=120)
    resp.raise_for_status()
    logprobs = resp.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == NEW_TOKENS
    return logprobs["tokens"], logprobs["token_logprobs"]


def _answers(cluster: LocalCluster) -> list[tuple[list[str], list[float]]]:
    """Every prompt's greedy answer, 8 requests in flight at a time (shared, changing batches)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: _answer(cluster, p), PROMPTS))


@pytest.mark.parametrize("inv", ["on", "off"])
def test_disaggregated_equals_aggregated_bit_for_bit_in_the_mode(clusters: dict[str, LocalCluster], inv: str) -> None:
    agg, disagg = _answers(clusters[f"aggregated-{inv}"]), _answers(clusters[f"disaggregated-{inv}"])
    if inv == "on":
        for prompt, a, d in zip(PROMPTS, agg, disagg):
            assert d == a, len(prompt)
    else:  # the control: without the mode the same load changes bits somewhere
        assert any(d[1] != a[1] for a, d in zip(agg, disagg)), "no logprob differs without the mode"
