"""Disaggregated serving on one GPU, through real etcd, router and worker processes (a dummy
SmolLM2-135M, bf16): 1P+1D equals aggregated token for token with NIXL push (what ``auto`` picks
on one GPU, measured in serving) and with CUDA IPC (pulled: its faster direction); concurrent pushes from one prefill
worker where one is forced to time out: only that request recomputes; SIGTERM while transfers
are in flight: both workers exit cleanly."""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

try:  # openai >= 3 ships httpx2 (the same API under a new name); the GPU machine has httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from deploy.local_cluster import Child, LocalCluster
from engine.gpu_share import GpuShare
from kv_transfer import nixl_available
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.pb import tandem_worker_pb2_grpc as wpb_grpc
from runtime.settings import ClusterConfig

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")]

MODEL = "dummy:smollm2-135m"
COMMON = dict(port=0, grpc_port=0, model=MODEL, device="cuda", dtype="bfloat16", kv_cache_gib=0.25,
              gpu_memory_fraction=0.08, max_local_prefill_tokens=16, lease_ttl_s=2, max_num_seqs=16, gpu_share=True)
SPECS = {
    "agg": dict(mode="aggregated", transport="nixl"),
    "nixl_push": dict(mode="disaggregated", transport="nixl", kv_transfer_mode="push",
                      worker_env=("TANDEM_FAULT_PUSH=^forced-timeout-=timeout",)),
    "cuda_ipc": dict(mode="disaggregated", transport="cuda_ipc"),  # the table: pull (faster in isolation)
    "shutdown": dict(mode="disaggregated", transport="nixl", kv_transfer_mode="push",
                     worker_env=("TANDEM_FAULT_PUSH=^in-flight-=delay:60",)),
}
RNG = random.Random(12)
PROMPTS = [[RNG.randrange(300, 40000) for _ in range(n)] for n in (8, 40, 100, 333)]


