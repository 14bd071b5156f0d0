"""``bench/serve.py --sweep`` (its default): aggregated vs 1 prefill + 1 decode worker vs the
engine's own ``LLM.generate``, on the same loads: each input length (``--isls``) at each
concurrency (``--concurrencies``), ``--osl`` output tokens, exact lengths, greedy, ignore_eos.

Per point: output tok/s, TTFT, ITL and first-to-second-token gap p50/p99 (client side), and for
1P+1D the KV handoff time p50/p99 (the decode worker's ``tandem_kv_handoff_seconds`` histogram:
transfer started to blocks landed, or for a handle sent ahead the prefill worker's write;
interpolated within its 25%-wide buckets) and recomputes. Each
cluster starts once and serves every point; ``LLM.generate`` runs in this process after both
clusters stopped, with ``max_num_seqs`` = the concurrency (its scheduler keeps that many in flight,
as the clients do). Then the issue's targets, checked. JSON + PNG under ``--out``.

    python bench/serve.py --device cuda --model dummy:llama-3.1-8b --out DIR
    python bench/serve.py --model dummy:smollm2-135m --isls 64,128 --concurrencies 1,4 --osl 8  # CPU dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from runtime.settings import ClusterConfig

HANDOFF = "tandem_kv_handoff_seconds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sweep (the default when no --target/--launch/--compare)")
    s.add_argument("--sweep", action="store_true", help="aggregated vs 1P+1D vs LLM.generate over ISL x concurrency")
    s.add_argument("--isls", default="1024,3000", help="input lengths, comma separated")
    s.add_argument("--concurrencies", default="1,16,64", help="concurrencies, comma separated")
    s.add_argument("--requests-per-user", type=int, default=2, help="requests per point: this x concurrency (>= 8)")
    s.add_argument("--skip", default="", help="comma list of sides to skip: aggregated, disaggregated, llm")
    s.add_argument("--out", default=None, help="write sweep.json and sweep.png here")


# ---- the clusters' side ----------------------------------------------------------------------------
def _histogram(text: str, name: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of a Prometheus histogram, per label set other than ``le``."""
    out: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}_bucket\{{(.*)\}}\s+([0-9.eE+-]+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        le = labels.pop("le")
        key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        out.setdefault(key, {})[math.inf if le == "+Inf" else float(le)] = float(m.group(2))
    return out


def histogram_quantiles(before: dict[float, float], after: dict[float, float], qs: tuple[int, ...]) -> dict[str, float]:
    """Quantiles (ms) of the observations between two scrapes, linear within a bucket."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    total = counts[-1] if counts else 0.0
    out: dict[str, float] = {"count": total}
    for q in qs:
        if total <= 0:
            out[f"p{q}"] = math.nan
            continue
        rank = total * q / 100
        lo_edge, lo_count = 0.0, 0.0
        for edge, count in zip(edges, counts):
            if count >= rank:
                hi = edge if edge != math.inf else lo_edge
                frac = (rank - lo_count) / (count - lo_count) if count > lo_count else 1.0
                out[f"p{q}"] = (lo_edge + (hi - lo_edge) * frac) * 1000
                break
            lo_edge, lo_count = edge, count
    return out


async def _scrape_text(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url, headers={"accept": "text/plain"})).text


def run_cluster_side(args: argparse.Namespace, mode: str, points: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Start one cluster (aggregated: 1 decode worker; disaggregated: 1P+1D), run every point."""
    from bench.serve import bench_endpoint, random_requests  # serve.py imports this module: no cycle at load
    from deploy.local_cluster import LocalCluster

    disagg = mode == "disaggregated"
    cfg = ClusterConfig(
        mode=mode, port=0, grpc_port=0, model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
        transport=args.transport, kv_transfer_mode=args.kv_transfer_mode,
        max_local_prefill_tokens=args.max_local_prefill_tokens, kv_cache_gib=args.kv_cache_gib,
        prefill_kv_cache_gib=args.prefill_kv_cache_gib,
        gpu_memory_fraction=args.gpu_memory_fraction if disagg else 0.0,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_share=args.gpu_share == "on", joining_prefill_tokens=args.joining_prefill_tokens)
    log_dir = Path(args.log_dir) / mode if args.log_dir else None
    label = "1P+1D" if disagg else "aggregated"
    print(f"[{label}] starting: {cfg.device}, {cfg.model or 'default model'}", file=sys.stderr, flush=True)
    cluster = LocalCluster(cfg, num_prefill=1 if disagg else 0, num_decode=1, log_dir=log_dir)
    results = []
    try:
        t0 = time.perf_counter()
        cluster.start(timeout_s=600)
        print(f"[{label}] ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        decode_metrics = cluster.workers("decode")[0].ready["metrics"]
        warmed: set[int] = set()
        for isl, conc in points:
            num = max(8, args.requests_per_user * conc)
            requests = random_requests(num, isl, 0.0, args.osl, 0.0, _token_range(args), args.seed + isl + conc)
            point_args = argparse.Namespace(**{**vars(args), "concurrency": conc, "rate": None, "isl": isl,
                                               "warmup": 0, "overhead_requests": 0})
            if isl not in warmed and args.warmup:  # compiles this length's kernels; not in the point's counts
                warm = random_requests(args.warmup, isl, 0.0, 4, 0.0, _token_range(args), args.seed + 1)
                asyncio.run(bench_endpoint(argparse.Namespace(**{**vars(point_args), "concurrency": 1}),
                                           cluster.http_url, f"{label} isl={isl} warm-up", warm, None, {}))
                warmed.add(isl)
            before = _histogram(asyncio.run(_scrape_text(decode_metrics)), HANDOFF)
            window = [time.monotonic_ns()]  # the point's requests in runtime.trace's clock
            out = asyncio.run(bench_endpoint(point_args, cluster.http_url, f"{label} isl={isl} c={conc}", requests,
                                             None, {"decode": decode_metrics}))
            window.append(time.monotonic_ns())
            after = _histogram(asyncio.run(_scrape_text(decode_metrics)), HANDOFF)
            handoff = {key: histogram_quantiles(before.get(key, {}), hist, (50, 99)) for key, hist in after.items()}
            out.pop("requests", None)
            results.append({"side": label, "isl": isl, "concurrency": conc, "summary": out["summary"],
                            "counters": out.get("counters", {}), "kv_handoff_ms": handoff,
                            "window_monotonic_ns": window})
            _print_point(results[-1])
    finally:
        cluster.stop()
    return results


def _token_range(args: argparse.Namespace) -> tuple[int, int]:
    lo, _, hi = args.token_range.partition(":")
    return int(lo), int(hi)


# ---- the engine alone ------------------------------------------------------------------------------
def run_llm_side(args: argparse.Namespace, points: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """``LLM.generate`` on the same requests, ``max_num_seqs`` = the concurrency."""
    import dataclasses

    from bench.serve import random_requests
    from engine.llm import LLM
    from protocol.sampling import SamplingParams

    print("[LLM.generate] loading", file=sys.stderr, flush=True)
    llm = LLM(args.model or "default", dtype=args.dtype, device=args.device,
              kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads or None, progress=False)
    scheduler = llm.engine.scheduler
    results = []
    warmed: set[int] = set()
    for isl, conc in points:
        num = max(8, args.requests_per_user * conc)
        requests = random_requests(num, isl, 0.0, args.osl, 0.0, _token_range(args), args.seed + isl + conc)
        scheduler.config = dataclasses.replace(scheduler.config, max_num_seqs=conc)
        if isl not in warmed:
            llm.generate([r.prompt_ids for r in requests[:2]], SamplingParams(max_tokens=4, temperature=0.0,
                                                                             ignore_eos=True))
            warmed.add(isl)
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in requests]
        t0 = time.perf_counter()
        outs = llm.generate([r.prompt_ids for r in requests], params)
        duration = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results.append({"side": "LLM.generate", "isl": isl, "concurrency": conc,
                        "summary": {"output_throughput": tokens / duration, "duration_s": duration,
                                    "num_ok": len(outs), "num_sent": len(requests)}})
        _print_point(results[-1])
    return results


# ---- report ----------------------------------------------------------------------------------------
def _get(r: dict[str, Any], *path: str) -> float:
    x: Any = r
    for k in path:
        if not isinstance(x, dict) or k not in x:
            return math.nan
        x = x[k]
    return float(x)


def _handoff(r: dict[str, Any], stat: str) -> float:
    vals = [h.get(stat, math.nan) for h in r.get("kv_handoff_ms", {}).values() if h.get("count")]
    return max(vals) if vals else math.nan


def _print_point(r: dict[str, Any]) -> None:
    s = r["summary"]
    line = (f"  {r['side']:<13} isl {r['isl']:>5} c {r['concurrency']:>3}: {s['output_throughput']:8.1f} tok/s"
            f" ({s.get('num_ok', 0)}/{s.get('num_sent', 0)} ok)")
    if "ttft_ms" in s:
        line += (f"  TTFT p50/p99 {_get(s, 'ttft_ms', 'p50'):.1f}/{_get(s, 'ttft_ms', 'p99'):.1f}"
                 f"  ITL {_get(s, 'itl_ms', 'p50'):.2f}/{_get(s, 'itl_ms', 'p99'):.2f}"
                 f"  gap {_get(s, 'second_token_gap_ms', 'p50'):.2f}/{_get(s, 'second_token_gap_ms', 'p99'):.2f} ms")
    if r.get("kv_handoff_ms"):
        line += f"  KV {_handoff(r, 'p50'):.2f}/{_handoff(r, 'p99'):.2f} ms"
        n = sum(v for k, v in r.get("counters", {}).items() if "pull_fallbacks" in k)
        line += f", {n:g} recomputed" if n else ""
    print(line, flush=True)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's serving targets, per point where they apply."""
    by = {(r["side"], r["isl"], r["concurrency"]): r for r in results}
    out = []
    for (side, isl, conc), r in sorted(by.items()):
        if side != "1P+1D":
            continue
        s = r["summary"]
        agg = by.get(("aggregated", isl, conc))
        if agg and conc in (16, 64):
            ratio = s["output_throughput"] / agg["summary"]["output_throughput"]
            out.append({"target": "1P+1D >= 0.9 x aggregated tok/s", "isl": isl, "concurrency": conc,
                        "value": ratio, "met": ratio >= 0.9})
        gap, itl = _get(s, "second_token_gap_ms", "p50"), _get(s, "itl_ms", "p50")
        out.append({"target": "gap p50 <= 2 x ITL p50", "isl": isl, "concurrency": conc,
                    "value": gap / itl if itl else math.nan, "met": gap <= 2 * itl})
        kv99, ttft50 = _handoff(r, "p99"), _get(s, "ttft_ms", "p50")
        out.append({"target": "KV transfer p99 < 0.05 x TTFT p50", "isl": isl, "concurrency": conc,
                    "value": kv99 / ttft50 if ttft50 else math.nan, "met": kv99 < 0.05 * ttft50})
    for (side, isl, conc), r in sorted(by.items()):
        llm = by.get(("LLM.generate", isl, conc))
        if side == "aggregated" and llm and conc == 64:
            ratio = r["summary"]["output_throughput"] / llm["summary"]["output_throughput"]
            out.append({"target": "aggregated >= 0.9 x LLM.generate tok/s", "isl": isl, "concurrency": conc,
                        "value": ratio, "met": ratio >= 0.9})
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    isls = sorted({r["isl"] for r in results})
    concs = sorted({r["concurrency"] for r in results})
    sides = [s for s in ("aggregated", "1P+1D", "LLM.generate") if any(r["side"] == s for r in results)]
    fig, axes = plt.subplots(2, len(isls), figsize=(6 * len(isls), 8), squeeze=False)
    width = 0.8 / len(sides)
    for col, isl in enumerate(isls):
        ax = axes[0][col]
        for k, side in enumerate(sides):
            vals = [next((r["summary"]["output_throughput"] for r in results
                          if (r["side"], r["isl"], r["concurrency"]) == (side, isl, c)), 0.0) for c in concs]
            ax.bar(np.arange(len(concs)) + k * width, vals, width, label=side)
        ax.set_xticks(np.arange(len(concs)) + width * (len(sides) - 1) / 2, [f"c={c}" for c in concs])
        ax.set_title(f"output tok/s, ISL {isl}")
        ax.legend()
        ax = axes[1][col]
        for side, metric, style in (("aggregated", "itl_ms", "o-"), ("1P+1D", "itl_ms", "s-"),
                                    ("aggregated", "second_token_gap_ms", "o--"),
                                    ("1P+1D", "second_token_gap_ms", "s--")):
            vals = [next((_get(r["summary"], metric, "p50") for r in results
                          if (r["side"], r["isl"], r["concurrency"]) == (side, isl, c)), math.nan) for c in concs]
            ax.plot(concs, vals, style, label=f"{side} {metric.removesuffix('_ms')} p50")
        kv = [next((_handoff(r, "p50") for r in results
                    if (r["side"], r["isl"], r["concurrency"]) == ("1P+1D", isl, c)), math.nan) for c in concs]
        ax.plot(concs, kv, "^:", label="1P+1D KV handoff p50")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    isls = [int(x) for x in args.isls.split(",") if x]
    concs = [int(x) for x in args.concurrencies.split(",") if x]
    points = [(isl, c) for isl in isls for c in concs]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else None
    for side in ("aggregated", "disaggregated", "llm"):
        if side in skip:
            continue
        results += run_llm_side(args, points) if side == "llm" else run_cluster_side(args, side, points)
        if out is not None:  # so far, in case a later side does not finish
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1,
                                                       default=str))
    checks = targets(results)
    print("\ntargets:")
    for c in checks:
        print(f"  {'MET ' if c['met'] else 'MISS'} {c['target']:<40} isl {c['isl']:>5} c {c['concurrency']:>3}: "
              f"{c['value']:.3f}")
    if out is not None:
        (out / "sweep.json").write_text(json.dumps({"args": vars(args), "results": results, "targets": checks},
                                                   indent=1, default=str))
        plot(results, out / "sweep.png")
        print(f"results written to {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0 if all(r["summary"].get("num_ok") for r in results) else 1
