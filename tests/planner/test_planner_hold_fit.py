"""bench/planner.py's router holds a handoff's first token when the gap's high estimate is over the ITL target and
its mean fits in the TTFT headroom (``policy.first_token_hold_s``'s ``mean_gap_s``): one request timed by hand."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.planner import prefill_alone_s
from bench.planner_sim import Req, SimConfig, Simulation, StepModel
from bench.planner_workload import Arrival
from engine.sim import SimProfile
from router.policy import HandoffGap

SIM = SimProfile.load("h200-llama-3.1-8b")


def test_a_seat_wait_in_the_gaps_window_does_not_stop_the_replays_hold() -> None:
    cfg = SimConfig()
    sim = Simulation(cfg, StepModel(SIM))
    sim.add_worker("prefill", 0.0)
    sim.add_worker("decode", 0.0)
    sim.handoff_gap = HandoffGap(decay=0.0)  # the router learned: 80 ms, one seat wait of 3 s, 80 ms
    for seen in (0.08, 3.0, 0.08):
        sim.handoff_gap.observe(0, 0.0, seen)
    # mean 0.08 s (over the 50 ms target, fits in the 1.4 s left), high 0.08 + 2.92 = 3.0 s (does not fit).
    # A 20000-token prompt: its 50 GB/s pull alone takes 54 ms, so its first gap, sent alone, misses the target
    r = Req(0, Arrival(0.0, 20000, 3, ()))
    sim.push(0.0, "arrive", r)
    sim.run_until(math.inf)
    prefill = prefill_alone_s(StepModel(SIM), 20000, 0, cfg.max_num_batched_tokens)  # 10 chunks, on one worker
    pull = cfg.kv_latency_s + 20000 * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9)
    assert pull > cfg.itl_s
    first_decode = SIM.step_time_s([], [20001])
    # held: the first token goes out with the decode worker's first (its step starts once the pull has landed),
    # so no gap is over the target; sent alone at the prefill's end, the first gap was pull + step: one over
    assert r.ttft == pytest.approx(prefill + pull + first_decode, rel=1e-6)
    assert (r.n_gaps, r.n_over) == (2, 0) and r.good(cfg.ttft_s)
