"""Serving benchmark: an async load generator against the router's OpenAI HTTP API.

Each request is a streamed ``/v1/completions`` call with token-id prompts, ``ignore_eos`` and
``max_tokens`` = its output length, so input and output lengths are exact. Prints TTFT, ITL
(gaps between streamed chunks), TPOT (a request's mean ITL), E2E and the 2nd-token gap (in
disaggregated mode: the KV handoff) p50/p90/p99 in ms, request and token throughput, goodput
(requests per second whose TTFT and TPOT both meet the targets), and the router's and workers'
counters over the run (route decisions, KV pulls and their mean time, fallbacks, failures).
The router's own overhead is measured separately: the same small request sent sequentially
through the router's HTTP API (httpx, and a raw asyncio client to discount httpx's own cost)
and straight to a decode worker's gRPC Generate.

    python bench/serve.py --device cuda --model dummy:llama-3.1-8b --out DIR  # the sweep (serve_sweep.py)
    python bench/serve.py --launch                          # 1 prefill + 1 decode, SmolLM2 on CPU
    python bench/serve.py --launch --mode aggregated --decode-workers 2
    python bench/serve.py --compare --json out.json         # 1P+1D vs 2 aggregated, same load
    python bench/serve.py --target http://127.0.0.1:8000 --rate 2 --num-requests 100
    python bench/serve.py --launch --workload shared-prefix --num-tenants 4 --prefix-len 512

Load: ``--concurrency N`` keeps N requests in flight; ``--rate R`` sends Poisson arrivals at R
requests/s (optionally capped by ``--max-concurrency``). A run ends after ``--num-requests``
or at ``--max-duration``, whichever comes first; requests still running then are cancelled
and counted as unfinished. With ``--target``, pass ``--worker-endpoint host:port`` (a decode
worker's gRPC address) to measure the router's overhead too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np

try:  # openai >= 3 ships httpx2 (the same API under a new name)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from bench import plots, serve_sweep
from protocol.sampling import SamplingParams
from runtime.convert import sampling_to_pb
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from runtime.settings import ClusterConfig

QUANTILES = (50, 90, 99)


# ---- workloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int
    tenant: int | None = None  # shared-prefix workload: whose prefix the prompt starts with


def _length(rng: random.Random, mean: int, spread: float) -> int:
    """Uniform in [mean * (1 - spread), mean * (1 + spread)], at least 1."""
    lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return rng.randint(lo, hi)


def _ids(rng: random.Random, n: int, token_range: tuple[int, int]) -> list[int]:
    return [rng.randrange(*token_range) for _ in range(n)]


def random_requests(num: int, isl: int, isl_spread: float, osl: int, osl_spread: float,
                    token_range: tuple[int, int], seed: int) -> list[BenchRequest]:
    """Independent random prompts: nothing is shared, so no prefix cache helps."""
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, _length(rng, isl, isl_spread), token_range), _length(rng, osl, osl_spread))
            for _ in range(num)]


def shared_prefix_requests(num: int, num_tenants: int, prefix_len: int, suffix_len: int, osl: int,
                           osl_spread: float, token_range: tuple[int, int], seed: int) -> list[BenchRequest]:
    """Each request: one of ``num_tenants`` long common prefixes (a system prompt, a document)
    plus a short unique suffix; tenants are picked uniformly at random."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, token_range) for _ in range(num_tenants)]
    out = []
    for _ in range(num):
        t = rng.randrange(num_tenants)
        out.append(BenchRequest(prefixes[t] + _ids(rng, suffix_len, token_range), _length(rng, osl, osl_spread), t))
    return out


# ---- one request ------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    start_s: float = 0.0  # from the start of the run
    ok: bool = False
    error: str = ""
    output_len: int = 0  # from the usage chunk
    num_chunks: int = 0  # SSE chunks carrying tokens (a chunk may hold several)
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itls_s: list[float] = field(default_factory=list)  # gaps between token chunks

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else math.nan


