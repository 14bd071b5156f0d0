"""The planner core's constraints: the GPU budget, tier switches, NaN and empty windows, zero traffic,
a noisy flat load, a worker that never starts, a worker that vanishes mid-drain."""

import math
import random
import subprocess
import sys
from dataclasses import replace

from plannerlib import config, decode_step, observe, profile, tier, window, worker

from planner import Action, ActionKind, Planner, RouterWindow, WorkerState


def kinds(decision):
    return sorted((a.kind.value, a.role, a.worker_id) for a in decision.actions)


def test_budget_clamps_both_tiers_in_proportion() -> None:
    # 3 + 3 wanted, budget 4: prefill gets round(4 * 3 / 6) = 2, decode the other 2.
    planner = Planner(config(gpu_budget=4), profile())
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 1), window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (2, 2)
    assert "budget-clamp" in d.codes()


def test_full_budget_switches_the_least_loaded_workers_of_the_tier_with_surplus() -> None:
    # budget 4 held by 3 prefill + 1 decode; the forecast wants 1 prefill (4 req/s of 800 tokens: a load of
    # 0.352 that one worker holds within the spill point, 10 services of 0.088 s: ln 0.352 - 0.648 x 10 =
    # -7.524 <= ln 0.002, need 0.352 + 0.648 x 6.2146 / 7.524 = 0.887; at 1000 tokens it would be 1.094: two)
    # and 3 decode (need 2.66 at 20 req/s x 500 would be too many prefill tokens, so: few long answers) ->
    # two SWITCHes to decode, the least loaded prefill workers first (p2 holds nothing, p1 less than p0).
    planner = Planner(config(gpu_budget=4), profile())
    prefill = [worker("p0", "prefill", num_running=2, num_queued_prefill_tokens=500),
               worker("p1", "prefill", num_running=1), worker("p2", "prefill")]
    d = planner.tick(observe(10.0, prefill + tier("decode", 1), window(4.0, 800, 2500)))
    assert kinds(d) == [("switch", "decode", "p1"), ("switch", "decode", "p2")]
    assert (d.num_prefill, d.num_decode) == (1, 3)


def test_load_mode_with_a_full_budget_switches_a_worker_the_other_tier_can_spare() -> None:
    # decode over its ITL SLO, no GPU left; prefill: 2 idle workers, 1 would do -> switch p1 (the idler).
    planner = Planner(config(mode="load", gpu_budget=4), profile())
    prefill = [worker("p0", "prefill", num_running=1, num_queued_prefill_tokens=100, tokens_per_s=100.0),
               worker("p1", "prefill", tokens_per_s=10.0)]
    decode = tier("decode", 2, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(10.0, prefill + decode, window(5.0)))
    assert kinds(d) == [("switch", "decode", "p1")]
    assert "budget-switch" in d.codes()


def test_a_tier_that_grows_takes_the_other_tiers_spare_workers_first_with_gpus_free() -> None:
    # decode over its ITL SLO (100 sequences of 40000 tokens: 60 ms): +1 (test_planner_modes); 11 GPUs
    # free. Prefill: 3 nearly idle workers, low (the load mode gives one at a time): switch its idlest, p1
    # (p2 ties with it, broken by id), rather than start a worker that serves only after its start-up.
    planner = Planner(config(mode="load", gpu_budget=16), profile())
    prefill = [worker("p0", "prefill", num_running=1, num_queued_prefill_tokens=100, tokens_per_s=100.0),
               worker("p1", "prefill", tokens_per_s=10.0), worker("p2", "prefill", tokens_per_s=10.0)]
    decode = tier("decode", 2, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(10.0, prefill + decode, window(5.0)))
    assert kinds(d) == [("switch", "decode", "p1")]
    assert "switch-first" in d.codes() and (d.num_prefill, d.num_decode) == (2, 3)


def test_a_low_tier_gives_the_growing_one_all_its_load_does_not_need_at_once() -> None:
    # decode: 2 workers over the ITL SLO at 40000-token contexts, 20 req/s x 500 tokens = 10000 tok/s at
    # 1280 tok/s each (test_planner_modes) -> 8, +6. Prefill: 5 idle workers, 20 prompts/s of 10 tokens
    # (0.022 busy): its load needs 1 -> the 4 others switch now (ties broken by id), 2 starts for the rest.
    planner = Planner(config(mode="load", gpu_budget=16), profile())
    prefill = tier("prefill", 5, tokens_per_s=10.0)
    decode = tier("decode", 2, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(10.0, prefill + decode, window(20.0, 10, 500)))
    assert kinds(d) == [("start", "decode", "")] * 2 + [("switch", "decode", f"p{i}") for i in range(4)]
    assert (d.num_prefill, d.num_decode) == (1, 8)


