"""Helpers of the hardening tests: raw HTTP calls, worker stubs, waits on conditions, and what
"nothing leaked" means (every worker idle with every block free, none pinned).

No import of router.kserve or runtime.pb.kserve_inference_pb2 here: the KServe tests use
tritonclient's own copy of those messages (both in one process would clash)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from deploy.local_cluster import Child, LocalCluster
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.pb import tandem_worker_pb2_grpc as wpb_grpc

T = TypeVar("T")

# The cluster's settings (conftest.py), here so that tests can import them: ``from conftest import``
# finds whichever test directory's conftest was imported first when several directories run together.
MODEL = "dummy:smollm2-135m"  # a synthetic tokenizer: no files, no weights (sim engine)
LEASE_TTL_S = 2
SILENCE_S = 1.0
PROBE_TIMEOUT_S = 1.0
CONFIG = dict(port=0, grpc_port=0, mode="disaggregated", engine="sim", model=MODEL, kv_cache_gib=0.25,
              transport="tcp", lease_ttl_s=LEASE_TTL_S, metrics_interval_s=0.25, max_local_prefill_tokens=16,
              worker_silence_s=SILENCE_S, worker_probe_timeout_s=PROBE_TIMEOUT_S, kv_pull_timeout_s=3.0,
              kv_transfer_mode="push", worker_env=("TANDEM_FAULT_PUSH=^hang-=delay:6",))


def post(url: str, body: Any, headers: dict[str, str] | None = None, timeout_s: float = 60.0,
         context: Any = None) -> tuple[int, dict[str, str], bytes]:
    """POST JSON (or raw bytes); (status, headers, body) whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0,
        context: Any = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def completion(cluster: LocalCluster, prompt: str | list[int] = "The capital of France is", max_tokens: int = 8,
               url: str | None = None, **extra: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = post(f"{url or cluster.http_url}/v1/completions",
                          {"model": cluster.router["model"], "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, **extra})
    return status, json.loads(raw)


def assert_error_body(raw: bytes, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-style error body, naming the field at fault when one is."""
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, (status, body)
    if code is not None:
        assert body["error"]["code"] == code, (status, body)
    return body


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)


def live(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.workers(role) if c.proc.poll() is None]


@contextmanager
def stub(child: Child):
    assert child.ready is not None, child.name
    with grpc.insecure_channel(child.ready["endpoint"]) as channel:
        yield wpb_grpc.WorkerServiceStub(channel)


def load(child: Child, timeout_s: float = 5.0) -> wpb.Load:
    with stub(child) as s:
        return s.Health(wpb.HealthRequest(), timeout=timeout_s).load


def idle(load: wpb.Load) -> bool:
    """Nothing running or queued, every block free (cached ones count as free), none pinned."""
    return (load.num_running == 0 and load.num_waiting == 0 and load.num_pulling == 0 and load.num_pinned_blocks == 0
            and load.num_free_blocks == load.num_total_blocks)


def wait_nothing_leaked(cluster: LocalCluster, timeout_s: float = 15.0) -> None:
    """Every live worker idle, every block back: what a fault must leave behind."""
    workers = live(cluster, "prefill") + live(cluster, "decode")
    last: dict[str, str] = {}

    def check() -> bool:
        for c in workers:
            lo = load(c)
            last[c.name] = (f"running={lo.num_running} waiting={lo.num_waiting} pulling={lo.num_pulling} "
                            f"free={lo.num_free_blocks}/{lo.num_total_blocks} pinned={lo.num_pinned_blocks}")
        return all(idle(load(c)) for c in workers)

    wait_until(check, timeout_s, f"every worker idle with its blocks free: {last}")


def router_lists(cluster: LocalCluster, url: str | None = None) -> dict[str, int]:
    _, _, raw = get(f"{url or cluster.http_url}/health")
    body = json.loads(raw)
    return {"prefill": body.get("prefill_workers", -1), "decode": body.get("decode_workers", -1)}


@contextmanager
def stopped(child: Child):
    """SIGSTOP a process (it hangs, it does not die); SIGCONT it on the way out."""
    os.kill(child.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)


def start_router(cluster: LocalCluster, timeout_s: float = 60.0, **overrides: Any) -> Child:
    """Another router replica on the cluster's etcd with ``overrides`` (API keys, TLS, tight
    admission), its own ports; returns once it listens (``child.ready``: ``http``, ``grpc``),
    not once it serves: a test that needs keys or client certificates waits with them."""
    cfg = dataclasses.replace(cluster.cfg, port=0, grpc_port=0, metrics_port=0, **overrides)
    name = f"router-{sum(1 for c in cluster.children if c.name.startswith('router'))}"
    path = cluster._tmp / f"{name}.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    child = cluster._spawn(name, [sys.executable, "-m", "router", "--config", str(path)])
    cluster._wait([child], timeout_s)
    return child


def stop_router(child: Child) -> None:
    """SIGTERM, once more after 5 s: asyncio drops a signal that finds its self-pipe full (the
    router's log then says "Exception ignored when trying to write to the signal wakeup fd"), seen
    right after a load whose idle heap was just traced (test_500_streaming_clients)."""
    child.proc.terminate()
    try:
        child.proc.wait(5)
    except subprocess.TimeoutExpired:
        child.proc.terminate()
        child.proc.wait(15)


def wait_serves(url: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None, context: Any = None) -> None:
    """Until ``url``'s /health is 200 (the model is ready)."""
    def ready() -> bool:
        try:
            return get(f"{url}/health", headers=headers, context=context)[0] == 200
        except OSError:
            return False

    wait_until(ready, timeout_s, f"{url} to serve")
