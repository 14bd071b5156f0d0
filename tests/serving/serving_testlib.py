"""Helpers for the serving tests: clients, Prometheus samples, worker Health over gRPC, bounded waits.

Never import router.kserve or runtime.pb.kserve_inference_pb2 here: the KServe tests import
tritonclient.grpc into this process, and the two register the same protobuf symbols.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import openai
from prometheus_client.parser import text_string_to_metric_families

from deploy.local_cluster import Child, LocalCluster
from kv_transfer import nixl_available
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.pb import tandem_worker_pb2_grpc as wpb_grpc

T = TypeVar("T")

LEASE_TTL_S = 2  # the clusters' etcd lease: a dead worker's registration is gone within this
MAX_LOCAL_PREFILL_TOKENS = 16  # longer prompts are prefilled on the prefill worker
BLOCK_SIZE = 16
NIXL = nixl_available()

# Prompts for the equality tests; the cluster's max_local_prefill_tokens is 16 (see conftest).
SHORT_PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
LONG_PROMPTS = [
    "Once upon a time, in a land far away, there lived a king who had three daughters. The youngest daughter was",
    "List the planets of the solar system in order from the sun, with one fact about each planet, and explain "
    "in a few sentences why Pluto is no longer counted among them. Mercury is the closest planet to the sun and",
]


def fresh(prompt: str) -> str:
    """``prompt`` behind a unique tag: no worker has any of its blocks cached, so a prompt longer
    than max_local_prefill_tokens is prefilled on the prefill worker (a decode worker that holds
    most of a prompt prefills the rest itself: DESIGN.md, "Request life", step 2)."""
    return f"[{uuid.uuid4().hex[:8]}] {prompt}"


def client(cluster: LocalCluster, timeout_s: float = 120.0) -> openai.OpenAI:
    """An OpenAI client for the cluster's router; no retries, so every failure is seen."""
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)


def model(cluster: LocalCluster) -> str:
    return cluster.router["model"]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(url: str, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return scrape(url).get((name, frozenset(labels.items())), 0.0)


def router_metrics_url(cluster: LocalCluster) -> str:
    return f"{cluster.http_url}/metrics"


def live(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.workers(role) if c.proc.poll() is None]


def worker_stub(child: Child) -> tuple[grpc.Channel, wpb_grpc.WorkerServiceStub]:
    assert child.ready is not None, child.name
    channel = grpc.insecure_channel(child.ready["endpoint"])
    return channel, wpb_grpc.WorkerServiceStub(channel)


def worker_load(child: Child) -> wpb.Load:
    channel, stub = worker_stub(child)
    with channel:
        return stub.Health(wpb.HealthRequest(), timeout=5).load


def is_idle(load: wpb.Load) -> bool:
    """No request running or queued, every block free (cached blocks count as free), none pinned."""
    return (load.num_running == 0 and load.num_waiting == 0 and load.num_pinned_blocks == 0
            and load.num_free_blocks == load.num_total_blocks)


def describe(load: wpb.Load) -> str:
    return (f"running={load.num_running} waiting={load.num_waiting} free={load.num_free_blocks}/"
            f"{load.num_total_blocks} pinned={load.num_pinned_blocks}")


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)


def wait_workers_idle(cluster: LocalCluster, timeout_s: float) -> float:
    """Wait until every live worker is idle; return how long it took."""
    t0 = time.monotonic()
    workers = live(cluster, "prefill") + live(cluster, "decode")
    last: dict[str, str] = {}

    def idle() -> bool:
        loads = {c.name: worker_load(c) for c in workers}
        last.update({name: describe(load) for name, load in loads.items()})
        return all(is_idle(load) for load in loads.values())

    deadline = t0 + timeout_s
    while not idle():
        if time.monotonic() > deadline:
            raise AssertionError(f"workers still busy {timeout_s:.1f} s later: {last}")
        time.sleep(0.1)
    return time.monotonic() - t0


def greedy_completion(cluster: LocalCluster, prompt: str | list[int], max_tokens: int = 24, **extra: Any
                      ) -> openai.types.Completion:
    """A greedy completion of exactly ``max_tokens`` tokens, with the sampled tokens' logprobs."""
    return client(cluster).completions.create(model=model(cluster), prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, logprobs=1, extra_body={"ignore_eos": True, **extra})


def completion_key(c: openai.types.Completion) -> tuple[str, list[str]]:
    choice = c.choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    return choice.text, choice.logprobs.tokens


def assert_same_completion(got: openai.types.Completion, want: openai.types.Completion, label: str) -> None:
    """Equal text and tokens; logprobs equal up to float noise."""
    assert completion_key(got) == completion_key(want), label
    got_lp, want_lp = got.choices[0].logprobs.token_logprobs, want.choices[0].logprobs.token_logprobs
    assert len(got_lp) == len(want_lp), label
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-3, (label, got_lp, want_lp)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens, label
    assert got.usage.completion_tokens == want.usage.completion_tokens, label


def generate_direct(child: Child, request_id: str, prompt_ids: list[int], max_tokens: int,
                    handle: wpb.KVHandle | None = None, timeout_s: float = 60.0
                    ) -> tuple[list[int], wpb.PullStats | None]:
    """Greedy Generate straight on a decode worker: (token ids, the first message's PullStats)."""
    sampling = wpb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = wpb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling)
    if handle is not None:
        request.kv_handle.CopyFrom(handle)
    tokens: list[int] = []
    pull = None
    channel, stub = worker_stub(child)
    with channel:
        for msg in stub.Generate(request, timeout=timeout_s):
            if msg.HasField("pull"):
                pull = msg.pull
            for out in msg.outputs:
                tokens += out.token_ids
    return tokens, pull


class Handoffs:
    """Whether the requests sent meanwhile took the remote path: :meth:`check` asserts the router
    prefilled each of them on the prefill worker (its remote-route counter moved by their number,
    its local one not at all) and the decode worker pulled every block of their prompts over
    ``transport`` (fresh prompts: none cached there) without falling back to a local prefill."""

    ROUTES = "tandem_router_route_decisions_total"

    def __init__(self, cluster: LocalCluster, transport: str) -> None:
        (decode,) = live(cluster, "decode")
        self.router, self.worker, self.transport = router_metrics_url(cluster), decode.ready["metrics"], transport
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        return (sample(self.router, self.ROUTES, path="remote"), sample(self.router, self.ROUTES, path="local"),
                sample(self.worker, "tandem_kv_transfer_blocks_total", transport=self.transport),
                sample(self.worker, "tandem_kv_pull_fallbacks_total"))

    def check(self, prompt_lengths: list[int]) -> None:
        """``prompt_lengths``: the prompt tokens of each request sent since this was made."""
        remote, local, pulled, fallbacks = (b - a for a, b in zip(self.start, self._read()))
        want_blocks = sum(-(-n // BLOCK_SIZE) for n in prompt_lengths)
        assert all(n > MAX_LOCAL_PREFILL_TOKENS for n in prompt_lengths), prompt_lengths
        assert (remote, local, pulled, fallbacks) == (len(prompt_lengths), 0, want_blocks, 0), \
            "(remote, local, pulled blocks, fallbacks): not every request was prefilled remotely and pulled"
