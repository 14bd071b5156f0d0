"""Planner benchmark, the discrete-event replay: the real planner core (``planner.core.Planner``)
and the sim engine's fitted timing model in one process, an hour of traffic in minutes.

For one GPU budget it compares a static deployment sized for the peak, the best fixed
prefill/decode split (a sweep of every split of the budget) and the planner in each mode, and
prints per run: SLO attainment (good: TTFT and the request's p99 inter-token gap within the
targets; rejected or unfinished requests are bad), goodput per GPU-hour, GPU-hours, decisions and
reversals. Writes JSON and a PNG timeline (load, replicas per tier, attainment) per workload.

    python bench/planner.py --trace ../shared/data/mooncake_synthetic_trace.jsonl
    python bench/planner.py --shape sinusoid --shape burst      # built-in shapes (default: all)
    python bench/planner.py --shape flat --duration-s 1800 --modes both
    python bench/planner.py --trace T.jsonl --first-token-hold off --seed 1   # the router's hold; tie-breaks
    python bench/planner.py --shape burst --warm-pool 14 --wake-s 5   # each mode without, then with parked workers
    python bench/planner.py --shape burst --seats-full recompute   # add_prefilled as before: recompute, no seat

What the replay models and what it leaves out: ``bench/planner_sim.py``'s docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.planner_sim import Req, SimConfig, Simulation, StepModel, handoff_bound, router_window
from bench.planner_workload import SHAPES, TRACE_BLOCK_TOKENS, Workload, load_trace, shape
from planner import ActionKind, Observation, Planner, PlannerConfig, Profile, WorkerState
from planner.core import after, load_order
from planner.decision import Action, Decision
from planner.observations import RouterWindow, Traffic
from planner.throughput import ThroughputModel

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "planner"


@dataclass
class Run:
    name: str
    requests: list[Req]
    gpu_hours: float
    timeline: list[dict] = field(default_factory=list)
    decisions: int = 0
    reversals: int = 0
    intervals: int = 0
    wall_s: float = 0.0
    to_minimums_intervals: float | None = None
    stopped: bool = False  # given up early: its attainment was certain to end below a bound
    num_woken: int = 0  # starts a parked worker served (the warm pool)
    num_parked: int = 0  # drained workers that parked

    def summary(self, ttft_s: float) -> dict:
        n = len(self.requests)
        good = sum(r.good(ttft_s) for r in self.requests)
        finished = [r for r in self.requests if r.finished and not r.rejected]
        infeasible = sum(r.infeasible for r in self.requests)
        return {"deployment": self.name, "requests": n, "good": good, "attainment": good / n if n else math.nan,
                # counted bad above; the ceiling is the attainment no deployment can pass
                "infeasible": infeasible, "feasible_ceiling": 1 - infeasible / n if n else math.nan,
                "attainment_of_feasible": sum(r.good(ttft_s) for r in self.requests if not r.infeasible)
                / (n - infeasible) if n > infeasible else math.nan,
                "rejected": sum(r.rejected for r in self.requests),
                "unfinished": sum(not r.finished for r in self.requests),
                "ttft_miss": sum(r.ttft > ttft_s for r in finished),
                "itl_miss": sum(r.ttft <= ttft_s and not r.good(ttft_s) for r in finished),
                "gpu_hours": self.gpu_hours, "goodput_per_gpu_hour": good / self.gpu_hours if self.gpu_hours else 0.0,
                "decisions": self.decisions, "reversals": self.reversals, "intervals": self.intervals,
                "reversals_per_10_intervals": 10 * self.reversals / max(self.intervals, 1),
                "to_minimums_intervals": self.to_minimums_intervals, "num_woken": self.num_woken,
                "num_parked": self.num_parked, "wall_s": round(self.wall_s, 1)}


@dataclass(frozen=True)
class Bench:
    sim: SimConfig
    model: StepModel
    profile: Profile
    planner: PlannerConfig
    drain_s: float = 600.0  # after the last arrival: how long unfinished requests may take
    # clients ask for max_tokens = the answer they will get: the routers' requested tokens give the
    # arrivals' answer length at arrival (the live view's early OSL at its best); False: not known
    max_tokens_exact: bool = False


def clamp(bench: Bench, p: int, d: int) -> tuple[int, int]:
    """Replicas within the budget, shared in proportion when they are not."""
    cfg, room = bench.planner, bench.planner.max_workers
    if p + d > room:
        p = min(max(round(room * p / (p + d)), cfg.min_prefill), room - cfg.min_decode)
        d = room - p
    return p, d


def sized(bench: Bench, rate: float, isl: float, isl_p95: float, osl: float, hit: float,
          within_budget: bool = True) -> tuple[int, int]:
    """The throughput mode's sizing for a known load (static deployments: each tier for its own
    peak), within the budget unless ``within_budget`` is False."""
    cfg = replace(bench.planner, predictor="constant")
    model = ThroughputModel(cfg, bench.profile)
    model.observe(Traffic(window_s=1.0, num_arrivals=0, num_finished=1, isl_mean=isl, isl_p95=isl_p95,
                          osl_mean=osl), [])
    model.rate.observe(rate)
    model.hit_rate.observe(hit)
    p, d, _ = model.targets({"prefill": 0, "decode": 0})
    return clamp(bench, p, d) if within_budget else (p, d)


def interval_loads(w: Workload, interval_s: float) -> list[tuple[float, float, float, float]]:
    """(rate, mean ISL, 95th percentile ISL, mean OSL) per interval of the workload."""
    n = max(1, math.ceil(w.duration_s / interval_s))
    buckets: list[list] = [[] for _ in range(n)]
    for a in w.arrivals:
        buckets[min(n - 1, int(a.t // interval_s))].append(a)
    out = []
    for b in buckets:
        isl = sorted(a.isl for a in b)
        out.append((len(b) / interval_s, sum(isl) / len(b) if b else 0.0,
                    float(isl[min(len(isl) - 1, math.ceil(0.95 * len(isl)) - 1)]) if b else 0.0,
                    sum(a.osl for a in b) / len(b) if b else 0.0))
    return out


def whole_worker_bound(bench: Bench, w: Workload) -> dict:
    """The goodput per GPU-hour a deployment could reach against the static peak with whole workers:
    each interval it holds exactly the workers the static's own rule (:func:`sized`, in the budget)
    gives that interval's load, from the interval's first instant (no start-up, no drain, no idle
    spare), and serves as many requests well as the static peak does. Its ratio to the static peak's
    goodput per GPU-hour is then the static's GPU-hours over its own: the most a planner that scales
    whole workers by that rule can gain (fractional workers would gain more)."""
    interval = bench.planner.adjustment_interval_s
    loads = interval_loads(w, interval)
    per_interval = [sized(bench, *x, 0.0) if x[0] > 0 else (0, 0) for x in loads]
    n_static = sum(clamp(bench, max(p for p, _ in per_interval), max(d for _, d in per_interval)))
    floor = bench.planner.min_prefill + bench.planner.min_decode
    worker_intervals = sum(max(p + d, floor) for p, d in per_interval)
    static_s, bound_s = n_static * len(loads) * interval, worker_intervals * interval
    return {"intervals": len(loads), "interval_s": interval, "static_workers": n_static,
            "mean_workers": worker_intervals / len(loads), "static_gpu_hours": static_s / 3600,
            "bound_gpu_hours": bound_s / 3600, "goodput_per_gpu_hour_x_static": static_s / bound_s}


def prefix_hit_rate(w: Workload) -> float:
    """Prompt tokens in blocks an earlier request already had (a cache that forgets nothing)."""
    seen: set[int] = set()
    hit = total = 0
    for a in w.arrivals:
        total += a.isl
        for h in a.hashes:
            if h in seen:
                hit += TRACE_BLOCK_TOKENS
            else:
                break
        seen.update(a.hashes)
    return min(1.0, hit / total) if total else 0.0


def prefill_alone_s(model: StepModel, new_tokens: int, cached: int, budget: int) -> float:
    """Time one idle GPU takes to compute ``new_tokens`` prompt tokens after ``cached`` cached ones,
    in chunks of ``budget`` tokens (the scheduler's chunked prefill)."""
    t, done = 0.0, 0
    while done < new_tokens:
        take = min(budget, new_tokens - done)
        t += model.time([(take, cached + done)], 0, 0)
        done += take
    return t


def infeasible(bench: Bench, w: Workload) -> list[str]:
    """Per request, what keeps it from its targets whatever the deployment ('' when nothing does):

    - ``ttft``: computing the part of its prompt that no earlier request shares (the prefix blocks
      a cache that forgets nothing would hold) takes one idle GPU longer than the TTFT target: no
      deployment serves it in time (a lower bound: an idle cluster, a perfect cache);
    - ``handoff``: handed off, its second token waits at least for the decode worker's pull of the
      prompt's KV (``kv_latency_s`` + prompt bytes at ``kv_gbps``) and one decode step of that
      sequence alone, over the ITL target, its answer is too short for the 99th percentile of its
      gaps to leave that one out (fewer than 101 gaps), and the router's first-token hold does not
      absorb the gap (``first_token_hold`` off, or the gap does not fit in the TTFT left after that
      idle prefill): ``bench.planner_sim.handoff_bound``. Only a prefill on its decode worker (the
      router's spill when the prefill tier is saturated) serves it: not infeasible, but out of reach
      of a disaggregated path."""
    seen: set[int] = set()
    out = []
    cfg = bench.sim
    for a in w.arrivals:
        hits = 0
        for h in a.hashes:
            if h not in seen or (hits + 1) * TRACE_BLOCK_TOKENS > a.isl:
                break
            hits += 1
        cached = min(hits * TRACE_BLOCK_TOKENS, a.isl - 1)
        seen.update(a.hashes)
        prefill_s = prefill_alone_s(bench.model, a.isl - cached, cached, cfg.max_num_batched_tokens)
        gap_s = cfg.kv_latency_s + a.isl * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9) \
            + bench.model.time([], 1, a.isl + 1)
        if prefill_s > cfg.ttft_s:
            out.append("ttft")
        elif handoff_bound(cfg, gap_s, a.osl - 1, prefill_s):
            out.append("handoff")
        else:
            out.append("")
    return out