async def send_completion(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest,
                          result: RequestResult, t_origin: float) -> None:
    """Stream one completion, filling ``result`` as chunks arrive (so a cancelled request keeps
    what it saw)."""
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    result.start_s = t0 - t_origin
    last = t0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(text)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    return
                if chunk.get("choices"):
                    if result.num_chunks == 0:
                        result.ttft_s = now - t0
                    else:
                        result.itls_s.append(now - last)
                    last = now
                    result.num_chunks += 1
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.e2e_s = last - t0
        if result.output_len != req.max_tokens:
            result.error = f"got {result.output_len} tokens, asked for {req.max_tokens}"
        else:
            result.ok = True
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


# ---- load ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSpec:
    concurrency: int = 4  # fixed-concurrency mode (used when rate is None)
    rate: float | None = None  # Poisson arrivals, requests/s (inf: all at once)
    max_concurrency: int | None = None  # cap on in-flight requests in Poisson mode
    max_duration_s: float = 300.0
    seed: int = 0

    def describe(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        cap = f", at most {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"Poisson {self.rate:g} req/s{cap}"


class Progress:
    """``done/total`` on one line of stderr (redrawn on a terminal, every 5 s otherwise)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.done = self.failed = self.running = self.cancelled = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        cancelled = f", {self.cancelled} cancelled at the time cap" if self.cancelled else ""
        return (f"[{self.label}] {self.done}/{self.total} done, {self.running} running, {self.failed} failed"
                f"{cancelled}, {time.perf_counter() - self.t0:.1f} s")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.5 if self.tty else 5.0)
            print(("\r" + self.line()) if self.tty else self.line(), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)


async def run_load(client: httpx.AsyncClient, url: str, model: str, requests: list[BenchRequest], spec: LoadSpec,
                   label: str) -> tuple[list[RequestResult], float]:
    """Send ``requests`` under ``spec``; returns one result per request sent (in order) and the
    run's wall time (first send to last completion, or the time cap)."""
    results: list[RequestResult] = []
    progress = Progress(label, len(requests))
    t0 = time.perf_counter()
    deadline = t0 + spec.max_duration_s

    async def one(req: BenchRequest) -> None:
        result = RequestResult(len(req.prompt_ids), req.max_tokens)
        results.append(result)
        progress.running += 1
        try:
            await send_completion(client, url, model, req, result, t0)
        except asyncio.CancelledError:
            progress.cancelled += 1
            raise
        else:
            progress.done += 1
            progress.failed += not result.ok
        finally:
            progress.running -= 1

    async def closed_loop() -> None:
        pending = iter(requests)

        async def user() -> None:
            for req in pending:  # one shared iterator: each request goes to exactly one user
                if time.perf_counter() >= deadline:
                    return
                await one(req)

        await asyncio.gather(*(user() for _ in range(spec.concurrency)))

    async def open_loop() -> None:
        rng = random.Random(spec.seed)
        gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        tasks = []

        async def gated(req: BenchRequest) -> None:
            if gate is None:
                return await one(req)
            async with gate:
                await one(req)

        try:
            for i, req in enumerate(requests):
                if i and spec.rate != math.inf:
                    await asyncio.sleep(rng.expovariate(spec.rate))
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(gated(req)))
            await asyncio.gather(*tasks)
        finally:  # cancelled at the time cap: so are the requests in flight
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    reporter = asyncio.create_task(progress.run())
    work = asyncio.create_task(closed_loop() if spec.rate is None else open_loop())
    try:
        await asyncio.wait({work}, timeout=max(0.0, deadline - time.perf_counter()))
        if not work.done():
            work.cancel()  # cancels every in-flight request (the router aborts them upstream)
        await asyncio.gather(work, return_exceptions=True)
        for r in results:
            if not r.ok and not r.error:
                r.error = "unfinished at --max-duration"
    finally:
        reporter.cancel()
        progress.close()
    return results, time.perf_counter() - t0


