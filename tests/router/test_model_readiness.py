"""The router learns its model from the workers' registrations and lists it only when it can
serve it: before any worker, ``/v1/models`` is empty and ``/health`` (and gRPC health) say not
ready; in disaggregated mode a decode worker alone is not enough; and the very first completion
sent the moment the model is listed succeeds (no 503 window). Real etcd, a real router process
and real worker processes (the sim engine: the real block manager, scheduler and gRPC service,
the default model's tokenizer and shape, no forward pass).

The same 1P+1D cluster then checks the router's first-token hold (``first_token_hold``), forced
on: a handed-off prompt's first token leaves the router only once the decode worker's first has
come (the router's trace and its counter), where a router with the hold off sends it first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(300)
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0


class Proc:
    """A tandem process whose ``TANDEM_READY`` line is read in the background."""

    def __init__(self, argv: list[str], **env_extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", **env_extra)
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.ready: dict[str, Any] | None = None
        self.tail: list[str] = []
        self._event = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("TANDEM_READY "):
                self.ready = json.loads(line.split(" ", 1)[1])
                self._event.set()
            self.tail = [*self.tail[-30:], line.rstrip()]
        self._event.set()

    def wait_ready(self) -> dict[str, Any]:
        self._event.wait(START_TIMEOUT_S)
        assert self.ready is not None, "\n".join(self.tail)
        return self.ready

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, list[Proc]]]:
    procs: list[Proc] = []
    with EtcdServer() as etcd:
        config = tmp_path / "cluster.json"
        config.write_text(json.dumps({
            "etcd_endpoints": [etcd.endpoint], "namespace": f"ready{os.getpid()}", "mode": "disaggregated",
            "engine": "sim", "kv_cache_gib": 0.25, "transport": "tcp", "lease_ttl_s": 2, "port": free_port(),
            "grpc_port": free_port(), "max_local_prefill_tokens": 16, "first_token_hold": "on"}))
        try:
            yield config, procs
        finally:
            for p in reversed(procs):
                p.stop()


def models(http: str) -> list[str]:
    resp = requests.get(f"{http}/v1/models", timeout=10)
    assert resp.status_code == 200
    return [m["id"] for m in resp.json()["data"]]


def grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def completion(http: str, model: str) -> requests.Response:
    body = {"model": model, "prompt": "The capital of France is a city that", "max_tokens": 4, "temperature": 0}
    return requests.post(f"{http}/v1/completions", json=body, timeout=60)


def wait_for(check: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_model_listed_only_when_servable_and_no_503_after(cluster: tuple[Path, list[Proc]]) -> None:
    config, procs = cluster
    router = Proc(["-m", "router", "--config", str(config)], TANDEM_TRACE_DIR=str(config.parent / "trace"))
    procs.append(router)
    ready = router.wait_ready()
    http, grpc_target = ready["http"], ready["grpc"]
    assert "model" not in ready  # the router has no model of its own

    # No worker yet: nothing listed, not ready, and a completion says why (not a worker error).
    assert models(http) == []
    health = requests.get(f"{http}/health", timeout=10)
    assert health.status_code == 503 and health.json()["model"] is None
    assert not grpc_serving(grpc_target)
    early = completion(http, "SmolLM2-135M-Instruct")
    assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready", early.text

    # A decode worker: the model is known, but disaggregated mode needs the prefill tier too.
    decode = Proc(["-m", "decode_worker", "--config", str(config), "--worker-id", "d0"])
    procs.append(decode)
    decode.wait_ready()
    wait_for(lambda: requests.get(f"{http}/health", timeout=10).json()["model"], "the router to adopt the model")
    health = requests.get(f"{http}/health", timeout=10)
    body = health.json()
    assert health.status_code == 503 and body["decode_workers"] == 1 and "prefill" in body["status"], body
    assert models(http) == [] and not grpc_serving(grpc_target)

    # The prefill worker registers: the first completion sent as soon as the model is listed succeeds.
    prefill = Proc(["-m", "prefill_worker", "--config", str(config), "--worker-id", "p0"])
    procs.append(prefill)
    (name,) = wait_for(lambda: models(http), "the model to be listed")
    first = completion(http, name)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] == 4
    assert requests.get(f"{http}/health", timeout=10).status_code == 200 and grpc_serving(grpc_target)
    listed = requests.get(f"{http}/v1/models", timeout=10).json()["data"][0]
    assert listed["id"] == name == "SmolLM2-135M-Instruct" and listed["max_model_len"] == 8192

    check_first_token_hold(config, procs, router, http, name)


def handoff_events(trace_dir: Path, router: Proc) -> list[str]:
    """The router's trace events of its one handed-off request, in order."""
    events: dict[str, list[str]] = {}
    for line in (trace_dir / f"{router.proc.pid}.jsonl").read_text().splitlines():
        e = json.loads(line)
        events.setdefault(e["rid"], []).append(e["ev"])
    (handed_off,) = [evs for evs in events.values() if "r.prefill_ans" in evs]
    return handed_off


def streamed_long_prompt(http: str, model: str, words: str) -> None:
    """A prompt of 120 words, 4 tokens streamed back."""
    body = {"model": model, "prompt": words * 40, "max_tokens": 4, "temperature": 0, "stream": True}
    with requests.post(f"{http}/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        frames = [line for line in resp.iter_lines() if line]
    assert frames[-1] == b"data: [DONE]" and len(frames) == 5, frames  # 4 tokens


def held(http: str, reason: str) -> float:
    text = requests.get(f"{http}/metrics", timeout=10).text
    line = f'tandem_router_first_tokens_held_total{{reason="{reason}"}} '
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)


def check_first_token_hold(config: Path, procs: list[Proc], router: Proc, http: str, model: str) -> None:
    """A prompt over max_local_prefill_tokens, handed off: the router holding its first token
    (``first_token_hold`` on) sends it after the decode worker's first message came (``r.msg1``
    before ``r.first_yield``), counted; a second router with the hold off sends it before."""
    streamed_long_prompt(http, model, "lorem ipsum dolor ")
    events = handoff_events(config.parent / "trace", router)
    assert "r.prefill_ans" in events and "r.hold" in events, events
    assert events.index("r.msg1") < events.index("r.first_yield"), events
    assert (held(http, "with_decode"), held(http, "deadline")) == (1.0, 0.0)
    plain = Proc(["-m", "router", "--config", str(config), "--first-token-hold", "off", "--port", str(free_port()),
                  "--grpc-port", str(free_port())], TANDEM_TRACE_DIR=str(config.parent / "trace"))
    procs.append(plain)
    plain_http = plain.wait_ready()["http"]
    wait_for(lambda: models(plain_http), "the second router to list the model")
    streamed_long_prompt(plain_http, model, "sit amet elit ")  # (not the one D has cached: handed off too)
    events = handoff_events(config.parent / "trace", plain)
    assert "r.hold" not in events and events.index("r.first_yield") < events.index("r.msg1"), events
    assert held(plain_http, "with_decode") == 0.0