def replay(bench: Bench, w: Workload, name: str, initial: tuple[int, int], planner: Planner | Oracle | None,
           stop_below: float = 0.0, lost: list[bool] | None = None) -> Run:
    """One deployment over the workload. ``stop_below``: give up as soon as the attainment is
    certain to end below it (requests already bad: finished bad, or past the TTFT target without
    a first token); the run is then marked ``stopped`` (the split sweep prunes with it)."""
    t_wall = time.perf_counter()
    sim = Simulation(bench.sim, bench.model)
    for role, n in zip(("prefill", "decode"), initial):
        for _ in range(n):
            sim.add_worker(role, 0.0)
    requests = [Req(i, a, infeasible=bool(lost and lost[i])) for i, a in enumerate(w.arrivals)]
    for r in requests:
        sim.push(r.arrival.t, "arrive", r)
    interval = bench.planner.adjustment_interval_s
    run = Run(name, requests, 0.0)
    last_sign = {"prefill": 0, "decode": 0}
    arrived_upto = 0
    bad_finished = 0
    no_first_token: list[Req] = []
    t = 0.0
    end = w.duration_s + bench.drain_s
    fast = bench.planner.fast_interval_s if planner is not None and hasattr(planner, "react") else 0.0
    fast_actions: list[str] = []

    def account(decision: Decision, workers: tuple) -> list[Action]:
        counts = {r: sum(1 for x in workers if x.role == r and x.state in (WorkerState.READY, WorkerState.STARTING))
                  for r in ("prefill", "decode")}
        changes = [a for a in decision.actions if a.kind is not ActionKind.ABANDON]
        if changes:
            run.decisions += 1
            moved = after(counts, changes)
            for r in ("prefill", "decode"):
                sign = (moved[r] > counts[r]) - (moved[r] < counts[r])
                if sign and last_sign[r] and sign != last_sign[r]:
                    run.reversals += 1
                last_sign[r] = sign or last_sign[r]
        return changes

    while t < end and (t < w.duration_s or sim.num_inflight > 0 or sim.events):
        if fast > 0:  # the fast checks between the ticks: the workers' windows keep running
            seen_arrivals, seen_done, tick_t = arrived_upto, len(sim.done_window), t
            k = 1
            while k * fast < interval - 1e-9:
                tf = tick_t + k * fast
                sim.run_until(tf)
                n_seen = seen_arrivals
                while n_seen < len(requests) and requests[n_seen].arrival.t <= tf:
                    n_seen += 1
                window = live_window(requests[seen_arrivals:n_seen],
                                     [r for r in sim.done_window[seen_done:] if not r.rejected], fast,
                                     sim.num_inflight, bench.max_tokens_exact)
                seen_arrivals, seen_done = n_seen, len(sim.done_window)
                workers = tuple(x.observe(tf, tf - tick_t, reset=False) for x in sim.workers.values())
                parked = sum(1 for ready_at in sim.parked if ready_at <= tf)
                decision = planner.react(Observation(tf, workers, (window,), num_parked=parked))
                changes = account(decision, workers)
                if changes:
                    fast_actions += [f"{tf:g}:{a.kind.value}:{a.role}" for a in changes]
                    fast_actions += [f"{tf:g}:{x}" for x in decision.reasons]
                    apply(sim, decision.actions, tf)
                k += 1
        t += interval
        sim.run_until(t)
        n_arr, first = 0, arrived_upto
        while arrived_upto < len(requests) and requests[arrived_upto].arrival.t <= t:
            no_first_token.append(requests[arrived_upto])
            arrived_upto += 1
            n_arr += 1
        done, sim.done_window = sim.done_window, []
        if stop_below > 0:
            bad_finished += sum(not r.good(bench.sim.ttft_s) for r in done)
            no_first_token = [r for r in no_first_token if math.isnan(r.ttft) and not r.finished]
            late = sum(1 for r in no_first_token if t - r.arrival.t > bench.sim.ttft_s)
            if 1 - (bad_finished + late) / len(requests) < stop_below:
                run.stopped = True
                break
        workers = tuple(x.observe(t, interval) for x in sim.workers.values())
        row = {"t": t, "rate": n_arr / interval,
               **{r: sum(1 for x in workers if x.role == r and x.state is WorkerState.READY)
                  for r in ("prefill", "decode")},
               "gpus": len(workers)}
        if planner is not None and t <= w.duration_s + bench.drain_s:
            window = live_window(requests[first:arrived_upto], [r for r in done if not r.rejected], interval,
                                 sim.num_inflight, bench.max_tokens_exact)
            parked = sum(1 for ready_at in sim.parked if ready_at <= t)
            decision = planner.tick(Observation(t, workers, (window,), num_parked=parked))
            changes = account(decision, workers)
            if fast_actions:
                row["fast_actions"], fast_actions = fast_actions, []
            if changes:
                row["actions"] = [f"{a.kind.value}:{a.role}:{a.worker_id}" for a in changes]
                row["reasons"] = [str(x) for x in decision.reasons]
            apply(sim, decision.actions, t)
        run.timeline.append(row)
        if t <= w.duration_s:
            run.intervals += 1
    run.gpu_hours = sim.gpu_seconds(t) / 3600
    run.num_woken, run.num_parked = sim.num_woken, sim.num_parked
    run.wall_s = time.perf_counter() - t_wall
    attain_timeline(run, bench.sim.ttft_s, interval)
    if w.stop_s is not None:
        run.to_minimums_intervals = back_to_minimums(run, w.stop_s, bench.planner, interval)
    return run