# ---- statistics ------------------------------------------------------------------------------------
def _dist_ms(values_s: list[float]) -> dict[str, float]:
    xs = np.asarray([v for v in values_s if not math.isnan(v)], dtype=float) * 1000
    if xs.size == 0:
        return {"mean": math.nan, **{f"p{q}": math.nan for q in QUANTILES}}
    return {"mean": float(xs.mean()), **{f"p{q}": float(np.percentile(xs, q)) for q in QUANTILES}}


def summarize(results: list[RequestResult], duration_s: float, ttft_target_ms: float,
              itl_target_ms: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s * 1000 <= ttft_target_ms
            and (r.output_len <= 1 or r.tpot_s * 1000 <= itl_target_ms)]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_len for r in ok)
    return {
        "num_sent": len(results), "num_ok": len(ok), "num_failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "input_throughput": sum(r.prompt_len for r in ok) / duration_s,
        "goodput": len(good) / duration_s, "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_target_ms": ttft_target_ms, "itl_target_ms": itl_target_ms,
        "mean_tokens_per_chunk": out_tokens / max(1, sum(r.num_chunks for r in ok)),
        "mean_input_len": float(np.mean([r.prompt_len for r in results])) if results else 0.0,
        "mean_output_len": out_tokens / len(ok) if ok else 0.0,
        "ttft_ms": _dist_ms([r.ttft_s for r in ok]),
        "itl_ms": _dist_ms([x for r in ok for x in r.itls_s]),
        # first token -> second: in disaggregated mode, the KV handoff (pull + joining the decode batch)
        "second_token_gap_ms": _dist_ms([r.itls_s[0] for r in ok if r.itls_s]),
        "tpot_ms": _dist_ms([r.tpot_s for r in ok]),
        "e2e_ms": _dist_ms([r.e2e_s for r in ok]),
    }


# ---- Prometheus counters (scraped before and after a run) -------------------------------------------
ROUTER_COUNTERS = ("tandem_router_route_decisions_total", "tandem_router_worker_failures_total",
                   "tandem_router_requests_total")
WORKER_COUNTERS = ("tandem_kv_transfer_duration_seconds_sum", "tandem_kv_transfer_duration_seconds_count",
                   "tandem_kv_transfer_blocks_total", "tandem_kv_transfer_failures_total",
                   "tandem_kv_pull_fallbacks_total")


