"""The planner live, against its discrete-event replay: a time-compressed workload sent open loop
to a real cluster on this machine (etcd, router, sim-engine workers with the H200 timing model,
the local launcher) with the planner service acting on it, and the same workload through
``bench/planner.py``'s replay with the same planner settings. Shows whether the replay's numbers
hold on the real control loop (etcd watches, step summaries, start-up and switch times, drains).

    python bench/planner_live.py --shape burst --duration-s 240 --scale 0.04 --out-dir DIR
    python bench/planner_live.py --measure-switch --out-dir DIR    # a tier switch vs a new worker

Per run: SLO attainment (TTFT and the request's p99 gap between streamed chunks within the
targets; failed requests are bad), goodput per worker-hour, worker-hours, decisions and
reversals (a tier's replica count changing direction); JSON and a PNG timeline (arrivals,
replicas per tier, attainment per interval). Prompts are random token ids (no shared prefixes,
as the built-in shapes), answers run to their length (the sim never samples an end token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.planner import Bench, Run, attain_timeline, replay
from bench.planner_sim import Req, SimConfig, StepModel
from bench.planner_workload import SHAPES, Arrival, Workload, shape
from planner import Planner, Profile
from planner.decision import ActionKind

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "planner"
KIND = {1: ActionKind.START, 2: ActionKind.DRAIN, 3: ActionKind.SWITCH, 4: ActionKind.ABANDON}


def scaled(w: Workload, isl_scale: float, osl_scale: float) -> Workload:
    arrivals = [Arrival(a.t, max(1, round(a.isl * isl_scale)), max(2, round(a.osl * osl_scale)), a.hashes)
                for a in w.arrivals]
    return replace(w, arrivals=arrivals)


ERRORS: dict[str, int] = {}


def send(client, model: str, req: Req, t0: float, itl_s: float, seed: int) -> None:
    """One request, open loop at its arrival time; fills req's ttft, gaps and finish like the replay's."""
    rng = random.Random(seed)
    prompt = [rng.randrange(1000, 40000) for _ in range(req.arrival.isl)]
    delay = t0 + req.arrival.t - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    start = time.monotonic()
    last = None
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=req.arrival.osl, stream=True,
                                           temperature=0, stream_options={"include_usage": True})
        tokens = 0
        for chunk in stream:
            now = time.monotonic()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            if last is None:
                req.ttft = now - start
            else:
                req.n_over += (now - last) > itl_s
            last = now
        req.n_gaps = max(0, req.arrival.osl - 1)
        if tokens == req.arrival.osl:
            req.done_t = now - t0
        else:
            req.rejected = True
            ERRORS[f"{tokens} of {req.arrival.osl} tokens"] = ERRORS.get(f"{tokens} of {req.arrival.osl} tokens", 0) + 1
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:120]}"
        ERRORS[why] = ERRORS.get(why, 0) + 1
        req.rejected = True
        req.done_t = time.monotonic() - t0


def live(args: argparse.Namespace, w: Workload) -> tuple[Run, dict]:
    import openai

    from deploy.launcher import router_health
    from deploy.local_cluster import LocalCluster
    from deploy.local_launcher import LocalLauncher
    from deploy.planner_actuator import PlannerRunner
    from runtime import keys
    from runtime.etcd import ControlPlane
    from runtime.pb import tandem_control_pb2 as cpb
    from runtime.settings import ClusterConfig

    cfg = ClusterConfig(port=0, grpc_port=0, metrics_port=0, engine="sim", sim_profile=args.profile,
                        kv_cache_gib=args.kv_cache_gib, transport="tcp", lease_ttl_s=3, metrics_interval_s=1.0,
                        drain_timeout_s=120, ttft_slo_ms=args.ttft_ms, itl_slo_ms=args.itl_ms,
                        gpu_budget=args.budget, adjustment_interval_s=args.interval_s, planner_mode=args.mode,
                        planner_profile=args.planner_profile if args.mode != "load" else "", log_level="WARNING")
    p, d = args.initial
    cluster = LocalCluster(cfg, num_prefill=p, num_decode=d, quiet=True).start(300)
    runner = None
    stats: dict = {}
    try:
        runner = PlannerRunner(cluster.cfg, LocalLauncher.around(cluster)).start()
        client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = cluster.router["model"]
        reqs = [Req(i, a) for i, a in enumerate(w.arrivals)]
        t0 = time.monotonic() + 1.0
        threads = [threading.Thread(target=send, args=(client, model, r, t0, args.itl_ms / 1000, i), daemon=True)
                   for i, r in enumerate(reqs)]
        for t in threads:
            t.start()
        run = Run("planner-live", reqs, 0.0)
        gpu_s, last_t, interval = 0.0, t0, args.interval_s
        tick = t0
        while True:
            tick += interval
            time.sleep(max(0.0, tick - time.monotonic()))
            now = time.monotonic()
            health = router_health(cluster.http_url)
            live_workers = sum(1 for c in cluster.children if c.role and c.proc.poll() is None)
            gpu_s += live_workers * (now - last_t)
            last_t = now
            rel = now - t0
            arrived = sum(1 for r in reqs if rel - interval < r.arrival.t <= rel)
            run.timeline.append({"t": rel, "rate": arrived / interval, "prefill": health.get("prefill_workers", 0),
                                 "decode": health.get("decode_workers", 0), "gpus": live_workers})
            if rel <= w.duration_s:
                run.intervals += 1
            if (rel > w.duration_s and not any(t.is_alive() for t in threads)) or rel > w.duration_s + args.drain_s:
                break
        run.gpu_hours = gpu_s / 3600
        run.wall_s = time.monotonic() - t0

        async def history() -> list:
            async with ControlPlane.from_config(cluster.cfg) as plane:
                got = await plane.get_messages(keys.planner_history_prefix(cluster.cfg.namespace),
                                               cpb.PlannerDecision)
            return [got[k] for k in sorted(got)]

        decisions = asyncio.run(history())
        counts = dict(zip(("prefill", "decode"), args.initial))
        last_sign = {"prefill": 0, "decode": 0}
        for dec in decisions:
            changes = [a for a in dec.actions if KIND[a.kind] is not ActionKind.ABANDON]
            if not changes:
                continue
            run.decisions += 1
            moved = {"prefill": dec.num_prefill, "decode": dec.num_decode}
            for r in ("prefill", "decode"):
                sign = (moved[r] > counts[r]) - (moved[r] < counts[r])
                if sign and last_sign[r] and sign != last_sign[r]:
                    run.reversals += 1
                last_sign[r] = sign or last_sign[r]
            counts = moved
        stats["decisions"] = [{"seq": dec.seq, "actions": [f"{KIND[a.kind].value}:{a.role}:{a.worker_id}"
                                                           for a in dec.actions],
                               "reasons": [r.code + (f"[{r.role}]" if r.role else "") for r in dec.reasons],
                               "num_prefill": dec.num_prefill, "num_decode": dec.num_decode} for dec in decisions]
        stats["errors"] = dict(ERRORS)
        if runner.actuator is not None:
            stats["switch_call_ms"] = [s.call_ms for s in runner.actuator.switches]
        attain_timeline(run, args.ttft_ms / 1000, interval)
        return run, stats
    finally:
        if runner is not None:
            runner.stop()
        cluster.stop()


def measure_switch(args: argparse.Namespace) -> dict:
    """A tier switch against starting a new worker, on a sim cluster: ``--switches`` switches back
    and forth (the call, and until the router lists the worker in its new tier), then ``--starts``
    new decode workers started (until the router lists them) and drained."""
    import statistics

    from deploy.launcher import router_health
    from deploy.local_launcher import LocalLauncher
    from runtime.settings import ClusterConfig

    cfg = ClusterConfig(port=0, grpc_port=0, engine="sim", sim_profile=args.profile, kv_cache_gib=0.25,
                        transport="tcp", lease_ttl_s=3, log_level="WARNING")
    with LocalLauncher(cfg, quiet=True) as launcher:
        url = launcher.cluster.http_url
        name = launcher.workers("decode")[0].name
        launcher.start_services(["decode"])
        calls, listed, starts = [], [], []
        for i in range(args.switches):
            role = "prefill" if i % 2 == 0 else "decode"
            want = (2, 1) if role == "prefill" else (1, 2)
            t0 = time.perf_counter()
            result = launcher.switch_worker(name, role)
            while (h := router_health(url)) and (h.get("prefill_workers"), h.get("decode_workers")) != want:
                time.sleep(0.001)
            listed.append((time.perf_counter() - t0) * 1000)
            calls.append(result.call_ms)
        for _ in range(args.starts):
            t0 = time.perf_counter()
            (s,) = launcher.start_services(["decode"])
            starts.append(time.perf_counter() - t0)
            launcher.drain_services([s.name])
    out = {"switch_call_ms": calls, "switch_listed_ms": listed, "start_s": starts,
           "switch_listed_ms_median": statistics.median(listed), "switch_listed_ms_max": max(listed),
           "start_s_median": statistics.median(starts)}
    print(f"tier switch: {out['switch_listed_ms_median']:.1f} ms median to the router's listing (max "
          f"{out['switch_listed_ms_max']:.1f}, {len(listed)} switches; call {statistics.median(calls):.1f} ms); "
          f"a new sim worker: {out['start_s_median']:.2f} s median ({len(starts)} starts): "
          f"{out['start_s_median'] * 1000 / out['switch_listed_ms_median']:.0f}x")
    return out


def plot(runs: list[Run], w: Workload, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    base = runs[0].timeline
    axes[0].plot([r["t"] for r in base], [r["rate"] for r in base], color="black")
    axes[0].set_ylabel("arrivals / s")
    axes[0].set_title(f"{w.name}: the planner live vs its replay")
    for run in runs:
        ts = [r["t"] for r in run.timeline]
        axes[1].step(ts, [r["prefill"] for r in run.timeline], where="post", label=run.name)
        axes[2].step(ts, [r["decode"] for r in run.timeline], where="post", label=run.name)
        axes[3].plot(ts, [r["attainment"] if r.get("attainment") is not None else math.nan for r in run.timeline],
                     label=run.name)
    axes[1].set_ylabel("prefill workers")
    axes[2].set_ylabel("decode workers")
    axes[3].set_ylabel("attainment")
    axes[3].set_ylim(0, 1.05)
    axes[3].set_xlabel("seconds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="burst", choices=SHAPES)
    ap.add_argument("--duration-s", type=float, default=240.0)
    ap.add_argument("--scale", type=float, default=0.04, help="the shape's rate multiplier")
    ap.add_argument("--isl-scale", type=float, default=0.5, help="prompt lengths multiplier")
    ap.add_argument("--osl-scale", type=float, default=0.25, help="answer lengths multiplier")
    ap.add_argument("--profile", default="h200-llama-3.1-8b", help="sim timing profile of the workers and the replay")
    ap.add_argument("--planner-profile", default="h200-llama-3.1-8b")
    ap.add_argument("--mode", default="load", choices=("load", "throughput", "both"))
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--itl-ms", type=float, default=150.0)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--interval-s", type=float, default=5.0)
    ap.add_argument("--initial", type=int, nargs=2, default=(1, 1), metavar=("PREFILL", "DECODE"))
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--startup-s", type=float, default=4.0, help="the replay's worker start-up (a sim worker here)")
    ap.add_argument("--drain-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT))
    ap.add_argument("--measure-switch", action="store_true", help="only time tier switches against new workers")
    ap.add_argument("--switches", type=int, default=10)
    ap.add_argument("--starts", type=int, default=3)
    args = ap.parse_args(argv)
    if args.measure_switch:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "planner-switch.json").write_text(json.dumps(measure_switch(args), indent=1) + "\n")
        print(f"wrote {out / 'planner-switch.json'}")
        return
    from engine.sim import SimProfile
    from planner.service import planner_config
    from runtime.settings import ClusterConfig

    w = scaled(shape(args.shape, args.duration_s, args.scale, args.seed), args.isl_scale, args.osl_scale)
    cluster_cfg = ClusterConfig(ttft_slo_ms=args.ttft_ms, itl_slo_ms=args.itl_ms, gpu_budget=args.budget,
                                adjustment_interval_s=args.interval_s, planner_mode=args.mode)
    pcfg = planner_config(cluster_cfg, sum(args.initial))
    profile = Profile.load(args.planner_profile)
    sim = SimConfig(ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000, startup_s=args.startup_s, switch_s=0.02)
    bench = Bench(sim, StepModel(SimProfile.load(args.profile)), profile, pcfg, drain_s=args.drain_s)
    print(f"== {w.name}: {len(w.arrivals)} requests over {w.duration_s:.0f} s, budget {args.budget}, "
          f"TTFT <= {args.ttft_ms:g} ms, ITL <= {args.itl_ms:g} ms, {args.mode} mode every {args.interval_s:g} s")
    replayed = replay(bench, w, "planner-replay", tuple(args.initial),
                      Planner(pcfg, profile if args.mode != "load" else None))
    live_run, stats = live(args, w)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [live_run, replayed]
    summaries = [r.summary(args.ttft_ms / 1000) for r in runs]
    for s in summaries:
        print(f"{s['deployment']:<16} attainment {s['attainment']:.3f}  goodput/worker-h "
              f"{s['goodput_per_gpu_hour']:8.1f}  worker-h {s['gpu_hours']:.4f}  decisions {s['decisions']}  "
              f"reversals {s['reversals']}/{s['intervals']} intervals  rejected {s['rejected']} "
              f"unfinished {s['unfinished']}")
    report = {"workload": w.name, "requests": len(w.arrivals), "args": vars(args),
              "runs": [s | {"timeline": r.timeline} for s, r in zip(summaries, runs)], "live": stats}
    stem = out / f"planner-live-{w.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(runs, w, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