def test_no_decision_from_nan_or_empty_windows() -> None:
    workers = tier("prefill", 2) + tier("decode", 2)
    for mode in ("throughput", "both", "load"):
        planner = Planner(config(mode=mode), profile())
        assert planner.tick(observe(10.0, workers)).codes() == ["no-data"]  # no router window at all
        # arrivals but nothing finished yet: ISL and OSL are NaN
        blind = RouterWindow(window_s=10.0, num_arrivals=50)
        d = planner.tick(observe(20.0, workers, blind))
        assert not d.actions
        if mode != "load":
            assert "no-data" in d.codes()
        nan_rate = RouterWindow(window_s=0.0, num_arrivals=0)
        assert not planner.tick(observe(30.0, workers, nan_rate)).actions
    # load mode without a profile and without a single timed step: no fit, no decision
    planner = Planner(config(mode="load"))
    steps = [replace(w, num_steps=0, step_s=math.nan, num_running=5) for w in workers]
    d = planner.tick(observe(10.0, steps, window(5.0)))
    assert not d.actions and "load-no-fit" in d.codes()


def test_zero_traffic_goes_to_the_minimums_at_once_even_in_the_grace_period() -> None:
    planner = Planner(config(mode="load", grace_s=1000.0), profile())
    busy = tier("prefill", 4) + tier("decode", 5, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    first = planner.tick(observe(10.0, busy, window(5.0)))
    assert first.changes  # a change (an idle prefill worker switches to decode): the grace period starts
    idle = tier("prefill", 4) + tier("decode", 6)
    d = planner.tick(observe(20.0, idle, window(0.0)))
    assert (d.num_prefill, d.num_decode) == (1, 1)
    # all idle: ties broken by id; p0's switch is still pending (counted in decode, not drained twice)
    assert sorted(a.worker_id for a in d.actions if a.kind is ActionKind.DRAIN) == \
        ["d0", "d1", "d2", "d3", "d4", "d5", "p1", "p2"]
    assert "zero-traffic" in d.codes()
    # the drains are not reflected yet: nothing is drained twice
    again = planner.tick(observe(30.0, idle, window(0.0)))
    assert not again.actions and (again.num_prefill, again.num_decode) == (1, 1)


def test_noisy_flat_load_does_not_oscillate() -> None:
    # A closed loop: a flat demand with +/-15% noise; every worker reports the steady state of its share
    # (Little's law on the profile's step time). At most one change per 10 intervals, and no reversal.
    rng = random.Random(0)
    for mode in ("load", "both", "throughput"):
        planner = Planner(config(mode=mode), profile())
        counts = {"prefill": 2, "decode": 3}
        changes, last = [], None
        for tick in range(1, 101):
            rate = 8.0 * (1 + rng.uniform(-0.15, 0.15))
            decode_rate = rate * 500 / counts["decode"]  # tokens/s per decode worker
            n = decode_rate * 0.01 / (1 - decode_rate * (1e-4 + 1e-8 * 1250))
            prefill_rate = rate * 1000 / counts["prefill"]
            workers = (tier("prefill", counts["prefill"], tokens_per_s=prefill_rate, num_steps=10,
                            step_s=0.11, step_prefill_tokens=1000.0, num_queued_prefill_tokens=rng.randrange(0, 1500))
                       + tier("decode", counts["decode"], num_running=round(n), num_active_kv_tokens=round(n * 1250),
                              kv_usage=0.05, decode_tokens_per_s=decode_rate, num_steps=10,
                              step_s=decode_step(n, 1250), step_decode_tokens=n, step_kv_tokens=n * 1250,
                              step_prefill_tokens=0.0))
            d = planner.tick(observe(10.0 * tick, workers, window(rate, 1000, 500)))
            if d.changes:
                moved = (d.num_prefill - counts["prefill"], d.num_decode - counts["decode"])
                if last is not None:
                    assert not any(a * b < 0 for a, b in zip(moved, last)), f"{mode}: reversal at tick {tick}"
                changes.append(tick)
                last = moved
                counts = {"prefill": d.num_prefill, "decode": d.num_decode}
        assert len(changes) <= 10, f"{mode}: {len(changes)} changes in 100 intervals: {changes}"
        assert all(t <= 10 for t in changes[1:]), f"{mode}: still changing late: {changes}"


def test_a_worker_that_cannot_start_is_abandoned_and_does_not_wedge_the_planner() -> None:
    planner = Planner(config(mode="load", gpu_budget=4, start_timeout_s=100.0), profile())
    hot = dict(num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 2, **hot), window(5.0)))
    assert kinds(d) == [("start", "decode", "")]
    stuck = worker("d9", "decode", WorkerState.STARTING, since=10.0)
    for now in (20.0, 60.0, 100.0):  # in progress: no new change while it starts
        d = planner.tick(observe(now, tier("prefill", 1) + tier("decode", 2, **hot) + [stuck], window(5.0)))
        assert not d.actions and "in-progress" in d.codes()
    # start_timeout_s passed: abandon it; no GPU is free (the launcher says so) and the prefill tier
    # cannot spare its only worker -> no start, a reason instead, and the planner goes on deciding.
    d = planner.tick(observe(110.0, tier("prefill", 1) + tier("decode", 2, **hot) + [stuck], window(5.0),
                             gpus_free=0))
    assert kinds(d) == [("abandon", "decode", "d9")]
    assert "no-gpu-free" in d.codes()
    # the launcher removed it: with a GPU free again the planner starts one
    d = planner.tick(observe(130.0, tier("prefill", 1) + tier("decode", 2, **hot), window(5.0), gpus_free=1))
    assert kinds(d) == [("start", "decode", "")]


