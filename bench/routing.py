"""Routing benchmark: the same shared-context chat workload through each routing policy.

Workload: ``--tenants`` tenants, each with a ``--context``-token system context; each request
is a turn of one of a tenant's ``--users`` conversations: context + the conversation so far
(earlier user messages and replies) + a new user message of about ``--user-len`` tokens, with
``--osl`` output tokens; a conversation restarts after ``--turns`` turns. Poisson arrivals at
``--rate`` requests/s. Before each measured run every tenant's context is sent once (not
measured): the runs compare steady states, not how fast each policy warms its caches up.

One cluster serves every policy: each policy gets its own router replica (same etcd, same
workers), ``--rounds`` times, in an order rotated each round (the first policy of a round runs
on workers whose step times have not yet been shaped by the others' load; the table averages
the rounds), and each run uses fresh token ids with the same structure (tenants, lengths,
arrival times), so no run finds another's prefixes cached: every run starts as cold as the
first. Prints TTFT and E2E (mean, p90, p99), the prefix hit rate (prompt tokens the workers
served from their caches, over all prompt tokens, from the workers' own counters) and
throughput per policy, with the ratios kv/round_robin and kv/random. Then the router's
decision latency with 100k (worker, block) pairs indexed.

    python bench/routing.py                                    # sim engine, 16 workers
    python bench/routing.py --engine torch --workers 2 --tenants 8 --context 512 --users 2 \\
        --user-len 32 --osl 16 --rate 0.5 --num-requests 60 --kv-cache-gib 0.1 --dtype float32
    python bench/routing.py --only-decision-latency
    python bench/routing.py --engine both --policies kv,round_robin   # the sim run, then the real model's

``--engine both`` runs the sim workload as given, then the real model (the torch engine, SmolLM2 on
the CPU) on the small workload of ``TORCH_PRESET`` (the one the CPU figures of issue 4 used), and
prints the two side by side: a policy tuned on the sim profile must hold on the real engine too.

With the sim engine the workers' step times come from ``--sim-profile`` (fitted on an H200 with
Llama-3.1-8B's shape), multiplied by ``--sim-time-scale``: a model that many times larger, so
that 16 workers saturate at a request rate the router and load generator on one small machine
can drive (the router and the load generator are real, not simulated).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # bench/serve.py: the load generator

from bench import plots
from deploy.local_cluster import LocalCluster
from engine.sim import COEFFICIENTS, SimProfile
from protocol.hashing import hash_blocks
from router import policy
from router.tier_index import TierIndex
from runtime.settings import ClusterConfig

POLICIES = ("kv", "round_robin", "random", "least_loaded")


# ---- workload ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    num_requests: int
    num_tenants: int
    context_len: int
    users_per_tenant: int
    user_len: int
    osl: int
    turns: int
    seed: int

    def requests(self, token_seed: int, token_range: tuple[int, int]) -> tuple[list[serve.BenchRequest],
                                                                               list[serve.BenchRequest]]:
        """(warm-up: one request per tenant, measured requests). The structure (tenants, users,
        lengths) depends on ``seed`` only; token ids on ``token_seed``."""
        shape = random.Random(self.seed)
        tok = random.Random(token_seed)

        def ids(n: int) -> list[int]:
            return [tok.randrange(*token_range) for _ in range(n)]

        contexts = [ids(self.context_len) for _ in range(self.num_tenants)]
        warmup = [serve.BenchRequest([*c, *ids(8)], 1, t) for t, c in enumerate(contexts)]
        conversations: dict[tuple[int, int], tuple[list[int], int]] = {}
        out = []
        for _ in range(self.num_requests):
            tenant = shape.randrange(self.num_tenants)
            user = shape.randrange(self.users_per_tenant)
            history, turn = conversations.get((tenant, user), ([], 0))
            if turn >= self.turns:
                history, turn = [], 0
            message = ids(shape.randint(max(1, self.user_len // 2), self.user_len * 3 // 2))
            out.append(serve.BenchRequest([*contexts[tenant], *history, *message], self.osl, tenant))
            reply = ids(self.osl)  # what the next turn quotes as the assistant's answer
            conversations[(tenant, user)] = ([*history, *message, *reply], turn + 1)
        return warmup, out


# ---- one policy ----------------------------------------------------------------------------------
async def worker_counters(client: Any, urls: list[str]) -> tuple[float, float]:
    """(prompt tokens, of which served from the prefix cache) summed over the workers."""
    prompt = cached = 0.0
    for url in urls:
        text = (await client.get(url)).text
        for name, value in re.findall(r"^tandem_worker_(prompt_tokens|cached_prompt_tokens)_total (\S+)$", text, re.M):
            if name == "prompt_tokens":
                prompt += float(value)
            else:
                cached += float(value)
    return prompt, cached


async def run_policy(url: str, worker_urls: list[str], warmup: list[serve.BenchRequest],
                     requests: list[serve.BenchRequest], spec: serve.LoadSpec, label: str) -> dict[str, Any]:
    limits = serve.httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with serve.httpx.AsyncClient(limits=limits, timeout=serve.httpx.Timeout(600.0, connect=10.0)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        print(f"[{label}] warm-up: each tenant's context once", file=sys.stderr, flush=True)
        warm_spec = dataclasses.replace(spec, rate=None, concurrency=8, max_duration_s=600.0)
        warm, _ = await serve.run_load(client, url, model, warmup, warm_spec, f"{label} warm-up")
        failed = [r.error for r in warm if not r.ok]
        if failed:
            raise SystemExit(f"[{label}] warm-up failed: {failed[:3]}")
        prompt0, cached0 = await worker_counters(client, worker_urls)
        # The load generator's own full collections (the workload: ~2M token ids) would stall
        # every stream it reads for up to 0.2 s, and show as the servers' TTFT.
        gc.collect()
        gc.freeze()
        try:
            results, duration = await serve.run_load(client, url, model, requests, spec, label)
        finally:
            gc.unfreeze()
        prompt1, cached1 = await worker_counters(client, worker_urls)
    summary = serve.summarize(results, duration, 1e9, 1e9)
    summary["prefix_hit_rate"] = (cached1 - cached0) / (prompt1 - prompt0) if prompt1 > prompt0 else math.nan
    return summary


def scaled_profile(name: str, scale: float, out_dir: Path) -> str:
    """``name``'s profile with every coefficient times ``scale``, as a file; its path."""
    profile = SimProfile.load(name)
    if scale == 1.0:
        return name
    scaled = dataclasses.replace(profile, name=f"{profile.name}-x{scale:g}",
                                 **{k: getattr(profile, k) * scale for k in COEFFICIENTS},
                                 fit={k: v for k, v in profile.fit.items() if k != "samples"})
    path = out_dir / f"{scaled.name}.json"
    scaled.save(path)
    return str(path)