async def scrape(client: httpx.AsyncClient, metrics_url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The named series of a /metrics page, keyed ``name{labels}`` without ``tandem_`` (or ``tandem_router_``)."""
    try:
        text = (await client.get(metrics_url, headers={"accept": "text/plain"})).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m and m.group(1) in names:
            out[re.sub(r"^tandem_(router_)?", "", m.group(1)) + (m.group(2) or "")] = float(m.group(3))
    return out


async def scrape_all(client: httpx.AsyncClient, url: str, worker_metrics: dict[str, str]) -> dict[str, float]:
    out = {f"router.{k}": v for k, v in (await scrape(client, f"{url}/metrics", ROUTER_COUNTERS)).items()}
    for name, metrics_url in worker_metrics.items():
        out |= {f"{name}.{k}": v for k, v in (await scrape(client, metrics_url, WORKER_COUNTERS)).items()}
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# ---- router overhead --------------------------------------------------------------------------------
class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client (POST a JSON body, read a Content-Length reply), to
    tell the router's cost from the HTTP client library's."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[-1].rstrip("/")
        self.host, _, port = host_port.rpartition(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = head.split(" ", 2)[1]
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if status != "200" or length is None:
            raise RuntimeError(f"raw HTTP: status {status}, headers {head!r}")
        return await self.reader.readexactly(int(length.group(1)))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def router_overhead(client: httpx.AsyncClient, url: str, model: str, worker_endpoint: str, num: int,
                          warmup: int, token_range: tuple[int, int], seed: int) -> dict[str, Any]:
    """The same 8-token, 1-output-token greedy request, sequentially, through the router (HTTP,
    plain and streamed) and straight to a decode worker (gRPC Generate), interleaved round by
    round so that drift in the machine's load hits every path alike. Both sides include their
    client's cost (httpx + JSON vs grpc.aio + protobuf); ``GET /health`` is the HTTP floor."""
    prompt = _ids(random.Random(seed), 8, token_range)  # 8 < block size: no prefix-cache hit on either path
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    # exactly what the router sends for `body` (to_sampling, then sampling_to_pb)
    sampling = sampling_to_pb(SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))

    async def http_plain() -> None:
        resp = await client.post(f"{url}/v1/completions", json=body)
        resp.raise_for_status()
        assert resp.json()["usage"]["completion_tokens"] == 1

    raw = RawHTTP(url)
    raw_body = json.dumps(body).encode()

    async def http_raw() -> None:
        assert json.loads(await raw.post("/v1/completions", raw_body))["usage"]["completion_tokens"] == 1

    async def http_stream() -> None:
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    break

    async with grpc.aio.insecure_channel(worker_endpoint) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)

        async def grpc_direct() -> None:
            req = pb.GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=sampling)
            n = 0
            async for msg in stub.Generate(req):
                n += sum(len(o.token_ids) for o in msg.outputs)
            assert n == 1

        async def health() -> None:
            (await client.get(f"{url}/health")).raise_for_status()

        paths = {"http_completions": http_plain, "http_completions_raw": http_raw,
                 "http_completions_stream": http_stream, "grpc_generate_direct": grpc_direct,
                 "http_health": health}
        samples: dict[str, list[float]] = {name: [] for name in paths}
        rng = random.Random(seed)
        for i in range(warmup + num):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                await paths[name]()
                if i >= warmup:
                    samples[name].append(time.perf_counter() - t0)
    await raw.close()
    stats = {}
    for name, xs in samples.items():
        ms = np.asarray(xs) * 1000
        stats[name] = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                       "min": float(ms.min()), "mean": float(ms.mean())}
    direct = stats["grpc_generate_direct"]
    return {"num": num, "worker_endpoint": worker_endpoint, "prompt_len": len(prompt), "max_tokens": 1,
            "paths": stats,
            "added_p50_ms": stats["http_completions"]["p50"] - direct["p50"],
            "added_p50_stream_ms": stats["http_completions_stream"]["p50"] - direct["p50"],
            "added_p50_raw_client_ms": stats["http_completions_raw"]["p50"] - direct["p50"],
            "added_min_ms": stats["http_completions"]["min"] - direct["min"]}


# ---- one configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    label: str
    mode: str
    num_prefill: int
    num_decode: int