def test_a_worker_that_vanishes_mid_drain_does_not_wedge_the_planner() -> None:
    planner = Planner(config(mode="load", grace_s=10.0, scale_down_ticks=1), profile())
    quiet = dict(num_running=10, num_active_kv_tokens=10_000, kv_usage=0.01, decode_tokens_per_s=500.0)
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 3, **quiet), window(5.0)))
    (drain,) = [a for a in d.actions if a.kind is ActionKind.DRAIN]
    assert drain == Action(ActionKind.DRAIN, "decode", drain.worker_id)
    rest = [w for w in tier("decode", 3, **quiet) if w.worker_id != drain.worker_id]
    draining = worker(drain.worker_id, "decode", WorkerState.DRAINING, since=10.0)
    d = planner.tick(observe(20.0, tier("prefill", 1) + rest + [draining], window(5.0)))
    assert "in-progress" in d.codes()
    # it died: gone from the observation before its drain finished -> the planner decides again
    hot = [replace(w, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4) for w in rest]
    d = planner.tick(observe(30.0, tier("prefill", 1) + hot, window(5.0)))
    assert kinds(d) == [("start", "decode", "")]
    # a drained worker that dies before the launcher ever reports it draining: not waited for either
    planner = Planner(config(mode="load", grace_s=10.0, scale_down_ticks=1), profile())
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 3, **quiet), window(5.0)))
    (drain,) = [a for a in d.actions if a.kind is ActionKind.DRAIN]
    hot = [replace(w, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
           for w in tier("decode", 3) if w.worker_id != drain.worker_id]
    d = planner.tick(observe(30.0, tier("prefill", 1) + hot, window(5.0)))
    assert kinds(d) == [("start", "decode", "")]


def test_the_planner_imports_without_torch_or_statsmodels() -> None:
    code = ("import sys, planner, planner.core, planner.profile, planner.predictors; "
            "assert 'torch' not in sys.modules and 'statsmodels' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'statsmodels', 'engine')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zero_traffic_on_an_empty_cluster_starts_up_to_the_minimums() -> None:
    # No worker yet (a planner that came up before them): the decision says the minimums, not 0/0,
    # and starts them; the next tick, before they show up, starts nothing more.
    planner = Planner(config(mode="load", min_prefill=1, min_decode=2, gpu_budget=4), profile())
    d = planner.tick(observe(10.0, [], window(0.0)))
    assert (d.num_prefill, d.num_decode) == (1, 2)
    assert sorted((a.kind, a.role) for a in d.actions) == \
        [(ActionKind.START, "decode"), (ActionKind.START, "decode"), (ActionKind.START, "prefill")]
    assert "zero-traffic" in d.codes() and "below-minimum" in d.codes()
    again = planner.tick(observe(20.0, [], window(0.0)))
    assert not again.actions and (again.num_prefill, again.num_decode) == (1, 2)
    # the starts show up (one still starting): nothing more either
    up = [worker("p0", "prefill"), worker("d0", "decode"), worker("s0", "decode", WorkerState.STARTING, since=20.0)]
    assert not planner.tick(observe(30.0, up, window(0.0))).actions
    # no GPU free: still the minimums as the target, no start, and it says so
    full = Planner(config(mode="load", min_prefill=1, min_decode=1, gpu_budget=2), profile())
    d = full.tick(observe(10.0, [worker("d0", "decode")], window(0.0), gpus_free=0))
    assert (d.num_prefill, d.num_decode) == (1, 1) and not d.actions
    assert any(r.code == "below-minimum" and r.role == "prefill" and r.values["starts"] == 0 for r in d.reasons)