def run_cluster(args: argparse.Namespace, workload: Workload) -> dict[str, dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="tandem-routing-bench-"))
    sim_profile = scaled_profile(args.sim_profile, args.sim_time_scale, tmp) if args.engine == "sim" else ""
    cfg = ClusterConfig(mode=args.mode, port=0, grpc_port=0, engine=args.engine, sim_profile=sim_profile,
                        model=args.model, dtype=args.dtype, threads=args.threads, kv_cache_gib=args.kv_cache_gib,
                        transport="tcp", max_local_prefill_tokens=args.max_local_prefill_tokens,
                        max_num_batched_tokens=args.max_num_batched_tokens, log_level="WARNING",
                        prefill_load_scale=args.prefill_load_scale, router_temperature=args.router_temperature)
    num_prefill = args.prefill_workers if args.mode == "disaggregated" else 0
    print(f"starting {args.workers} {args.engine} decode workers" + (f" + {num_prefill} prefill" if num_prefill
          else "") + f" ({args.mode}); sim profile {sim_profile or '-'}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cluster = LocalCluster(cfg, num_prefill=num_prefill, num_decode=args.workers, quiet=True,
                           log_dir=args.log_dir)
    results: dict[str, dict[str, Any]] = {}
    try:
        cluster.start(timeout_s=900)
        print(f"cluster up in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        worker_urls = [c.ready["metrics"] for c in cluster.children if c.ready and "metrics" in c.ready
                       and not c.name.startswith("router")]
        spec = serve.LoadSpec(rate=args.rate, max_concurrency=args.max_concurrency, max_duration_s=args.max_duration,
                              seed=args.seed)
        by_policy: dict[str, list[dict[str, Any]]] = {name: [] for name in args.policies}
        k = 0
        for rnd in range(args.rounds):  # round r starts with policy r: none always runs first (or last)
            for name in args.policies[rnd % len(args.policies):] + args.policies[:rnd % len(args.policies)]:
                k += 1
                policy_name, _, scale = name.partition("@")
                router = cluster.add_router(routing_policy=policy_name,
                                            prefill_load_scale=float(scale) if scale else args.prefill_load_scale)
                warmup, requests = workload.requests(args.seed * 1000 + k, (1000, 30000))
                try:
                    s = asyncio.run(run_policy(router.ready["http"], worker_urls, warmup, requests, spec, name))
                finally:
                    router.proc.terminate()
                    router.proc.wait(30)
                by_policy[name].append(s)
                print(f"[{name}, round {rnd + 1}] TTFT mean {s['ttft_ms']['mean']:.0f} ms, p99 "
                      f"{s['ttft_ms']['p99']:.0f} ms, hit rate {s['prefix_hit_rate']:.2f}, "
                      f"{s['request_throughput']:.2f} req/s", file=sys.stderr, flush=True)
        results = {name: mean_summary(runs) for name, runs in by_policy.items()}
        dead = [c.name for c in cluster.children if c.proc.poll() not in (None, 0, -15)]
        if dead:
            print(f"WARNING: {dead} exited during the runs", file=sys.stderr)
    finally:
        cluster.stop()
    return results


