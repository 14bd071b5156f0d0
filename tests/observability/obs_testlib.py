"""Helpers of the observability tests: the cluster's config, the system tools they drive, scraping,
and a load generator."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
import urllib.request
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The sim's ITL is ~6 ms per step here; an ITL target near it makes attainment neither 0 nor 1.
# Half a logical GPU per worker (two workers sharing one): a registration that rounds or drops the
# count shows on the GPUs per tier.
GPUS_PER_WORKER = 0.5
CONFIG = dict(port=0, grpc_port=0, lease_ttl_s=2, metrics_interval_s=0.25, mode="disaggregated", engine="sim",
              kv_cache_gib=0.05, transport="tcp", max_local_prefill_tokens=32, ttft_slo_ms=1000.0, itl_slo_ms=8.0,
              num_gpus_per_worker=GPUS_PER_WORKER)


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (apt-get install chromium prometheus)")
    return path


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def scrape(url: str) -> dict[str, float]:
    """A /metrics page's samples: 'name{labels}' (as the text format writes it) -> value."""
    out = {}
    for line in get(url).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Load:
    """Clients sending completions in a loop (a shared prefix per client, so prefix caches hit)
    until :meth:`stop`."""

    def __init__(self, url: str, model: str, concurrency: int = 6, prompt_len: int = 200, max_tokens: int = 48) -> None:
        self.url, self.model = url, model
        self.concurrency, self.prompt_len, self.max_tokens = concurrency, prompt_len, max_tokens
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, k: int) -> None:
        rng = random.Random(k)
        prefix = [rng.randrange(1000, 30000) for _ in range(self.prompt_len // 2)]
        while not self._stop.is_set():
            prompt = prefix + [rng.randrange(1000, 30000) for _ in range(self.prompt_len - len(prefix))]
            body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
            req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                self.done += 1
            except Exception as e:
                self.errors.append(repr(e))

    def start(self) -> Load:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True)
                         for k in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not self.errors, self.errors[:3]

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(check: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def write_decision(cluster: Any, decision: Any) -> None:
    """Put a ``PlannerDecision`` where the planner writes it (``keys.planner_decision_key``)."""
    import asyncio

    from runtime import keys
    from runtime.etcd import ControlPlane

    async def put() -> None:
        async with ControlPlane.from_config(cluster.cfg) as plane:
            await plane.put_message(keys.planner_decision_key(cluster.cfg.namespace), decision, lease=False)

    # In a thread of its own: playwright's sync API keeps an event loop running in this one.
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.extend(_raised(lambda: asyncio.run(put()))))
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]


def _raised(fn: Any) -> list[BaseException]:
    try:
        fn()
    except BaseException as e:  # handed to the caller's thread
        return [e]
    return []


def planner_decision(decided_at_unix_ms: int, code: str, num_decode: int = 2) -> Any:
    from runtime.pb import tandem_control_pb2 as cpb

    return cpb.PlannerDecision(
        planner_id="planner-test", decided_at_unix_ms=decided_at_unix_ms, mode="sla", num_prefill=1,
        num_decode=num_decode,
        actions=[cpb.PlannerAction(kind=cpb.PlannerAction.KIND_START, role="decode")],
        reasons=[cpb.PlannerReason(code=code, role="decode", values={"itl_s": 0.012, "kv_usage": 0.5}),
                 cpb.PlannerReason(code="forecast", role="", values={"rate": 7.5, "isl": 200.0})])
