"""What the launcher tests share: a worker's metric, streaming requests through the router, and
scaling the decode tier down while they run on every decode worker."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import openai


def metric(metrics_url: str, name: str) -> float:
    """One sample of a worker's Prometheus page."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(name + " "))


def stream_all(launcher: Any, num: int, max_tokens: int) -> tuple[list[threading.Thread], list[object]]:
    """``num`` streaming completions (``ignore_eos``, ``max_tokens`` each) through the launcher's
    router, on threads: the threads, started, and the list each appends its finish reason (or its
    exception) to."""
    client = openai.OpenAI(base_url=f"{launcher.cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = launcher.cluster.router["model"]
    outcomes: list[object] = []

    def ask(i: int) -> None:
        try:
            stream = client.completions.create(model=model, prompt=f"{i} " * 8, max_tokens=max_tokens, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True})
            outcomes.append([c.choices[0].finish_reason for c in stream if c.choices][-1])
        except Exception as e:
            outcomes.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(num)]
    for t in threads:
        t.start()
    return threads, outcomes


def drain_one_decode_worker_under_load(launcher: Any, max_tokens: int) -> tuple[str, Any]:
    """Four long requests, running on both decode workers, then the tiers scaled to 1P+1D: every
    request finished whole (none lost); the drained worker's name and its ``DrainResult``."""
    threads, outcomes = stream_all(launcher, 4, max_tokens)
    deadline = time.monotonic() + 60
    while not all(metric(c.ready["metrics"], "tandem_worker_num_running") >= 1
                  for c in launcher.cluster.workers("decode")):
        assert time.monotonic() < deadline, "the requests never ran on both decode workers"
        time.sleep(0.05)
    result = launcher.scale(1, 1)
    for t in threads:
        t.join(120)
    (name, drain), = result.drained.items()
    assert drain.num_inflight >= 1 and drain.drained, drain
    assert outcomes == ["length"] * 4, outcomes  # no request lost, each to its last token
    return name, drain