# The real-engine half of ``--engine both``: 2 CPU workers, a workload two cores can serve.
TORCH_PRESET: dict[str, Any] = dict(engine="torch", workers=2, mode="aggregated", tenants=8, context=512, users=2,
                                    user_len=32, osl=16, rate=0.6, num_requests=60, kv_cache_gib=0.15,
                                    dtype="float32", threads=1)


def run_engine(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """One engine's runs of every policy, and its table's title."""
    workload = Workload(args.num_requests, args.tenants, args.context, args.users, args.user_len, args.osl,
                        args.turns, args.seed)
    runs = {k: {"summary": v} for k, v in run_cluster(args, workload).items()}
    engine = f"sim engine ({args.sim_profile} x{args.sim_time_scale:g})" if args.engine == "sim" else \
        f"torch engine ({args.model or 'SmolLM2-135M'}, {args.dtype}, CPU)"
    title = (f"{args.workers} workers, {args.mode}, {engine}, kv policy with prefill_load_scale "
             f"{args.prefill_load_scale:g}: {args.tenants} tenants x {args.context}-token context, "
             f"{args.users} users x {args.turns} turns, ~{args.user_len}-token messages, {args.osl} output tokens; "
             f"Poisson {args.rate:g} req/s, {args.num_requests} requests per policy")
    print_table(runs, title)
    return runs, title


def print_side_by_side(by_engine: dict[str, dict[str, Any]]) -> None:
    """kv against each other policy, per engine: the ratios the routing targets are stated in."""
    others = [p for p in next(iter(by_engine.values())) if p != "kv"]
    if "kv" not in next(iter(by_engine.values())) or not others:
        return
    print("\nkv policy against the others, sim engine beside the real one (ratio other/kv: > 1 means kv is better "
          "for latency; hit rate and throughput as kv/other)")
    header = f"{'':<22}" + "".join(f"{e + ' kv/' + o:>26}" for e in by_engine for o in others)
    print(header + "\n" + "-" * len(header))
    rows = (("TTFT mean", "ttft_ms", "mean", True), ("TTFT p99", "ttft_ms", "p99", True),
            ("E2E mean", "e2e_ms", "mean", True), ("prefix hit rate", "prefix_hit_rate", None, False),
            ("throughput req/s", "request_throughput", None, False))
    for label, metric, stat, invert in rows:
        cells = []
        for runs in by_engine.values():
            for o in others:
                kv, other = (runs[n]["summary"][metric] for n in ("kv", o))
                kv, other = (kv[stat], other[stat]) if stat else (kv, other)
                num, den = (other, kv) if invert else (kv, other)
                cells.append(f"{num / den:>25.2f}x" if den else f"{'-':>26}")
        print(f"{label:<22}" + "".join(cells))


def mean_summary(runs: list[Any]) -> Any:
    """The rounds' summaries of one policy, every number averaged (counts too: per round)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: mean_summary([r.get(key, 0) for r in runs]) for key in dict.fromkeys(k for r in runs for k in r)}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.mean(runs)
    return first


# ---- decision latency -----------------------------------------------------------------------------
def decision_latency(num_blocks: int = 100_000, num_workers: int = 16, context_len: int = 2048,
                     num_decisions: int = 5000, seed: int = 0) -> dict[str, Any]:
    """The router's decision (hash the prompt, look up both indexes, cost every worker, choose)
    with ``num_blocks`` (worker, block) pairs indexed, timed in-process."""
    rng = random.Random(seed)
    bs = 16
    tier = TierIndex("decode", bs, kv_events=True, ttl_s=120.0)
    blocks_per_context = context_len // bs
    num_contexts = -(-num_blocks // (blocks_per_context * 4))  # each context on 4 workers
    contexts = [[rng.randrange(1000, 30000) for _ in range(context_len)] for _ in range(num_contexts)]
    workers = [f"decode-{i}" for i in range(num_workers)]
    placed = 0
    for ctx in contexts:
        for w in rng.sample(workers, 4):
            for h in hash_blocks(ctx, bs):
                if placed < num_blocks:
                    tier.exact.store(w, h)
                    placed += 1
    loads = [policy.WorkerLoad(w, num_inflight=rng.randrange(8), num_inflight_prefill_tokens=rng.randrange(4096),
                               num_active_blocks=rng.randrange(2000)) for w in workers]
    wall: list[float] = []
    cpu: list[float] = []  # this thread's CPU time: what the decision costs, without the machine's other load
    lookup: list[float] = []
    for i in range(num_decisions):
        prompt = [*contexts[rng.randrange(num_contexts)], *(rng.randrange(1000, 30000) for _ in range(64))]
        c0, t0 = time.thread_time(), time.perf_counter()
        hashes = tier.hashes(prompt)
        t1 = time.perf_counter()
        decision = policy.choose("kv", len(prompt), tier.overlaps(hashes), loads, bs, turn=i, rng=rng)
        tier.record(decision.worker_id, hashes)
        t2, c2 = time.perf_counter(), time.thread_time()
        wall.append(t2 - t0)
        cpu.append(c2 - c0)
        lookup.append(t2 - t1)

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=1000)[int(p * 10) - 1] * 1000

    return {"indexed_blocks": tier.exact.num_blocks, "workers": num_workers, "prompt_tokens": context_len + 64,
            "decisions": num_decisions, "p50_ms": q(wall, 50), "p99_ms": q(wall, 99),
            "cpu_p50_ms": q(cpu, 50), "cpu_p99_ms": q(cpu, 99),
            "lookup_and_choice_p50_ms": q(lookup, 50), "lookup_and_choice_p99_ms": q(lookup, 99)}


# ---- report -------------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, Any]], title: str) -> None:
    names = list(results)
    rows: list[tuple[str, list[float], bool]] = []  # (label, values, lower is better)
    for metric, label in (("ttft_ms", "TTFT"), ("e2e_ms", "E2E")):
        for stat in ("mean", "p90", "p99"):
            rows.append((f"{label} {stat} ms", [results[n]["summary"][metric][stat] for n in names], True))
    rows.append(("prefix hit rate", [results[n]["summary"]["prefix_hit_rate"] for n in names], False))
    rows.append(("throughput req/s", [results[n]["summary"]["request_throughput"] for n in names], False))
    rows.append(("output tok/s", [results[n]["summary"]["output_throughput"] for n in names], False))
    ratios = [r for r in ("round_robin", "random") if r in results and "kv" in results]
    width = max(len(r[0]) for r in rows) + 2
    header = f"{'':<{width}}" + "".join(f"{n:>14}" for n in names) + "".join(f"{'kv/' + r:>16}" for r in ratios)
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for label, values, _ in rows:
        line = f"{label:<{width}}" + "".join(f"{serve._fmt(v):>14}" for v in values)
        for r in ratios:
            va, vb = values[names.index("kv")], values[names.index(r)]
            line += f"{va / vb:>16.2f}" if vb and not (math.isnan(va) or math.isnan(vb)) else f"{'-':>16}"
        print(line)
    for n in names:
        s = results[n]["summary"]
        errs = "; ".join(f"{k} x{v}" for k, v in s["errors"].items())
        print(f"[{n}] {s['num_ok']}/{s['num_sent']} ok, {s['duration_s']:.1f} s, mean ISL {s['mean_input_len']:.0f}, "
              f"mean OSL {s['mean_output_len']:.1f}" + (f"; errors: {errs}" if errs else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c = p.add_argument_group("cluster")
    c.add_argument("--engine", default="sim", choices=["sim", "torch", "both"],
                   help="both: the sim run as given, then the real model on TORCH_PRESET's workload")
    c.add_argument("--workers", type=int, default=16, help="decode workers")
    c.add_argument("--mode", default="aggregated", choices=["aggregated", "disaggregated"])
    c.add_argument("--prefill-workers", type=int, default=4, help="disaggregated mode")
    c.add_argument("--model", default="", help="empty: the default model (SmolLM2-135M; its tokenizer, vocab, KV size)")
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--threads", type=int, default=0, help="torch engine: CPU threads per worker (0: cores/workers)")
    c.add_argument("--kv-cache-gib", type=float, default=1.4,
                   help="KV budget per worker (the default model: 22.5 KiB a token in bf16; 1.4 GiB ~ 65k tokens)")
    c.add_argument("--max-num-batched-tokens", type=int, default=2048)
    c.add_argument("--max-local-prefill-tokens", type=int, default=256, help="disaggregated mode")
    c.add_argument("--prefill-load-scale", type=float, default=ClusterConfig.prefill_load_scale,
                   help="kv policy: weight of a prefill block against an active decode block (the cluster "
                        "default: router/policy.py says why). kv@1 (Dynamo's weight) runs as a column")
    c.add_argument("--router-temperature", type=float, default=ClusterConfig.router_temperature)
    c.add_argument("--sim-profile", default="h200-llama-3.1-8b")
    c.add_argument("--sim-time-scale", type=float, default=16.0,
                   help="multiply the profile's step times (a model this many times larger)")
    c.add_argument("--policies", default="kv,round_robin,random,least_loaded,kv@1",
                   type=lambda s: [x for x in s.split(",") if x],
                   help="policies to run in turn; kv@SCALE: kv with prefill_load_scale SCALE")
    c.add_argument("--rounds", type=int, default=2,
                   help="every policy runs once a round, the order rotated each round; the table averages rounds")
    c.add_argument("--log-dir", default=None)
    w = p.add_argument_group("workload")
    w.add_argument("--tenants", type=int, default=100)
    w.add_argument("--context", type=int, default=2048, help="tokens of each tenant's system context")
    w.add_argument("--users", type=int, default=4, help="conversations per tenant")
    w.add_argument("--user-len", type=int, default=64, help="mean tokens of a user message")
    w.add_argument("--osl", type=int, default=32, help="output tokens per request")
    w.add_argument("--turns", type=int, default=4, help="turns before a conversation restarts")
    w.add_argument("--num-requests", type=int, default=800)
    w.add_argument("--rate", type=float, default=22.0, help="Poisson arrivals, requests/s")
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--max-duration", type=float, default=600.0, help="time cap per policy, s")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None)
    o.add_argument("--only-decision-latency", action="store_true")
    o.add_argument("--decision-blocks", type=int, default=100_000)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [p for p in args.policies if p.partition("@")[0] not in POLICIES
               or (p.partition("@")[2] and p.partition("@")[0] != "kv")]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {POLICIES}, and kv@SCALE (kv, prefill_load_scale SCALE)")
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    if not args.only_decision_latency:
        if args.engine == "both":
            by_engine: dict[str, dict[str, Any]] = {}
            for engine in ("sim", "torch"):
                eng_args = argparse.Namespace(**{**vars(args), "engine": "sim"})
                if engine == "torch":
                    eng_args = argparse.Namespace(**{**vars(args), **TORCH_PRESET})
                by_engine[engine], _ = run_engine(eng_args)
            out["runs"] = by_engine
            print_side_by_side(by_engine)
        else:
            out["runs"], _ = run_engine(args)
    lat = decision_latency(num_blocks=args.decision_blocks)
    out["decision_latency"] = lat
    print(f"\nrouting decision (hash {lat['prompt_tokens']} prompt tokens, look up {lat['indexed_blocks']} indexed "
          f"(worker, block) pairs over {lat['workers']} workers, cost and choose), {lat['decisions']} decisions: "
          f"wall p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms; CPU time p50 {lat['cpu_p50_ms']:.3f} ms, "
          f"p99 {lat['cpu_p99_ms']:.3f} ms (wall, index + policy without hashing: "
          f"p50 {lat['lookup_and_choice_p50_ms']:.3f} ms, p99 {lat['lookup_and_choice_p99_ms']:.3f} ms)")
    print(f"machine load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        if "runs" in out:
            by_engine = out["runs"] if args.engine == "both" else {args.engine: out["runs"]}
            print(f"figure: {plots.policy_bars(by_engine, Path(args.json).with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
