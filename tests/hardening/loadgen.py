"""A light load generator for the hardening load test: N concurrent streaming clients over raw
asyncio HTTP/1.1 (no client library: 500 clients must not eat the cores the cluster needs), each
sending completion after completion until the end; a 429 waits for its Retry-After (at most 1 s).

Run alone against a router: ``python tests/hardening/loadgen.py URL MODEL --clients 500 --seconds 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)  # admitted requests: send -> first data chunk
    errors: Counter = field(default_factory=Counter)  # anything but 200 / 429, by kind
    error_messages: list[str] = field(default_factory=list)  # the first few SSE error events' messages
    num_tokens: int = 0

    def percentile(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _one(host: str, port: int, body: bytes, result: LoadResult) -> float:
    """One streamed completion; returns how long to wait before the next (Retry-After)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        result.statuses[status] += 1
        if status != 200:
            if status != 429:
                result.errors[f"http {status}"] += 1
            await reader.read()
            return min(1.0, float(headers.get("retry-after", "1")))
        first = True
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                if first:
                    result.ttft_s.append(time.monotonic() - t0)
                    first = False
                if b'"error"' in line:
                    error = json.loads(line[6:]).get("error", {})
                    result.errors[f"stream error {error.get('code')}"] += 1
                    if len(result.error_messages) < 5:
                        result.error_messages.append(str(error.get("message")))
                result.num_tokens += 1
            elif line.startswith(b"data: [DONE]"):
                return 0.0
        result.errors["stream cut"] += 1
        return 0.0
    finally:
        writer.close()


async def run_load(url: str, model: str, clients: int, seconds: float, seed: int = 0,
                   on_tick: object = None) -> LoadResult:
    """``clients`` concurrent clients for ``seconds``; ``on_tick(elapsed_s, result)`` (if given) is
    called about every second, in a thread, with the result so far."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    result = LoadResult()
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)

    async def client(i: int) -> None:
        await asyncio.sleep(rng.random() * 2)  # ramp over 2 s
        while time.monotonic() < deadline:
            prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(64, 256))]
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "ignore_eos": True,
                               "stream": True, "temperature": 0}).encode()
            try:
                wait = await _one(host, port, body, result)
            except (OSError, ValueError, IndexError) as e:
                result.errors[type(e).__name__] += 1
                wait = 0.5
            await asyncio.sleep(wait)

    async def ticker() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            if on_tick is not None:
                await asyncio.to_thread(on_tick, time.monotonic() - start, result)  # type: ignore[arg-type]

    await asyncio.gather(ticker(), *(client(i) for i in range(clients)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    r = asyncio.run(run_load(args.url, args.model, args.clients, args.seconds))
    print(json.dumps({"statuses": dict(r.statuses), "errors": dict(r.errors), "ttft_p50_s": r.percentile(0.5),
                      "ttft_p99_s": r.percentile(0.99)}))


if __name__ == "__main__":
    main()
