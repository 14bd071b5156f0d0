"""The planner core's fast check between ticks (``Planner.react``): starts only, on a breach the
workers' own counters show, sized to the need, counting what is starting, within the budget, not
held by the grace period. Worked out by hand from plannerlib's profile (load-mode priors: prefill
0.01 s per step + 1e-4 s per token in 1000-token steps; decode step 0.01 + 1e-4 n + 1e-8 n ctx)."""

from dataclasses import replace

from plannerlib import config, observe, profile, tier, window, worker

from planner import ActionKind, Planner, WorkerState


def starts(decision, role):
    return sum(1 for a in decision.actions if a.kind is ActionKind.START and a.role == role)


def test_a_prefill_queue_between_ticks_starts_the_workers_it_needs_once() -> None:
    planner = Planner(config(mode="load", fast_interval_s=2.0), profile())
    calm = tier("prefill", 2) + tier("decode", 1)
    assert not planner.tick(observe(10.0, calm, window(5.0, isl=1000))).actions
    # no queue: nothing, and never a drain on the fast path (the load is low)
    assert not planner.react(observe(12.0, calm)).actions
    # 30000 queued on each + a 1000-token prompt: 31 steps x 0.01 + 31000 x 1e-4 = 3.41 s > 2 s. Need: N=3:
    # 21000 -> 0.21 + 2.1 = 2.31 s; N=4: 16000 -> 0.16 + 1.6 = 1.76 s -> 4 (the last tick's 5 req/s x 1000
    # tokens and the queue over the 10 s interval ask 0.66 GPU at most): 2 starts, once two checks in a row
    # saw it (one could have caught a queue at its peak).
    queued = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    d = planner.react(observe(13.0, queued))
    assert not d.actions and d.codes() == ["fast-breach-once"]
    d = planner.react(observe(15.0, queued))
    assert starts(d, "prefill") == 2 and len(d.actions) == 2 and d.num_prefill == 4
    fast = next(r for r in d.reasons if r.code == "fast-up")
    assert fast.role == "prefill" and fast.values["need"] == 4 and "ttft-over-slo" in d.codes()
    # the same queue 2 s later, the 2 starts issued and not seen yet: nothing more (no overshoot)
    assert not planner.react(observe(17.0, queued)).actions
    # seen starting, and the queues doubled: 120000 over N + 1000 within 2 s -> 8 (N=7: 18143 -> 2.004 s):
    # 8 - 2 ready - 2 starting = 4 more
    starting = [worker(f"s{i}", "prefill", WorkerState.STARTING, since=15.0) for i in range(2)]
    later = tier("prefill", 2, num_queued_prefill_tokens=60000) + starting + tier("decode", 1)
    d = planner.react(observe(19.0, later))
    assert starts(d, "prefill") == 4 and d.num_prefill == 8
    # a fast start opens a grace period like any change: the next tick drains nothing
    assert planner.last_change_s == 19.0


def test_a_breach_right_after_a_scale_down_does_not_wait_out_the_grace() -> None:
    planner = Planner(config(mode="load", fast_interval_s=2.0), profile())
    idle = tier("prefill", 3) + tier("decode", 1)
    d = planner.tick(observe(10.0, idle, window(0.0)))  # zero traffic: down to the minimums at once
    assert [a.kind for a in d.actions] == [ActionKind.DRAIN, ActionKind.DRAIN]
    # 2 s later (drains in progress, in the grace period) a burst queues 30000 tokens on the one left:
    # 31000 -> 3.41 s; need: N=2: 16000 -> 1.76 s -> 2 (the 5 req/s of the fast window: 0.55 GPU): 1 start
    draining = [worker(a.worker_id, "prefill", WorkerState.DRAINING, since=10.0) for a in d.actions]
    left = [worker("p0", "prefill", num_queued_prefill_tokens=30000), *draining, *tier("decode", 1)]
    planner.react(observe(12.0, left, window(5.0, isl=1000, window_s=2.0)))
    d = planner.react(observe(14.0, left, window(5.0, isl=1000, window_s=2.0)))
    assert starts(d, "prefill") == 1 and d.num_prefill == 2 and "fast-up" in d.codes()


