"""The warm pool in the replay (a start takes a parked worker, ready after a wake; parked workers
hold no GPU), the replay's ``add_prefilled`` waiting for a seat, and the planner core's forecast
horizon shrinking to a wake while workers are parked. Pure: no process."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plannerlib import config, observe, profile, tier, window
from test_planner_replay import run_requests

from bench.planner_sim import SimConfig, Simulation, StepModel
from bench.planner_workload import Arrival
from engine.sim import SimProfile
from planner import Planner, WorkerState

SIM = SimProfile.load("h200-llama-3.1-8b")


def test_a_start_takes_a_parked_worker_and_parked_workers_hold_no_gpu() -> None:
    cfg = SimConfig(warm_pool=1, startup_s=60.0, wake_s=5.0, park_s=1.0)
    sim = Simulation(cfg, StepModel(SIM))
    assert sim.gpu_seconds(0.0) == 60.0  # the pool's worker loaded on a GPU before it parked
    warm, cold = sim.add_worker("decode", 10.0, ready=False), sim.add_worker("prefill", 10.0, ready=False)
    sim.run_until(15.0)
    assert warm.state is WorkerState.READY and warm.since == 15.0  # woken: 5 s
    assert cold.state is WorkerState.STARTING and sim.num_woken == 1 and not sim.parked
    sim.run_until(70.0)
    assert cold.state is WorkerState.READY  # the start-up: 60 s
    # Drained at t=100, the idle worker parks (its GPU held 1 s more); the next drained one exits (the
    # pool holds one); a start before the park is done starts cold, one after it wakes.
    for w in (warm, cold):
        w.state = WorkerState.DRAINING
        sim.maybe_release(w, 100.0)
    assert sim.parked == [101.0] and sim.num_parked == 1 and not sim.workers
    assert sim.gpu_seconds(500.0) == 60.0 + (101.0 - 10.0) + (100.0 - 10.0)  # nothing while parked
    early, late = sim.add_worker("decode", 100.5, ready=False), None
    sim.run_until(106.0)
    assert early.state is WorkerState.STARTING and sim.parked == [101.0]
    late = sim.add_worker("decode", 101.0, ready=False)
    sim.run_until(106.0)
    assert late.state is WorkerState.READY and sim.num_woken == 2


@pytest.mark.parametrize("seats_full", ["recompute", "wait"])
def test_a_handoff_to_a_full_decode_worker_recomputes_or_waits_for_a_seat(seats_full: str) -> None:
    # One seat: A (1000 prompt tokens, 200 answer tokens) holds it when B's prompt is handed off.
    cfg = replace(SimConfig(), max_num_seqs=1, seats_full=seats_full)
    a, b = run_requests(cfg, [Arrival(0.0, 1000, 200, (0, 1)), Arrival(0.01, 1000, 5, (2, 3))])
    assert a.finished and b.finished and b.emitted == 5 and b.n_gaps == 4
    if seats_full == "recompute":
        assert math.isnan(b.transfer_s)  # queued to compute its prompt again on the decode worker
    else:
        pull = cfg.kv_latency_s + 1000 * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9)
        assert b.transfer_s == pytest.approx(pull)  # pulled at once, its KV held for the seat
    assert b.done_t > a.done_t  # either way it decodes once A's seat is free


def test_the_forecast_looks_a_wake_ahead_while_workers_are_parked() -> None:
    # A queue of 30000 prompt tokens on the prefill tier is worked off within the horizon (a start-up,
    # 60 s): with workers parked, new ones serve after 5 s + one 10 s interval, so within 15 s: more now.
    cfg = config(horizon_s=60.0, wake_s=5.0)
    workers = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    cold = Planner(cfg, profile())
    d_cold = cold.tick(observe(10.0, workers, window(10.0)))
    warm = Planner(cfg, profile())
    d_warm = warm.tick(replace(observe(10.0, workers, window(10.0)), num_parked=3))
    assert cold.throughput.horizon_s == 60.0 and warm.throughput.horizon_s == 15.0
    assert cold.throughput.drain_s == 60.0 and warm.throughput.drain_s == 15.0
    assert d_warm.num_prefill > d_cold.num_prefill >= 2, (d_cold, d_warm)
    # no pool known (wake_s 0), or none parked: the start-up's horizon
    assert config(horizon_s=60.0).horizon_with(3) == 60.0 and cfg.horizon_with(0) == 60.0
