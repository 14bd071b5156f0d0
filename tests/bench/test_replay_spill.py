"""``bench/planner_sim.py``'s ``spill_idle_only`` (``bench/planner.py --spill-idle-only``): with the prefill tier
saturated, the replay's router spills a long prompt only onto a decode worker with nothing decoding
(``router.policy.spill_plan``, the router's ``spill_only_to_idle_decode``, on by default), else queues it on the
prefill tier; off (``--no-spill-idle-only``), it spills onto any. The router taking the same decisions:
tests/routing/test_spill_itl.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.planner_sim import Req, SimConfig, Simulation, StepModel
from bench.planner_workload import Arrival
from engine.sim import SimProfile

SIM = SimProfile.load("h200-llama-3.1-8b")


def place(spill_idle_only: bool, decoding: bool) -> tuple[str, int]:
    """A 25,000-token prompt arriving while the one prefill worker has 20,000 prompt tokens queued (over the
    router's 8 x 2048 = 16,384: saturated) and the one decode worker runs a request or none: (where its
    prompt is computed, the router's local prefills counted)."""
    sim = Simulation(SimConfig(spill_idle_only=spill_idle_only), StepModel(SIM))
    p, d = sim.add_worker("prefill", 0.0), sim.add_worker("decode", 0.0)
    p.add_job(Req(0, Arrival(0.0, 20_000, 10, ())), 0.0)
    assert p.queued_prefill_tokens == 20_000
    if decoding:
        d.add_local(Req(1, Arrival(0.0, 10, 1000, ())), 0.0)
    sim.arrive(Req(2, Arrival(0.0, 25_000, 10, ())), 0.0)
    return ("prefill" if p.queued_prefill_tokens == 45_000 else "decode"), sim.num_local_prefill


def test_a_long_prompt_spills_onto_a_decoding_worker_only_with_the_rule_off() -> None:
    assert place(False, decoding=True) == ("decode", 1)
    assert place(True, decoding=True) == ("prefill", 0)  # queued on the saturated prefill tier instead
    assert place(True, decoding=False) == ("decode", 1)  # an idle decode worker: nothing slowed, it spills
    assert place(False, decoding=False) == ("decode", 1)
