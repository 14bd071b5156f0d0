"""bench/planner.py's replay: one request timed by hand, the closed-form decode stretches against
step-by-step stepping, and a short run with the planner in the loop."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.planner import Bench, Run, infeasible, interval_loads, replay, sized
from bench.planner_sim import Req, SimConfig, Simulation, StepModel
from bench.planner_worker import SegmentLog
from bench.planner_workload import Arrival, Workload, shape
from engine.sim import SimProfile
from planner import Planner, PlannerConfig, Profile

SIM = SimProfile.load("h200-llama-3.1-8b")


def run_requests(cfg: SimConfig, arrivals: list[Arrival], prefill: int = 1, decode: int = 1) -> list[Req]:
    sim = Simulation(cfg, StepModel(SIM))
    for role, n in (("prefill", prefill), ("decode", decode)):
        for _ in range(n):
            sim.add_worker(role, 0.0)
    reqs = [Req(i, a) for i, a in enumerate(arrivals)]
    for r in reqs:
        sim.push(r.arrival.t, "arrive", r)
    sim.run_until(math.inf)
    return reqs


def test_one_request_is_timed_as_the_sim_engine_would() -> None:
    cfg = SimConfig()
    (r,) = run_requests(cfg, [Arrival(0.0, 1000, 5, (0, 1))])
    ttft = SIM.step_time_s([(1000, 0)], [])  # one chunk on the prefill worker
    pull = cfg.kv_latency_s + 1000 * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9)
    decode = [SIM.step_time_s([], [1000 + 1 + j]) for j in range(4)]  # tokens 2..5, KV growing by one
    assert r.ttft == pytest.approx(ttft)
    assert r.done_t == pytest.approx(ttft + pull + sum(decode))
    assert (r.n_gaps, r.n_over, r.emitted) == (4, 0, 5)
    assert r.good(cfg.ttft_s)
    # a 50 GB/s pull of a 20000-token prompt takes 54 ms: its first gap misses a 50 ms ITL target
    (long,) = run_requests(cfg, [Arrival(0.0, 20000, 3, ())])
    assert long.n_over == 1 and not long.good(cfg.ttft_s)


def test_segment_log_counts_steps_over_the_target_by_hand() -> None:
    log = SegmentLog(itl_s=0.05)
    log.append(0, 10.0, 10, 0.045, 0.001)  # steps 0..9 last 0.045 .. 0.054 s: 6..9 are over (0.050 is not)
    log.append(10, 20.0, 1, 0.2, 0.0)  # one slow step of 200 ms
    log.append(11, 30.0, 5, 0.01, 0.0)  # five 10 ms steps
    assert log.over_until(6) == 0 and log.over_until(7) == 1 and log.over_until(10) == 4
    assert log.over_until(11) == 5 and log.over_until(16) == 5
    assert log.end_time(0) == pytest.approx(10.045)
    assert log.end_time(9) == pytest.approx(10.0 + 10 * 0.045 + 0.001 * 45)
    assert log.end_time(13) == pytest.approx(30.03)


@pytest.mark.parametrize("scale, kv_tokens, max_seqs", [(0.5, 120_000, 256), (0.4, 819_200, 256), (0.3, 819_200, 24)])
def test_closed_form_decode_equals_stepping_one_step_at_a_time(scale: float, kv_tokens: int, max_seqs: int) -> None:
    # 20 req/s on a KV small enough to preempt and recompute; 16 req/s at the decode worker's ITL
    # limit; 12 req/s queueing for one of 24 sequence slots
    w = shape("flat", duration_s=40.0, scale=scale, seed=3)
    # the router spilling onto any decode worker (spill_idle_only off): the spills' chunks make the ITL misses
    cfg = SimConfig(kv_capacity_tokens=kv_tokens, max_num_seqs=max_seqs, spill_idle_only=False)
    fast = run_requests(cfg, w.arrivals, prefill=1, decode=1)
    slow = run_requests(replace(cfg, fast_forward=False), w.arrivals, prefill=1, decode=1)
    assert len(fast) > 400 and sum(r.n_over for r in fast) > 100
    for a, b in zip(fast, slow):
        assert (a.n_gaps, a.n_over, a.emitted) == (b.n_gaps, b.n_over, b.emitted)
        assert a.done_t == pytest.approx(b.done_t, rel=1e-9)
        assert a.ttft == pytest.approx(b.ttft, rel=1e-9)


def test_replay_with_the_planner_in_the_loop_scales_and_returns_to_the_minimums() -> None:
    profile = Profile.load("h200-llama-3.1-8b")
    planner_cfg = PlannerConfig(mode="both", gpu_budget=8, adjustment_interval_s=10.0, grace_s=10.0,
                                predictor="kalman")
    bench = Bench(SimConfig(startup_s=20.0), StepModel(SIM), profile, planner_cfg, drain_s=60.0)
    w = shape("stop", duration_s=240.0, scale=0.5, seed=1)  # 20 req/s for 160 s, then nothing
    start = sized(bench, *interval_loads(w, 10.0)[0], 0.0)  # as an operator would size the first minutes
    run = replay(bench, w, "planner-both", start, Planner(planner_cfg, profile))
    summary = run.summary(bench.sim.ttft_s)
    assert summary["unfinished"] == 0 and summary["requests"] == len(w.arrivals)
    assert run.decisions >= 1 and max(row["decode"] for row in run.timeline) >= 2
    assert run.to_minimums_intervals is not None and run.to_minimums_intervals <= 2
    assert summary["attainment"] > 0.95
    assert summary["gpu_hours"] < 8 * (w.duration_s + 60) / 3600


def test_trace_lines_must_be_mooncake_format(tmp_path) -> None:
    from bench.planner_workload import load_trace

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 1000, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
                    '{"timestamp": 0, "input_length": 20, "output_length": 3, "hash_ids": [1, 2]}\n')
    w = load_trace(path)
    assert isinstance(w, Workload) and [a.t for a in w.arrivals] == [0.0, 1.0] and w.arrivals[0].isl == 20
    path.write_text('{"timestamp": 0, "input_len": 10}\n')
    with pytest.raises(ValueError, match="Mooncake"):
        load_trace(path)


def test_the_split_sweep_gives_up_only_on_runs_certain_to_lose() -> None:
    profile = Profile.load("h200-llama-3.1-8b")
    cfg = PlannerConfig(mode="both", gpu_budget=4, adjustment_interval_s=10.0, grace_s=10.0)
    bench = Bench(SimConfig(), StepModel(SIM), profile, cfg, drain_s=60.0)
    w = shape("flat", duration_s=60.0, scale=0.5, seed=2)  # 20 req/s: one decode worker is far too few
    full = replay(bench, w, "fixed 3P+1D", (3, 1), None)
    attainment = full.summary(bench.sim.ttft_s)["attainment"]
    assert not full.stopped and attainment < 0.9
    stopped = replay(bench, w, "fixed 3P+1D", (3, 1), None, stop_below=attainment + 0.01)
    assert stopped.stopped
    kept = replay(bench, w, "fixed 3P+1D", (3, 1), None, stop_below=attainment - 0.01)
    assert not kept.stopped and kept.summary(bench.sim.ttft_s)["attainment"] == attainment


def test_infeasible_requests_are_those_no_deployment_can_serve_in_time() -> None:
    # 1 ms per prompt token, nothing else: a prompt's uncached part alone takes new_tokens ms on an idle GPU;
    # decode steps 1 us per KV token; KV pulls of 1000 bytes per token at 1 GB/s (1 us per token) + 2 ms.
    flat = replace(SIM, step_s=0.0, prefill_min_s=0.0, prefill_token_s=1e-3, prefill_attention_s=0.0,
                   decode_seq_s=0.0, decode_kv_token_s=1e-6)
    cfg = SimConfig(ttft_s=2.0, itl_s=0.05, kv_bytes_per_token=1000, kv_gbps=1.0, kv_latency_s=0.002,
                    first_token_hold="off")
    bench = Bench(cfg, StepModel(flat), Profile.load("h200-llama-3.1-8b"), PlannerConfig())
    arrivals = [Arrival(0.0, 2560, 2, (1, 2, 3, 4, 5)),  # 2.56 s uncached: ttft
                Arrival(1.0, 3072, 2, (1, 2, 3, 4, 5, 6)),  # 5 blocks seen before: 512 new tokens, 0.512 s
                Arrival(2.0, 1024, 2, (7, 8)),  # 1.024 s
                Arrival(3.0, 2048, 2, (1, 2, 3, 4)),  # all seen: 1 token computed (the last one always is)
                Arrival(4.0, 2600, 2, (9, 10, 11, 12, 13, 14)),  # 2.6 s: ttft
                Arrival(4.5, 24064, 2, tuple(range(20, 67))),  # 47 new blocks: 24 s: ttft
                # 46 of those blocks cached: 448 new tokens; second token: 2 ms + 23.9 ms pull + 23.9 ms step
                # = 49.8 ms: in time
                Arrival(5.0, 23900, 3, tuple(range(20, 67))),
                # 47 blocks cached; 2 ms + 25 ms + 25 ms = 52 ms > 50 ms with 2 gaps: one over is the p99: handoff
                Arrival(6.0, 25000, 3, tuple(range(20, 69))),
                # the same with 101 gaps: the 99th percentile (nearest rank: the 100th) leaves one out
                Arrival(7.0, 25000, 102, tuple(range(20, 69))),
                # 45 blocks cached: 1960 new tokens, 1.96 s; the same 52 ms gap does not fit in the 40 ms of
                # TTFT left: the router's hold cannot take it either
                Arrival(8.0, 25000, 3, (*range(20, 65), 90, 91, 92, 93))]
    w = Workload("t", arrivals, 9.0)
    lost = infeasible(bench, w)
    assert lost == ["ttft", "", "", "", "ttft", "ttft", "", "handoff", "", "handoff"]
    # with the first-token hold (auto, the router's default) the first handoff's gap fits in its 1.064 s of
    # TTFT left (0.936 s prefill): held, not bound; the last one's does not
    held = replace(bench, sim=replace(cfg, first_token_hold="auto"))
    assert infeasible(held, w) == ["ttft", "", "", "", "ttft", "ttft", "", "", "", "handoff"]
    arrivals, lost = arrivals[:9], lost[:9]
    # the infeasible ones counted bad, and reported apart: the ceiling and the attainment among the feasible
    # ones (a handoff-bound request is feasible: a prefill on its decode worker serves it)
    reqs = [Req(i, a, infeasible=x == "ttft") for i, (a, x) in enumerate(zip(arrivals, lost))]
    for r in reqs[1:3]:
        r.ttft, r.done_t = 0.6, 1.0
    s = Run("x", reqs, 1.0).summary(2.0)
    assert (s["good"], s["infeasible"]) == (2, 3)
    assert s["attainment"] == pytest.approx(2 / 9) and s["feasible_ceiling"] == pytest.approx(6 / 9)
    assert s["attainment_of_feasible"] == pytest.approx(2 / 6)


def test_the_command_line_sets_the_replays_router() -> None:
    from bench.planner import make_bench, parse_args

    sim = make_bench(parse_args(["--first-token-hold", "off", "--seed", "3"])).sim
    assert (sim.first_token_hold, sim.seed) == ("off", 3)
    assert (make_bench(parse_args([])).sim.first_token_hold, make_bench(parse_args([])).sim.seed) == ("auto", 0)


def test_the_live_window_and_the_oracle_know_what_they_may() -> None:
    from bench.planner import Oracle, live_window
    from planner import Observation

    # the window's ISL is the arrivals' (the routers count prompt tokens at arrival), percentiles scaled
    # by the finished ones' ratio; the OSL is the finished requests' unless max_tokens tells the arrivals'
    done = [Req(0, Arrival(0.0, 1000, 10, ()), ttft=0.1, done_t=1.0)]
    arrived = [Req(1, Arrival(1.0, 4000, 300, ())), Req(2, Arrival(2.0, 2000, 100, ()))]
    w = live_window(arrived, done, 10.0, 2)
    assert (w.num_arrivals, w.isl_mean, w.isl_p95, w.osl_mean) == (2, 3000.0, 3000.0, 10.0)
    assert live_window(arrived, done, 10.0, 2, max_tokens_exact=True).osl_mean == 200.0
    # the oracle: 40 s idle, then 40 req/s. At the tick that opens the loaded interval (40 s) it starts
    # what the static rule sizes for it, not at the ticks before (it does not know the future)
    profile = Profile.load("h200-llama-3.1-8b")
    cfg = PlannerConfig(gpu_budget=8, adjustment_interval_s=20.0, horizon_s=20.0)
    bench = Bench(SimConfig(), StepModel(SIM), profile, cfg)
    load = Workload("step", [Arrival(40.0 + i / 40, 2000, 200, ()) for i in range(800)], 60.0)
    oracle = Oracle(bench, load)
    want = sized(bench, 40.0, 2000.0, 2000.0, 200.0, 0.0)
    assert sum(want) > 2
    for now, expected in ((0.0, (1, 1)), (20.0, (1, 1)), (40.0, want)):
        d = oracle.tick(Observation(now))
        assert (d.num_prefill, d.num_decode) == expected
        assert len(d.actions) == sum(expected)  # no worker yet: each one a start


def test_the_whole_worker_bound_counts_the_workers_each_interval_needs() -> None:
    from bench.planner import make_bench, parse_args, whole_worker_bound
    bench = make_bench(parse_args([]))  # 20 s intervals, minimums 1 prefill + 1 decode
    steady = [Arrival(0.05 * i, 4000, 200, ()) for i in range(800)]  # 20 req/s over 40 s: 2 equal intervals
    flat = whole_worker_bound(bench, Workload("flat", steady, 40.0))
    n = flat["static_workers"]
    assert n > 2 and flat["mean_workers"] == n and flat["goodput_per_gpu_hour_x_static"] == 1.0
    # the same load in the first interval only: the second holds the minimums (2 workers), the static
    # peak n in both: 2n GPU-intervals against n + 2
    half = whole_worker_bound(bench, Workload("half", steady[:400], 40.0))
    assert half["static_workers"] == n and half["intervals"] == 2
    assert math.isclose(half["goodput_per_gpu_hour_x_static"], 2 * n / (n + 2))
    assert math.isclose(half["bound_gpu_hours"], (n + 2) * 20 / 3600)