# ---- helpers (tests/serving's need the openai package, which the GPU machine lacks) ----------------
def sample(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def live(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.workers(role) if c.proc.poll() is None]


def router_metrics_url(cluster: LocalCluster) -> str:
    return f"{cluster.http_url}/metrics"


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(0.1)
    return value


def worker_stub(child: Child) -> tuple[grpc.Channel, wpb_grpc.WorkerServiceStub]:
    channel = grpc.insecure_channel(child.ready["endpoint"])
    return channel, wpb_grpc.WorkerServiceStub(channel)


def worker_load(child: Child) -> wpb.Load:
    channel, stub = worker_stub(child)
    with channel:
        return stub.Health(wpb.HealthRequest(), timeout=5).load


def greedy_tokens(cluster: LocalCluster, prompt: list[int], max_tokens: int) -> list[str]:
    """A greedy completion through the router: its tokens (the synthetic tokenizer's text per id)."""
    body = {"model": cluster.router["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 1, "ignore_eos": True}
    resp = httpx.post(f"{cluster.http_url}/v1/completions", json=body, timeout=120)
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == max_tokens
    return choice["logprobs"]["tokens"]


def generate_direct(child: Child, request_id: str, prompt_ids: list[int], max_tokens: int,
                    handle: wpb.KVHandle | None = None) -> tuple[list[int], wpb.PullStats | None]:
    """Greedy Generate straight on a decode worker: (token ids, the first message's PullStats)."""
    sampling = wpb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = wpb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling)
    if handle is not None:
        request.kv_handle.CopyFrom(handle)
    tokens: list[int] = []
    stats = None
    channel, stub = worker_stub(child)
    with channel:
        for msg in stub.Generate(request, timeout=120):
            if msg.HasField("pull"):
                stats = msg.pull
            for out in msg.outputs:
                tokens += out.token_ids
    return tokens, stats


def launch_clusters(root: Path, common: dict[str, Any], specs: dict[str, dict[str, Any]], workers: int = 1
                    ) -> Iterator[dict[str, LocalCluster]]:
    """A module's clusters by name, launched side by side (each loads while the others do):
    ``workers`` decode workers, and as many prefill workers unless aggregated (then one worker);
    stopped when the module ends."""
    out = {}
    try:
        for name, spec in specs.items():
            cfg = ClusterConfig(**common, **spec)
            agg = cfg.mode == "aggregated"
            out[name] = LocalCluster(cfg, num_prefill=0 if agg else workers, num_decode=1 if agg else workers,
                                     quiet=True, log_dir=root / name).launch()
        for cluster in out.values():
            cluster.wait_ready(480)
        yield out
    finally:
        for cluster in out.values():
            cluster.stop()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    yield from launch_clusters(tmp_path_factory.mktemp("gpu_clusters"), COMMON, SPECS)


@pytest.mark.parametrize("name, transport, mode", [("nixl_push", "nixl", "push"), ("cuda_ipc", "cuda_ipc", "pull")])
def test_disaggregated_equals_aggregated_on_the_gpu(clusters: dict[str, LocalCluster], name: str, transport: str,
                                                     mode: str) -> None:
    cluster, agg = clusters[name], clusters["agg"]
    (decode,), (prefill,) = live(cluster, "decode"), live(cluster, "prefill")
    mover = (prefill if mode == "push" else decode).ready["metrics"]
    moved0 = sample(mover, "tandem_kv_transfer_blocks_total", transport=transport)
    handoff0 = sample(decode.ready["metrics"], "tandem_kv_handoff_blocks_total", mode=mode)
    remote0 = sample(router_metrics_url(cluster), "tandem_router_route_decisions_total", path="remote")
    for prompt in PROMPTS:
        assert greedy_tokens(cluster, prompt, 32) == greedy_tokens(agg, prompt, 32), len(prompt)
    remote = sample(router_metrics_url(cluster), "tandem_router_route_decisions_total", path="remote") - remote0
    assert remote == sum(len(p) > 16 for p in PROMPTS)
    moved = sample(mover, "tandem_kv_transfer_blocks_total", transport=transport) - moved0
    assert moved == sum(-(-len(p) // 16) for p in PROMPTS if len(p) > 16)
    assert sample(decode.ready["metrics"], "tandem_kv_handoff_blocks_total", mode=mode) - handoff0 == moved
    assert sample(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total") == 0
    wait_until(lambda: worker_load(prefill).num_pinned_blocks == 0, 30, "every hold released")
    # The decode worker announced its steps on this GPU's shared flag (engine.gpu_share): the prefill
    # worker beside it yielded to its first decodes of handoffs, and the tokens above are unchanged.
    assert GpuShare.for_device("cuda", "prefill").decode_alive()


def _prefill(prefill, rid: str, prompt: list[int], max_tokens: int) -> wpb.PrefillResponse:
    sampling = wpb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    channel, stub = worker_stub(prefill)
    with channel:
        return stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling), timeout=60)


def test_one_forced_timeout_among_concurrent_pushes_recomputes_only_that_request(
        clusters: dict[str, LocalCluster]) -> None:
    cluster, agg = clusters["nixl_push"], clusters["agg"]
    (decode,), (prefill,) = live(cluster, "decode"), live(cluster, "prefill")
    prompts = [[RNG.randrange(300, 40000) for _ in range(200)] for _ in range(8)]
    want = [generate_direct(live(agg, "decode")[0], f"ref-{uuid.uuid4().hex}", p, 16)[0] for p in prompts]
    ids = [f"conc-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
    ids[3] = f"forced-timeout-{uuid.uuid4().hex[:6]}"
    firsts = [_prefill(prefill, rid, p, 16) for rid, p in zip(ids, prompts)]
    fallbacks0 = sample(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total")
    timeouts0 = sample(prefill.ready["metrics"], "tandem_kv_transfer_failures_total", transport="nixl",
                       reason="timeout")
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda a: generate_direct(decode, a[0], a[1], 16, handle=a[2].handle),
                                zip(ids, prompts, firsts)))
    for i, ((rest, stats), first) in enumerate(zip(results, firsts)):
        assert list(first.outputs[0].token_ids) + rest == want[i], i
        assert stats is not None and stats.recomputed == (i == 3), (i, stats)
        assert stats.pushed, i
    assert sample(decode.ready["metrics"], "tandem_kv_pull_fallbacks_total") - fallbacks0 == 1
    assert sample(prefill.ready["metrics"], "tandem_kv_transfer_failures_total", transport="nixl",
                  reason="timeout") - timeouts0 == 1
    wait_until(lambda: worker_load(prefill).num_pinned_blocks == 0, 30, "every hold released")


def test_sigterm_with_transfers_in_flight_exits_cleanly(clusters: dict[str, LocalCluster]) -> None:
    cluster = clusters["shutdown"]
    (decode,), (prefill,) = live(cluster, "decode"), live(cluster, "prefill")
    prompts = [[RNG.randrange(300, 40000) for _ in range(120)] for _ in range(4)]
    ids = [f"in-flight-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
    firsts = [_prefill(prefill, rid, p, 8) for rid, p in zip(ids, prompts)]
    pool = concurrent.futures.ThreadPoolExecutor(len(prompts))
    futures = [pool.submit(generate_direct, decode, rid, p, 8, f.handle) for rid, p, f in zip(ids, prompts, firsts)]
    # every request now waits for its push (delayed by the fault) on the decode worker
    wait_until(lambda: worker_load(decode).num_pulling == len(prompts), 60, "the transfers to be in flight")
    for child in (prefill, decode):
        child.proc.send_signal(signal.SIGTERM)
    codes = {c.name: c.proc.wait(timeout=60) for c in (prefill, decode)}
    assert codes == {prefill.name: 0, decode.name: 0}, codes
    for future in futures:  # the calls fail (the worker went away); none hangs
        with pytest.raises(Exception):  # noqa: B017 (grpc.RpcError or a closed stream)
            future.result(timeout=30)
    pool.shutdown()
    for child in (prefill, decode):
        log = (cluster._log_dir / f"{child.name}.log").read_text()
        assert "Fatal" not in log and "Segmentation fault" not in log, log[-3000:]
