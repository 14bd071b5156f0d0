"""Parking under load on one GPU: a disaggregated cluster (2 prefill + 2 decode workers, NIXL push or
CUDA IPC pull) serves greedy requests from several clients without pause while the launcher drains
and parks one decode worker, then one prefill worker, and takes each back from the warm pool, twice.
KV handoffs race the parks: a prefill worker may be pushing into (or a decode worker pulling from)
a cache that is being released. Every request must answer with the aggregated cluster's tokens
(a refused or failed transfer recomputes, it does not fail or corrupt), and no worker logs a
traceback. Real etcd, router and worker processes (a dummy SmolLM2-135M, bf16)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
from test_gpu_disagg import greedy_tokens, httpx, launch_clusters, live, sample

from deploy.local_cluster import LocalCluster
from deploy.local_launcher import LocalLauncher
from kv_transfer import nixl_available

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")]

COMMON = dict(port=0, grpc_port=0, model="dummy:smollm2-135m", device="cuda", dtype="bfloat16", kv_cache_gib=0.25,
              gpu_memory_fraction=0.06, max_local_prefill_tokens=16, lease_ttl_s=2, max_num_seqs=16,
              drain_timeout_s=30, warm_pool=1)
SPECS = {  # 2 prefill + 2 decode workers each (aggregated: 1)
    "agg": dict(mode="aggregated", transport="nixl"),
    "nixl": dict(mode="disaggregated", transport="nixl", kv_transfer_mode="push"),
    "cuda_ipc": dict(mode="disaggregated", transport="cuda_ipc", kv_transfer_mode="pull"),
}
RNG = random.Random(17)
LENGTHS = (40, 100, 333, 700)
NUM_PROMPTS = 8
MAX_TOKENS = 16
CLIENTS = 4
# bf16 greedy tokens depend on the batch a sequence shares (GEMM tiling), so under load a near-tie
# may go either way, parks or not (measured: 1 prompt in 8, 1 answer in 10, without parks). The test
# takes prompts whose greedy path has no near-tie (8 of 53 tried), so a changed token means corrupted KV.
MIN_MARGIN = 0.25  # logprob, top-1 over top-2, at every position of the aggregated answer


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    yield from launch_clusters(tmp_path_factory.mktemp("gpu_park_race"), COMMON, SPECS, workers=2)


def greedy_margin(cluster: LocalCluster, prompt: list[int]) -> tuple[list[str], float]:
    """The greedy answer's tokens and its smallest top-1 over top-2 logprob margin."""
    body = {"model": cluster.router["model"], "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": 2, "ignore_eos": True}
    resp = httpx.post(f"{cluster.http_url}/v1/completions", json=body, timeout=120)
    resp.raise_for_status()
    lp = resp.json()["choices"][0]["logprobs"]
    margins = [a - b for a, b in (sorted(top.values(), reverse=True)[:2] for top in lp["top_logprobs"])]
    return lp["tokens"], min(margins)


@pytest.fixture(scope="module")
def prompts(clusters: dict[str, LocalCluster]) -> list[tuple[list[int], list[str]]]:
    """(prompt, aggregated greedy tokens) of NUM_PROMPTS prompts with no near-tie on their path."""
    out, tried = [], 0
    while len(out) < NUM_PROMPTS and tried < 20 * NUM_PROMPTS:
        prompt = [RNG.randrange(300, 40000) for _ in range(LENGTHS[len(out) % len(LENGTHS)])]
        tokens, margin = greedy_margin(clusters["agg"], prompt)
        tried += 1
        if margin >= MIN_MARGIN:
            out.append((prompt, tokens))
    assert len(out) == NUM_PROMPTS, f"{tried} prompts tried, {len(out)} without a near-tie"
    print(f"\n{NUM_PROMPTS} prompts without a near-tie of {tried} tried")
    return out


@pytest.mark.parametrize("name", ["nixl", "cuda_ipc"])
def test_parks_racing_handoffs_lose_and_corrupt_nothing(clusters: dict[str, LocalCluster],
                                                        prompts: list[tuple[list[int], list[str]]], name: str) -> None:
    cluster = clusters[name]
    reference = [tokens for _, tokens in prompts]
    launcher = LocalLauncher.around(cluster, warm_pool=1)
    answers: list[tuple[int, list[str], float, float]] = []  # prompt, tokens, sent, answered (monotonic)
    errors: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(prompts))
            try:
                t = time.monotonic()
                answers.append((i, greedy_tokens(cluster, prompts[i][0], MAX_TOKENS), t, time.monotonic()))
            except Exception as e:  # every failure is the test's finding
                errors.append(f"prompt {i}: {type(e).__name__}: {e}")

    moved0 = sum(sample(w.ready["metrics"], "tandem_kv_transfer_blocks_total", transport=name)
                 for role in ("prefill", "decode") for w in live(cluster, role))
    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    parks, windows = [], []
    try:
        time.sleep(8.0)  # the load alone first: the control
        control = len(answers)
        for _ in range(2):
            for role in ("decode", "prefill"):
                victim = live(cluster, role)[-1].name
                n0 = len(answers)
                t0 = time.monotonic()
                windows.append(t0)
                launcher.drain_services([victim])
                assert [s.name for s in launcher.parked()] == [victim], launcher.parked()
                launcher.start_services([role])  # the warm pool's worker comes back
                parks.append((role, time.monotonic() - t0, len(answers) - n0))
                windows[-1] = (t0, time.monotonic())
                time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert errors == [], errors[:5]
    wrong = [(i, got, t0, t1) for i, got, t0, t1 in answers if got != reference[i]]
    racing = [w for w in wrong if any(w[2] < b and w[3] > a for a, b in windows)]
    fallbacks = sum(sample(w.ready["metrics"], "tandem_kv_pull_fallbacks_total") for w in live(cluster, "decode"))
    control_wrong = sum(got != reference[i] for i, got, *_ in answers[:control])
    print(f"\n{name}: control {control_wrong} wrong of {control}; {len(wrong)} wrong of {len(answers)}, "
          f"{len(racing)} overlapping a park; "
          f"fallbacks {fallbacks}; wrong prompts {sorted({w[0] for w in wrong})}")
    assert wrong == [], f"{len(wrong)} of {len(answers)} answers differ from aggregated: {wrong[:2]}"
    moved = sum(sample(w.ready["metrics"], "tandem_kv_transfer_blocks_total", transport=name)
                for role in ("prefill", "decode") for w in live(cluster, role)) - moved0
    assert moved > 0, "no handoff moved blocks: the load did not race the parks"
    print(f"\n{name}: {len(answers)} answers, all equal to aggregated, across {len(parks)} parks "
          f"(role, seconds from drain to back, answers meanwhile): {[(r, round(s, 1), n) for r, s, n in parks]}; "
          f"{moved:.0f} blocks handed off")
    for role in ("prefill", "decode"):
        for w in live(cluster, role):
            log = (cluster._log_dir / f"{w.name}.log").read_text()
            assert "Traceback" not in log, log[-3000:]