def test_the_fast_path_keeps_to_the_budget_draining_workers_included() -> None:
    # budget 4: 1 ready + 2 draining prefill workers and 1 decode hold all 4 GPUs: the breach is told, no start
    planner = Planner(config(mode="load", gpu_budget=4, fast_interval_s=5.0), profile())
    planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 1), window(5.0, isl=1000)))
    draining = [worker(f"x{i}", "prefill", WorkerState.DRAINING, since=10.0) for i in range(2)]
    left = [worker("p0", "prefill", num_queued_prefill_tokens=30000), *draining, *tier("decode", 1)]
    planner.react(observe(15.0, left))
    d = planner.react(observe(20.0, left))
    assert not d.actions and "fast-no-gpu" in d.codes()


def test_decode_requests_waiting_for_a_seat_start_a_decode_worker() -> None:
    # 1 decode worker, every seat (100) taken, 20 waiting, 2000 tok/s decoded, 1000-token contexts: asked
    # 2000 x 120 / 100 = 2400 tok/s; capacity at 50 ms: n = min(100, 0.04 / 1.1e-4) = 100 -> 100 / 0.021 =
    # 4762 tok/s x 0.8 = 3810 -> 1 worker by rate; seats: 120 / 1 > 90, 120 / 2 = 60 -> 2: 1 start.
    planner = Planner(config(mode="both", fast_interval_s=5.0), profile())
    base = tier("prefill", 1) + tier("decode", 1)
    planner.tick(observe(10.0, base, window(5.0, isl=1000, osl=100)))
    full = [*tier("prefill", 1), worker("d0", "decode", num_running=100, num_waiting=20,
                                        num_active_kv_tokens=100_000, decode_tokens_per_s=2000.0)]
    planner.react(observe(15.0, full))
    d = planner.react(observe(20.0, full))
    assert starts(d, "decode") == 1 and d.num_decode == 2 and "waiting_for_a_seat" in \
        next(r for r in d.reasons if r.code == "fast-up").values


def test_no_fast_start_before_a_tick_has_seen_traffic_in_throughput_mode_or_aggregated() -> None:
    queued = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    assert not Planner(config(mode="load"), profile()).react(observe(5.0, queued)).actions
    forecast = Planner(config(mode="throughput"), profile())  # its ticks would drain what the fast path starts
    forecast.tick(observe(10.0, tier("prefill", 2) + tier("decode", 1), window(5.0, isl=1000)))
    assert not forecast.react(observe(15.0, queued)).actions
    agg = Planner(replace(config(mode="load", min_prefill=0), aggregated=True), profile())
    agg.tick(observe(10.0, tier("decode", 1, num_queued_prefill_tokens=30000), window(5.0)))
    assert not agg.react(observe(15.0, tier("decode", 1, num_queued_prefill_tokens=30000))).actions


def test_a_breach_one_check_catches_at_its_peak_starts_nothing() -> None:
    planner = Planner(config(mode="load", fast_interval_s=5.0), profile())
    calm = tier("prefill", 2) + tier("decode", 1)
    queued = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    planner.tick(observe(10.0, calm, window(5.0, isl=1000)))
    for t, workers in ((15.0, queued), (20.0, calm), (25.0, queued)):
        assert not planner.react(observe(t, workers)).actions
    assert not planner.react(observe(40.0, queued)).actions  # not the check before: 15 s ago
    assert len(planner.react(observe(45.0, queued)).actions) == 2


def test_the_live_planner_runs_the_fast_check_every_5_s_by_default() -> None:
    from planner.service import planner_config
    from runtime.settings import ClusterConfig

    # the defaults: a tick every 10 s, a fast check every 5 s between; not where the tick is as frequent
    assert planner_config(ClusterConfig(), num_workers=4).fast_interval_s == 5.0
    assert planner_config(ClusterConfig(adjustment_interval_s=5.0), num_workers=4).fast_interval_s == 0.0
    assert planner_config(ClusterConfig(planner_fast_interval_s=0.0), num_workers=4).fast_interval_s == 0.0