def live_window(arrived: list[Req], done: list[Req], interval: float, inflight: int, max_tokens_exact: bool = False
                ) -> RouterWindow:
    """The interval's router window as the live planner's view builds it (``planner/view.py``):
    the mean prompt length of the arrivals (the routers count prompt tokens at arrival), its
    percentiles keeping the finished requests' ratio to their mean; answer lengths and latencies
    of the finished requests, or (``max_tokens_exact``: each request asked for exactly the answer
    it gets, so the view's early OSL is the arrivals' mean answer) the arrivals' mean answer length
    when longer."""
    window = router_window(len(arrived), done, interval, inflight)
    if not arrived:
        return window
    isl = sum(r.arrival.isl for r in arrived) / len(arrived)
    ratio = isl / window.isl_mean if window.isl_mean > 0 else math.nan
    window = replace(window, isl_mean=isl, isl_p50=window.isl_p50 * ratio, isl_p95=window.isl_p95 * ratio)
    early = sum(r.arrival.osl for r in arrived) / len(arrived)
    if not max_tokens_exact or early <= window.osl_mean:
        return window
    ratio = early / window.osl_mean if window.osl_mean > 0 else math.nan
    return replace(window, osl_mean=early, osl_p50=window.osl_p50 * ratio if ratio == ratio else early,
                   osl_p95=window.osl_p95 * ratio if ratio == ratio else early)