async def bench_endpoint(args: argparse.Namespace, url: str, label: str, requests: list[BenchRequest],
                         worker_endpoint: str | None, worker_metrics: dict[str, str] | None = None) -> dict[str, Any]:
    token_range = _token_range(args.token_range)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = args.model_name or (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        out: dict[str, Any] = {"label": label, "url": url, "model": model}
        if args.warmup:
            print(f"[{label}] warm-up: {args.warmup} request(s)", file=sys.stderr, flush=True)
            warm = random_requests(args.warmup, args.isl, 0.0, 4, 0.0, token_range, args.seed + 1)
            for req in warm:
                r = RequestResult(len(req.prompt_ids), req.max_tokens)
                await send_completion(client, url, model, req, r, time.perf_counter())
                if not r.ok:
                    raise SystemExit(f"[{label}] warm-up request failed: {r.error}")
        spec = LoadSpec(args.concurrency, args.rate, args.max_concurrency, args.max_duration, args.seed)
        print(f"[{label}] {len(requests)} requests, {spec.describe()}", file=sys.stderr, flush=True)
        before = await scrape_all(client, url, worker_metrics or {})
        results, duration = await run_load(client, url, model, requests, spec, label)
        out["counters"] = counter_delta(before, await scrape_all(client, url, worker_metrics or {}))
        out["summary"] = summarize(results, duration, args.ttft_target_ms, args.itl_target_ms)
        out["requests"] = [dataclasses.asdict(r) for r in results]
        if worker_endpoint and args.overhead_requests:
            print(f"[{label}] router overhead: {args.overhead_requests} sequential rounds against {worker_endpoint}",
                  file=sys.stderr, flush=True)
            out["router_overhead"] = await router_overhead(client, url, model, worker_endpoint,
                                                           args.overhead_requests, 5, token_range, args.seed)
    return out


def sweep_points(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The runs of ``--sweep-concurrency`` and ``--sweep-rate``: ``args`` with the load changed."""
    points = [argparse.Namespace(**{**vars(args), "concurrency": int(c), "rate": None})
              for c in (args.sweep_concurrency or "").split(",") if c]
    points += [argparse.Namespace(**{**vars(args), "rate": float(r)}) for r in (args.sweep_rate or "").split(",") if r]
    return points


async def bench_sweep(args: argparse.Namespace, url: str, series: str, requests: list[BenchRequest],
                      worker_metrics: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One run per sweep point against one cluster (no router-overhead rounds)."""
    out = []
    for point in sweep_points(args):
        point.overhead_requests = 0
        label = f"{series} c={point.concurrency}" if point.rate is None else f"{series} {point.rate:g} req/s"
        run = await bench_endpoint(point, url, label, requests, None, worker_metrics)
        out.append(run | {"series": series, "concurrency": point.concurrency, "rate": point.rate})
    return out


def bench_launched(args: argparse.Namespace, run: RunConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    from deploy.local_cluster import LocalCluster

    cfg = ClusterConfig(mode=run.mode, port=0, grpc_port=0, model=args.model, dtype=args.dtype, device=args.device,
                        engine=args.engine,
                        threads=args.threads, transport=args.transport, kv_transfer_mode=args.kv_transfer_mode,
                        max_local_prefill_tokens=args.max_local_prefill_tokens, kv_cache_gib=args.kv_cache_gib,
                        prefill_kv_cache_gib=args.prefill_kv_cache_gib,
                        gpu_memory_fraction=args.gpu_memory_fraction if run.num_prefill + run.num_decode > 1 else 0.0,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_share=args.gpu_share == "on", joining_prefill_tokens=args.joining_prefill_tokens)
    log_dir = Path(args.log_dir) / re.sub(r"[^\w+.-]+", "_", run.label) if args.log_dir else None
    print(f"[{run.label}] starting {run.mode} cluster: {run.num_prefill} prefill + {run.num_decode} decode",
          file=sys.stderr, flush=True)
    cluster = LocalCluster(cfg, num_prefill=run.num_prefill, num_decode=run.num_decode, log_dir=log_dir)
    try:
        cluster.start()
        decode = cluster.workers("decode")[0].ready or {}
        worker_metrics = {c.name: c.ready["metrics"] for c in cluster.children
                          if c.ready and c.ready.get("metrics") and c.name != "router"}
        out = asyncio.run(bench_endpoint(args, cluster.http_url, run.label, requests, decode.get("endpoint"),
                                         worker_metrics))
        if sweep_points(args):
            out["sweep"] = asyncio.run(bench_sweep(args, cluster.http_url, run.label, requests, worker_metrics))
        dead = [c.name for c in cluster.children if c.proc.poll() is not None]
        if dead:
            out["dead_processes"] = dead
            print(f"[{run.label}] WARNING: {', '.join(dead)} exited during the run", file=sys.stderr)
    finally:
        cluster.stop()
    out["cluster"] = {"mode": run.mode, "num_prefill": cluster.num_prefill, "num_decode": cluster.num_decode,
                      "threads_per_worker": cluster.cfg.threads, "dtype": cfg.dtype,
                      "max_local_prefill_tokens": cfg.max_local_prefill_tokens, "transport": cfg.transport}
    return out


# ---- report ---------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def print_report(runs: list[dict[str, Any]]) -> None:
    s0 = runs[0]["summary"]
    rows: list[tuple[str, list[float], bool]] = [  # (name, values, higher is better)
        ("requests ok / sent", [], True),
        ("duration s", [r["summary"]["duration_s"] for r in runs], False),
        ("request throughput req/s", [r["summary"]["request_throughput"] for r in runs], True),
        ("output throughput tok/s", [r["summary"]["output_throughput"] for r in runs], True),
        ("input throughput tok/s", [r["summary"]["input_throughput"] for r in runs], True),
        (f"goodput req/s (TTFT<={s0['ttft_target_ms']:g}, ITL<={s0['itl_target_ms']:g} ms)",
         [r["summary"]["goodput"] for r in runs], True),
    ]
    for metric in ("ttft", "itl", "tpot", "e2e", "second_token_gap"):
        name = "2nd-token gap" if metric == "second_token_gap" else metric.upper()
        for stat in ("p50", "p90", "p99"):
            rows.append((f"{name} {stat} ms", [r["summary"][f"{metric}_ms"][stat] for r in runs], False))
    rows.append(("tokens per stream chunk", [r["summary"]["mean_tokens_per_chunk"] for r in runs], True))
    width = max(len(name) for name, _, _ in rows) + 2
    colw = max(14, *(len(r["label"]) + 2 for r in runs))
    compare = len(runs) == 2
    header = f"{'':<{width}}" + "".join(f"{r['label']:>{colw}}" for r in runs) + (f"{'a/b':>8}" if compare else "")
    print()
    print(header)
    print("-" * len(header))
    for name, values, _ in rows:
        if not values:
            cells = [f"{r['summary']['num_ok']}/{r['summary']['num_sent']}" for r in runs]
            print(f"{name:<{width}}" + "".join(f"{c:>{colw}}" for c in cells))
            continue
        line = f"{name:<{width}}" + "".join(f"{_fmt(v):>{colw}}" for v in values)
        if compare:
            a, b = values
            line += f"{a / b:>8.2f}" if b and not (math.isnan(a) or math.isnan(b)) else f"{'-':>8}"
        print(line)
    if compare:
        print("a/b: first column over second (latency: < 1 means the first is faster; throughput: > 1)")
    for r in runs:
        s = r["summary"]
        print(f"[{r['label']}] mean ISL {s['mean_input_len']:.0f}, mean OSL {s['mean_output_len']:.1f}")
        counters = r.get("counters", {})
        if counters:
            print(f"[{r['label']}] counters during the run: "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(counters.items()) if "_seconds_" not in k))
        pulls = {k.split(".")[0]: v for k, v in counters.items() if "duration_seconds_count" in k}
        for worker, n in pulls.items():
            total = sum(v for k, v in counters.items() if k.startswith(f"{worker}.") and "duration_seconds_sum" in k)
            print(f"[{r['label']}] {worker}: {n:g} KV pulls, mean {total / n * 1000:.2f} ms each")
        for err, n in s["errors"].items():
            print(f"[{r['label']}] {n} x {err}")
    for r in runs:
        o = r.get("router_overhead")
        if not o:
            continue
        print(f"\n[{r['label']}] router overhead: {o['prompt_len']}-token prompt, max_tokens=1, greedy, "
              f"{o['num']} sequential interleaved rounds (decode worker {o['worker_endpoint']})")
        print(f"  {'path':<50}{'p50 ms':>9}{'p90 ms':>9}{'min ms':>9}")
        names = {"http_completions": "router HTTP /v1/completions (httpx + JSON)",
                 "http_completions_raw": "router HTTP /v1/completions (raw asyncio client)",
                 "http_completions_stream": "router HTTP /v1/completions stream=true",
                 "grpc_generate_direct": "decode worker gRPC Generate (grpc.aio)",
                 "http_health": "router HTTP GET /health (HTTP floor)"}
        for key, name in names.items():
            p = o["paths"][key]
            print(f"  {name:<50}{p['p50']:>9.2f}{p['p90']:>9.2f}{p['min']:>9.2f}")
        verdict = "within" if o["added_p50_ms"] <= 2.0 else "over"
        print(f"  added by the router, p50 (httpx): {o['added_p50_ms']:.2f} ms ({verdict} the 2 ms target); "
              f"raw client: {o['added_p50_raw_client_ms']:.2f} ms; streamed: {o['added_p50_stream_ms']:.2f} ms; "
              f"min vs min: {o['added_min_ms']:.2f} ms")


# ---- command line -----------------------------------------------------------------------------------
def _token_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_argument_group("what to benchmark (one of)")
    where.add_argument("--target", help="router base URL of a running cluster, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", action="store_true", help="start a LocalCluster (--mode, --*-workers)")
    where.add_argument("--compare", action="store_true",
                       help="launch (a) 1 prefill + 1 decode and (b) 2 aggregated decode workers, same load")
    c = p.add_argument_group("launched cluster")
    c.add_argument("--mode", default="disaggregated", choices=["disaggregated", "aggregated"])
    c.add_argument("--prefill-workers", type=int, default=1)
    c.add_argument("--decode-workers", type=int, default=1)
    c.add_argument("--model", default="", help="model to serve (empty: the engine default, SmolLM2-135M)")
    c.add_argument("--engine", default="torch", choices=["torch", "sim"], help="sim: the fitted timing model")
    c.add_argument("--dtype", default=ClusterConfig.dtype, choices=["bfloat16", "float16", "float32"])
    c.add_argument("--threads", type=int, default=0, help="CPU threads per worker (0: the local cluster's default)")
    c.add_argument("--device", default="cpu", help="the workers' torch device: cpu, cuda, cuda:N")
    c.add_argument("--transport", default="auto", help="KV transport: auto, nixl, cuda_ipc, nccl, tcp")
    c.add_argument("--kv-transfer-mode", default="auto", choices=["auto", "push", "pull"],
                   help="who moves a prompt's KV (auto: what the transport measured faster)")
    c.add_argument("--max-local-prefill-tokens", type=int, default=ClusterConfig.max_local_prefill_tokens)
    c.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per worker, GiB (default: 1 on cpu, 32 on cuda)")
    c.add_argument("--prefill-kv-cache-gib", type=float, default=None,
                   help="a prefill worker's KV cache, GiB (default: --kv-cache-gib on cpu, 16 on cuda)")
    c.add_argument("--gpu-memory-fraction", type=float, default=0.45,
                   help="cuda, 1P+1D: the most of the GPU one worker may take (both share one GPU)")
    c.add_argument("--gpu-share", default="on" if ClusterConfig.gpu_share else "off", choices=["on", "off"],
                   help="workers sharing one GPU: the prefill worker yields to the decode worker's first decode of a "
                        "handoff (engine/gpu_share.py)")
    c.add_argument("--joining-prefill-tokens", type=int, default=ClusterConfig.joining_prefill_tokens,
                   help="decode worker: prompt tokens per step while handoffs join (0: no cap)")
    c.add_argument("--max-num-seqs", type=int, default=ClusterConfig.max_num_seqs)
    c.add_argument("--max-num-batched-tokens", type=int, default=ClusterConfig.max_num_batched_tokens)
    c.add_argument("--log-dir", default=None, help="write each process's log under DIR/<run label>/")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="random", choices=["random", "shared-prefix"])
    w.add_argument("--num-requests", type=int, default=40)
    w.add_argument("--isl", type=int, default=128, help="mean input length (random workload)")
    w.add_argument("--isl-spread", type=float, default=0.25, help="input lengths uniform in isl * (1 +- spread)")
    w.add_argument("--osl", type=int, default=32, help="mean output length")
    w.add_argument("--osl-spread", type=float, default=0.25, help="output lengths uniform in osl * (1 +- spread)")
    w.add_argument("--num-tenants", type=int, default=4, help="shared-prefix: distinct prefixes")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens in each prefix")
    w.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: unique tokens after the prefix")
    w.add_argument("--token-range", default="1000:30000", help="prompt token ids are drawn from [lo, hi)")
    w.add_argument("--seed", type=int, default=0)
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=4, help="requests kept in flight (without --rate)")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals, req/s ('inf': all at once)")
    load.add_argument("--max-concurrency", type=int, default=None, help="with --rate: cap on in-flight requests")
    load.add_argument("--max-duration", type=float, default=300.0, help="time cap per run, s")
    load.add_argument("--request-timeout", type=float, default=300.0, help="per-request read timeout, s")
    load.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before each run")
    o = p.add_argument_group("report")
    o.add_argument("--ttft-target-ms", type=float, default=2000.0, help="goodput: TTFT target")
    o.add_argument("--itl-target-ms", type=float, default=200.0, help="goodput: target for a request's mean ITL")
    o.add_argument("--overhead-requests", type=int, default=50, help="router overhead rounds (0: skip)")
    o.add_argument("--worker-endpoint", default=None, help="with --target: a decode worker's gRPC host:port")
    o.add_argument("--model-name", default=None, help="model name for requests (default: from /v1/models)")
    o.add_argument("--sweep-concurrency", default="", help="also run at each of these concurrencies (e.g. 1,4,16): "
                                                          "throughput against concurrency")
    o.add_argument("--sweep-rate", default="", help="also run at each of these Poisson rates, req/s (e.g. 2,8,32): "
                                                   "goodput against rate")
    o.add_argument("--json", default=None, help="write the results here, and the figures beside it (bench/plots.py)")
    serve_sweep.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.kv_cache_gib is None:
        args.kv_cache_gib = 32.0 if cuda else ClusterConfig.kv_cache_gib
    if args.prefill_kv_cache_gib is None:
        args.prefill_kv_cache_gib = 16.0 if cuda else 0.0
    if not cuda:
        args.gpu_memory_fraction = 0.0
    if sum(map(bool, (args.target, args.launch, args.compare, args.sweep))) > 1:
        raise SystemExit("give at most one of --target URL, --launch, --compare, --sweep")
    if not (args.target or args.launch or args.compare):
        return serve_sweep.run(args)
    token_range = _token_range(args.token_range)
    if args.workload == "random":
        requests = random_requests(args.num_requests, args.isl, args.isl_spread, args.osl, args.osl_spread,
                                   token_range, args.seed)
    else:
        requests = shared_prefix_requests(args.num_requests, args.num_tenants, args.prefix_len, args.suffix_len,
                                          args.osl, args.osl_spread, token_range, args.seed)
    if args.target:
        runs = [asyncio.run(bench_endpoint(args, args.target.rstrip("/"), "target", requests,
                                           args.worker_endpoint))]
        if sweep_points(args):
            runs[0]["sweep"] = asyncio.run(bench_sweep(args, args.target.rstrip("/"), "target", requests))
    else:
        if args.compare:
            configs = [RunConfig("a: 1P+1D disagg", "disaggregated", 1, 1),
                       RunConfig("b: 2 agg", "aggregated", 0, 2)]
        else:
            n_p = args.prefill_workers if args.mode == "disaggregated" else 0
            configs = [RunConfig(f"{n_p}P+{args.decode_workers}D {args.mode[:6]}", args.mode, n_p,
                                 args.decode_workers)]
        runs = [bench_launched(args, run, requests) for run in configs]
    print_report(runs)
    if args.json:
        result = {"args": vars(args), "runs": runs, "sweep": [p for r in runs for p in r.pop("sweep", [])]}
        Path(args.json).write_text(json.dumps(result, indent=1))
        figures = plots.serve_figures(result, Path(args.json).with_suffix(""))
        print(f"\nresults written to {args.json}; figures: {', '.join(map(str, figures))}")
    return 0 if all(r["summary"]["num_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