def apply(sim: Simulation, actions: tuple, now: float) -> None:
    for a in actions:
        worker = sim.workers.get(a.worker_id) if a.worker_id else None
        if a.kind is ActionKind.START:
            sim.add_worker(a.role, now, ready=False)
        elif worker is None:
            continue
        elif a.kind is ActionKind.ABANDON:
            del sim.workers[worker.id]
            sim.released.append((worker.gpu_since, now))
        elif a.kind is ActionKind.DRAIN:
            worker.state, worker.since = WorkerState.DRAINING, now
            sim.maybe_release(worker, now)
        elif a.kind is ActionKind.SWITCH:
            worker.state, worker.since, worker.switch_to = WorkerState.SWITCHING, now, a.role
            sim.maybe_release(worker, now)


def attain_timeline(run: Run, ttft_s: float, interval: float) -> None:
    """Attainment of the requests that arrived in each interval."""
    good: dict[int, list[int]] = {}
    for r in run.requests:
        g = good.setdefault(int(r.arrival.t // interval), [0, 0])
        g[0] += r.good(ttft_s)
        g[1] += 1
    for i, row in enumerate(run.timeline):
        g = good.get(i)
        row["attainment"] = g[0] / g[1] if g and g[1] else None


def back_to_minimums(run: Run, stop_s: float, cfg: PlannerConfig, interval: float) -> float | None:
    """Intervals from the stop to the first tick that shows only the minimums serving."""
    for row in run.timeline:
        if row["t"] >= stop_s and row["prefill"] <= cfg.min_prefill and row["decode"] <= cfg.min_decode \
                and row["gpus"] <= cfg.min_prefill + cfg.min_decode:
            return (row["t"] - stop_s) / interval
    return None


def run_all(bench: Bench, w: Workload, modes: list[str], sweep: bool, log=print) -> list[Run]:
    interval = bench.planner.adjustment_interval_s
    loads = interval_loads(w, interval)
    hit = 0.0  # sized as an operator would, not counting on the prefix cache (prefix_hit_rate(w) is its ideal)
    runs = []
    why = infeasible(bench, w)
    lost = [x == "ttft" for x in why]
    if any(why):
        n_ttft, n_handoff = why.count("ttft"), why.count("handoff")
        log(f"infeasible {n_ttft} of {len(why)} requests (an idle GPU computes their uncached prompt in more than "
            f"the TTFT target): attainment ceiling {1 - n_ttft / len(why):.4f}; handoff-bound {n_handoff} (the KV "
            f"pull at {bench.sim.kv_gbps:g} GB/s and one step put their second token over the ITL target, with no "
            f"gap to spare, and the first-token hold ({bench.sim.first_token_hold}) cannot absorb it: only a "
            f"prefill on the decode worker serves them): the ceiling of a path that hands every prompt off "
            f"{1 - (n_ttft + n_handoff) / len(why):.4f}")
    pool = bench.sim.warm_pool
    bench = replace(bench, sim=replace(bench.sim, warm_pool=0))  # fixed deployments never start a worker
    per_interval = [sized(bench, *x, hit, within_budget=False) for x in loads if x[0] > 0]
    peak = max(p for p, _ in per_interval), max(d for _, d in per_interval)
    static = clamp(bench, *peak)
    if static != peak:
        log(f"static-peak: each tier's peak needs {peak[0]}P+{peak[1]}D = {sum(peak)} workers, over the budget's "
            f"{bench.planner.max_workers}: no fixed split serves every interval (the largest one interval needs: "
            f"{max(p + d for p, d in per_interval)}); shared in proportion")
    runs.append(replay(bench, w, f"static-peak {static[0]}P+{static[1]}D", static, None, lost=lost))
    log(line(runs[-1], bench))
    if sweep:
        best = best_split(bench, w, round(bench.planner.max_workers * static[0] / sum(static)), lost)
        runs.append(best)
        log(line(best, bench))
    first = loads[0] if loads[0][0] > 0 else next((x for x in loads if x[0] > 0), loads[0])
    start = sized(bench, *first, hit)
    for mode in modes:
        for n in dict.fromkeys((0, pool)):  # with a warm pool: each mode without it, then with it
            run_bench = replace(bench, sim=replace(bench.sim, warm_pool=n))
            cfg = replace(bench.planner, mode=mode) if mode != "oracle" else bench.planner
            planner = Oracle(run_bench, w) if mode == "oracle" else Planner(cfg, bench.profile)
            name = (f"planner-{mode}" if mode != "oracle" else "oracle-at-the-step") + (f"+pool{n}" if n else "")
            runs.append(replay(run_bench, w, name, start, planner, lost=lost))
            log(line(runs[-1], run_bench))
    return runs


class Oracle:
    """The burst's ceiling without idle spare capacity: at each tick it knows the load of the
    interval that starts then (rate, lengths: the workload's own, no forecast error) and sizes
    each tier by the static rule (:func:`sized`) for the largest of it and the intervals of the
    last start-up and tick (so that a sample's noise does not drain a worker it needs again): it
    scales at the step instant, not before, and its new workers still take the start-up to
    serve. Stands in for the planner in :func:`replay` (starts and drains only; the least loaded
    ready worker leaves first)."""

    def __init__(self, bench: Bench, w: Workload) -> None:
        self.bench = bench
        self.interval = bench.planner.adjustment_interval_s
        cfg = bench.planner
        each = [sized(bench, *x, 0.0) if x[0] > 0 else (cfg.min_prefill, cfg.min_decode)
                for x in interval_loads(w, self.interval)]
        h = cfg.horizon_intervals
        self.sizes = [tuple(max(s[k] for s in each[max(0, i - h):i + 1]) for k in (0, 1)) for i in range(len(each))]

    def tick(self, obs: Observation) -> Decision:
        i = min(len(self.sizes) - 1, int(obs.now_s // self.interval + 1e-9))
        want = dict(zip(("prefill", "decode"), self.sizes[i]))
        actions = []
        for role in ("prefill", "decode"):
            live = [x for x in obs.workers if x.role == role and x.state in (WorkerState.READY, WorkerState.STARTING)]
            actions += [Action(ActionKind.START, role) for _ in range(want[role] - len(live))]
            ready = sorted((x for x in live if x.state is WorkerState.READY), key=load_order)
            actions += [Action(ActionKind.DRAIN, role, x.worker_id) for x in ready[:max(0, len(live) - want[role])]]
        return Decision(obs.now_s, "oracle", want["prefill"], want["decode"], tuple(actions))


def best_split(bench: Bench, w: Workload, first: int, lost: list[bool] | None = None) -> Run:
    """The fixed prefill/decode split of the whole budget with the best attainment (then goodput):
    ``first`` (a guess), every third split, then the neighbours of the best (attainment is unimodal
    in the split). A split is given up once it is certain to end below the best so far."""
    room = bench.planner.max_workers
    tried: dict[int, Run] = {}

    def score(p: int) -> tuple[float, float]:
        if p not in tried:
            best = max((score(q)[0] for q in tried), default=0.0)
            tried[p] = replay(bench, w, f"fixed {p}P+{room - p}D", (p, room - p), None, stop_below=best, lost=lost)
        if tried[p].stopped:
            return -1.0, 0.0
        s = tried[p].summary(bench.sim.ttft_s)
        return s["attainment"], s["goodput_per_gpu_hour"]

    for p in [min(max(first, 1), room - 1), *sorted({*range(1, room, 3), room - 1})]:
        score(p)
    best = max(tried, key=score)
    for p in (best - 2, best - 1, best + 1, best + 2):
        if 1 <= p < room:
            score(p)
    best = max(tried, key=score)
    run = tried[best]
    pruned = sum(r.stopped for r in tried.values())
    run.name = f"best-fixed {best}P+{room - best}D ({len(tried)} tried, {pruned} pruned)"
    return run


def line(run: Run, bench: Bench) -> str:
    s = run.summary(bench.sim.ttft_s)
    extra = f" back-to-min={s['to_minimums_intervals']}" if s["to_minimums_intervals"] is not None else ""
    if s["num_woken"] or s["num_parked"]:
        extra += f" woken {s['num_woken']} parked {s['num_parked']}"
    if s["infeasible"]:
        extra += f" of-feasible {s['attainment_of_feasible']:.4f}"
    return (f"attainment {s['attainment']:.4f}  {s['deployment']:<26} goodput/GPU-h {s['goodput_per_gpu_hour']:9.1f}"
            f"  GPU-h {s['gpu_hours']:6.2f}  decisions {s['decisions']:3d}  reversals {s['reversals']:2d}"
            f"/{s['intervals']} intervals  ttft-miss {s['ttft_miss']} itl-miss {s['itl_miss']}"
            f" rejected {s['rejected']} unfinished {s['unfinished']}{extra}  ({s['wall_s']} s)")


def plot(runs: list[Run], w: Workload, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    base = runs[0].timeline
    axes[0].plot([r["t"] / 60 for r in base], [r["rate"] for r in base], color="black")
    axes[0].set_ylabel("arrivals / s")
    axes[0].set_title(f"{w.name}: load, replicas per tier, attainment per interval")
    for run in runs:
        ts = [r["t"] / 60 for r in run.timeline]
        style = "--" if not run.name.startswith("planner") else "-"
        axes[1].step(ts, [r["prefill"] for r in run.timeline], style, where="post", label=run.name)
        axes[2].step(ts, [r["decode"] for r in run.timeline], style, where="post", label=run.name)
        axes[3].plot(ts, [r["attainment"] if r["attainment"] is not None else math.nan for r in run.timeline],
                     style, label=run.name)
    axes[1].set_ylabel("prefill workers")
    axes[2].set_ylabel("decode workers")
    axes[3].set_ylabel("attainment")
    axes[3].set_ylim(0, 1.05)
    axes[3].set_xlabel("minutes")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_bench(args: argparse.Namespace) -> Bench:
    from engine.sim import SimProfile  # the sim engine's fitted timing model (imports torch)

    profile = Profile.load(args.planner_profile or args.profile)
    sim = SimConfig(ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000, max_num_batched_tokens=
                    profile.max_num_batched_tokens, max_num_seqs=profile.max_num_seqs,
                    kv_capacity_tokens=profile.kv_capacity_tokens, kv_gbps=args.kv_gbps,
                    prefill_queue_limit_tokens=args.prefill_queue_limit_tokens,
                    startup_s=args.startup_s, switch_s=args.switch_s, first_token_hold=args.first_token_hold,
                    seed=args.seed, warm_pool=args.warm_pool, wake_s=args.wake_s, park_s=args.park_s,
                    seats_full=args.seats_full)
    sim = replace(sim, host_kv_gb=args.host_kv_gb, host_gbps=args.host_gbps,
                  host_overlap_weight=args.host_overlap_weight, cache_evicts_tail_first=args.cache_evicts_tail_first,
                  host_offload_charged=not args.host_offload_free, spill_idle_only=args.spill_idle_only)
    planner = PlannerConfig(ttft_slo_ms=args.ttft_ms, itl_slo_ms=args.itl_ms, gpu_budget=args.budget,
                            adjustment_interval_s=args.interval_s, grace_s=args.interval_s,
                            predictor=args.predictor, start_timeout_s=max(300.0, 3 * args.startup_s),
                            horizon_s=args.startup_s + args.interval_s, fast_interval_s=args.fast_s,
                            wake_s=0.0 if args.planner_ignores_pool else args.wake_s)
    return Bench(sim, StepModel(SimProfile.load(args.profile)), profile, planner,
                 max_tokens_exact=args.max_tokens_exact)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", action="append", default=[], help="Mooncake-format JSONL trace (repeatable)")
    ap.add_argument("--shape", action="append", default=[], choices=SHAPES, help="built-in shape (repeatable)")
    ap.add_argument("--profile", default="h200-llama-3.1-8b", help="sim timing profile (engine/sim_profiles)")
    ap.add_argument("--planner-profile", default="", help="planner profile (planner/profiles; default: --profile)")
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--itl-ms", type=float, default=50.0)
    ap.add_argument("--budget", type=int, default=16, help="GPU budget")
    ap.add_argument("--interval-s", type=float, default=20.0, help="planner adjustment interval")
    ap.add_argument("--fast-s", type=float, default=5.0,
                    help="the planner's fast check between ticks (Planner.react: starts on a breach coming), this "
                         "often; 0: none (the oracle has none)")
    ap.add_argument("--startup-s", type=float, default=60.0, help="a new worker's start-up delay")
    ap.add_argument("--switch-s", type=float, default=2.0, help="a tier switch's delay after its drain")
    ap.add_argument("--warm-pool", type=int, default=0,
                    help="parked workers the launcher keeps (full at the start): a start takes one, ready after "
                         "--wake-s; each planner mode then runs without the pool and with it (name +poolN)")
    ap.add_argument("--wake-s", type=float, default=5.0, help="a parked worker's start (weights host->GPU, KV, "
                    "graphs, registration; 3.4-4.9 s measured on an H200)")
    ap.add_argument("--planner-ignores-pool", action="store_true",
                    help="the planner is not told of the parked workers (its forecast horizon stays a start-up)")
    ap.add_argument("--park-s", type=float, default=10.0,
                    help="a drained worker's park, on its GPU (weights out; 7.3-12.5 s measured on an H200)")
    ap.add_argument("--seats-full", default="wait", choices=("recompute", "wait"),
                    help="a handoff to a decode worker with every seat taken but KV room: pull its KV and wait for "
                         "a seat (the engine's Scheduler.add_prefilled) or recompute its prompt there (before)")
    ap.add_argument("--kv-gbps", type=float, default=50.0, help="bandwidth of one KV pull, GB/s")
    ap.add_argument("--prefill-queue-limit-tokens", type=int, default=0,
                    help="the router's spill rule: prefill on the decode worker when every prefill worker has more "
                         "than this queued (0: the router's 8 x max_num_batched_tokens)")
    ap.add_argument("--duration-s", type=float, default=0.0,
                    help="built-in shapes' length (default: an hour for the sinusoid, 30 minutes for the others)")
    ap.add_argument("--scale", type=float, default=1.0, help="built-in shapes' rate multiplier")
    ap.add_argument("--modes", default="load,throughput,both",
                    help="planner modes, and 'oracle': sized for each interval's own load from the instant it "
                         "starts, new workers after the start-up (the ceiling without idle spare capacity)")
    ap.add_argument("--predictor", default="kalman", choices=("constant", "moving_average", "kalman", "autoreg"))
    ap.add_argument("--max-tokens-exact", action="store_true",
                    help="clients ask for max_tokens = the answer they get: the routers' requested tokens show the "
                         "arrivals' answer length at arrival (the live view's early OSL at its best; default: "
                         "answer lengths known only once requests finish)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the fixed-split sweep")
    ap.add_argument("--bound", action="store_true",
                    help="print only the whole-worker bound of goodput per GPU-hour against the static peak "
                         "(whole_worker_bound) and run nothing")
    ap.add_argument("--first-token-hold", default="auto", choices=("auto", "on", "off"),
                    help="the router's first-token hold in the replay (runtime setting first_token_hold)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the built-in shapes' random draw and the replay router's tie-breaks between equal workers")
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT))
    ap.add_argument("--host-kv-gb", type=float, default=0.0,
                    help="host KV tier per prefill worker, GB of host DRAM (0: none): blocks evicted from its GPU's "
                         "prefix cache land there, a later prompt copies them back instead of computing them")
    ap.add_argument("--host-gbps", type=float, default=50.0,
                    help="the host tier's host->GPU copy bandwidth, GB/s (pinned, PCIe Gen5 x16)")
    ap.add_argument("--host-overlap-weight", type=float, default=None,
                    help="the replay router's KV-aware cost counts a host-held block as this fraction of a "
                         "device-cached one (default: as the router does, router.policy.HOST_BLOCK_WEIGHT, where "
                         "it has one; else 0.9)")
    ap.add_argument("--cache-evicts-tail-first", action="store_true",
                    help="a full prefix cache evicts a prompt's tail blocks first, as the engine's block manager does "
                         "(default: its head first, the replay as it was)")
    ap.add_argument("--host-offload-free", action="store_true",
                    help="the host tier's offloads (device evictions copied to it) cost no step time, as if on a "
                         "side stream (default: charged to the worker's next step, as the engine runs them)")
    ap.add_argument("--spill-idle-only", action=argparse.BooleanOptionalAction, default=True,
                    help="the replay router spills a prompt (prefill tier saturated) only onto a decode worker with "
                         "no request decoding or within max_local_prefill_tokens, else queues it on the prefill tier "
                         "unless that is 4 x past saturation (router.policy.spill_plan): the router's setting "
                         "spill_only_to_idle_decode, on by default; --no-spill-idle-only: onto any (before)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = make_bench(args)
    workloads = [load_trace(p) for p in args.trace]
    if not args.trace or args.shape:
        workloads += [shape(s, args.duration_s or (3600.0 if s == "sinusoid" else 1800.0), args.scale, args.seed)
                      for s in (args.shape or SHAPES)]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for w in workloads:
        print(f"== {w.name}: {len(w.arrivals)} requests over {w.duration_s / 60:.1f} min, budget {args.budget} GPUs, "
              f"TTFT <= {args.ttft_ms:g} ms, ITL <= {args.itl_ms:g} ms, profile {args.profile}")
        if args.bound:
            b = whole_worker_bound(bench, w)
            print(f"whole-worker bound: {b['mean_workers']:.2f} workers on average vs the static peak's "
                  f"{b['static_workers']} over {b['intervals']} intervals of {b['interval_s']:g} s: goodput per "
                  f"GPU-hour at most {b['goodput_per_gpu_hour_x_static']:.2f}x the static peak's")
            continue
        runs = run_all(bench, w, [m for m in args.modes.split(",") if m], not args.no_sweep)
        report = {"workload": w.name, "requests": len(w.arrivals), "duration_s": w.duration_s,
                  "args": vars(args), "sim": asdict(bench.sim),
                  "runs": [r.summary(bench.sim.ttft_s) | {"timeline": r.timeline} for r in runs]}
        (out / f"planner-{w.name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        plot(runs, w, out / f"planner-{w.name}.png")
        print(f"wrote {out / f'planner-{w.name}.json'} and .png")


if __name__ == "__main__":
    main()
