"""The live planner's adapter (``planner.view``) and settings, without processes: etcd's messages
folded into the core's observation, with hand-computed expectations."""

from __future__ import annotations

import math

import pytest

from planner import WorkerState
from planner.service import decision_to_pb, planner_config
from planner.view import ClusterView, Transition, merge_steps
from runtime import keys
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.settings import ClusterConfig, ConfigError

DECODE = wpb.WORKER_ROLE_DECODE
PREFILL = wpb.WORKER_ROLE_PREFILL


def steps(n: int, step_s: float, decode: float, kv: float, window_s: float = 1.0, role: int = DECODE,
          running: int = 4) -> cpb.WorkerStepStats:
    m = cpb.WorkerStepStats(worker_id="d0", role=role, window_s=window_s, num_steps=n, num_running=running,
                            tokens_per_s=n * decode / window_s, decode_tokens_per_s=n * decode / window_s)
    if n:
        m.step_s, m.step_prefill_tokens, m.step_decode_tokens, m.step_kv_tokens = step_s, 0.0, decode, kv
    return m


def test_step_summaries_merge_weighted_by_their_steps() -> None:
    merged = merge_steps([steps(10, 0.02, 4, 400), steps(30, 0.04, 8, 800), steps(0, 0, 0, 0)])
    assert merged["num_steps"] == 40
    assert merged["step_s"] == pytest.approx((10 * 0.02 + 30 * 0.04) / 40)  # 0.035
    assert merged["step_decode_tokens"] == pytest.approx((10 * 4 + 30 * 8) / 40)  # 7
    assert merged["step_kv_tokens"] == pytest.approx(700)
    assert merged["decode_tokens_per_s"] == pytest.approx((40 + 240) / 3)  # over the 3 s of windows
    assert math.isnan(merge_steps([steps(0, 0, 0, 0)])["step_s"])


def test_a_tick_sees_every_summary_since_the_last_and_never_one_twice() -> None:
    view = ClusterView(window_s=3.0)
    view.steps_put("d0", steps(10, 0.02, 4, 400))
    view.steps_put("d0", steps(30, 0.04, 8, 800, running=6))
    obs = view.observe(10.0, {"decode": {"d0": None}})
    (w,) = obs.workers
    assert (w.role, w.state, w.num_steps, w.num_running) == ("decode", WorkerState.READY, 40, 6)
    assert w.step_s == pytest.approx(0.035)
    (w,) = view.observe(11.0, {"decode": {"d0": None}}).workers  # nothing new: counts, no steps
    assert w.num_steps == 0 and math.isnan(w.step_s) and w.num_running == 6


def test_traffic_is_differenced_over_the_window_not_one_tick() -> None:
    view = ClusterView(window_s=3.0)

    def router(t: float, arrivals: int) -> None:
        view.router_put("r0", cpb.RouterWindowStats(window_s=60, num_arrivals=arrivals, num_arrivals_total=arrivals,
                                                    num_finished_total=arrivals, isl_mean=100.0), t)

    router(0.0, 0)
    (only,) = view.traffic(0.0)
    assert only.window_s == 60 and only.num_arrivals == 0  # one sample: the router's own window
    for t, total in ((1.0, 2), (2.0, 2), (3.0, 2), (4.0, 2)):
        router(t, total)
    (win,) = view.traffic(4.0)
    # the oldest sample kept is the last at or before 4 - 3 = 1 s: arrivals 2 -> 2 over 3 s
    assert (win.window_s, win.num_arrivals, win.request_rate) == (3.0, 0, 0.0)
    router(5.0, 5)
    (win,) = view.traffic(5.0)
    assert (win.window_s, win.num_arrivals) == (3.0, 3) and win.isl_mean == 100.0
    router(6.0, 1)  # a restarted router of the same id: its totals start again
    (win,) = view.traffic(6.0)
    assert win.num_arrivals == 1 and win.window_s == 60  # its own window again


def test_lengths_follow_a_shift_of_the_mix_within_the_window() -> None:
    """Found live (bench/planner_modes_live.py, throughput mode): 35 s into a decode-heavy phase
    the routers' 60 s window still said ISL 486 and OSL 19 (the prefill-heavy phase's requests),
    so the planner kept 2 prefill workers for prompts of 96 tokens and too few decode workers.
    Lengths now come from the routers' token totals over the planner's window."""
    view = ClusterView(window_s=3.0)

    def router(t: float, arrivals: int, finished: int, prompt: int, output: int) -> None:
        # the 60 s window: the long prompts and short answers of a minute ago
        view.router_put("r0", cpb.RouterWindowStats(
            window_s=60, num_arrivals=40, num_finished=40, isl_mean=500.0, isl_p50=450.0, isl_p95=1000.0,
            osl_mean=6.0, osl_p50=6.0, osl_p95=9.0, num_arrivals_total=arrivals, num_finished_total=finished,
            num_prompt_tokens_total=prompt, num_output_tokens_total=output), t)

    router(0.0, 40, 40, 20_000, 240)
    router(3.0, 43, 42, 20_300, 560)  # 3 prompts of 100 tokens arrived, 2 answers of 160 finished
    (win,) = view.traffic(3.0)
    assert (win.num_arrivals, win.num_finished) == (3, 2)
    assert (win.isl_mean, win.isl_p50, win.isl_p95) == (100.0, 90.0, 200.0)  # the window's shape, its mean
    assert (win.osl_mean, win.osl_p50, win.osl_p95) == (160.0, 160.0, 240.0)
    router(6.0, 45, 42, 20_500, 560)  # nothing finished in the window: the routers' OSL stays
    (win,) = view.traffic(6.0)
    assert win.isl_mean == 100.0 and (win.osl_mean, win.osl_p95) == (6.0, 9.0)
    # a router that publishes no token totals: its own window's lengths
    old = ClusterView(window_s=3.0)
    for t, n in ((0.0, 40), (3.0, 43)):
        old.router_put("r0", cpb.RouterWindowStats(window_s=60, isl_mean=500.0, isl_p95=1000.0, osl_mean=6.0,
                                                   num_arrivals_total=n, num_finished_total=n), t)
    (win,) = old.traffic(3.0)
    assert (win.isl_mean, win.isl_p95, win.osl_mean) == (500.0, 1000.0, 6.0)


def test_longer_answers_show_at_arrival_from_the_tokens_requested() -> None:
    """Throughput mode added decode late after a shift to long answers: an answer's length is
    known only when it finishes. The tokens the arrivals asked for (max_tokens), times the share of
    their request finished requests used, is the OSL at arrival; it raises the window's OSL, never
    lowers it."""
    view = ClusterView(window_s=3.0)

    def router(t: float, arrivals: int, finished: int, output: int, requested: int, finished_requested: int) -> None:
        view.router_put("r0", cpb.RouterWindowStats(
            window_s=60, num_arrivals=40, num_finished=40, isl_mean=100.0, osl_mean=10.0, osl_p50=10.0,
            osl_p95=20.0, num_arrivals_total=arrivals, num_finished_total=finished,
            num_prompt_tokens_total=arrivals * 100, num_output_tokens_total=output,
            num_requested_tokens_total=requested, num_finished_requested_tokens_total=finished_requested), t)

    # short answers so far: 40 requests asked for 20 tokens each and used half of it (EOS)
    router(0.0, 40, 40, 400, 800, 800)
    # the shift: 4 requests arrive asking for 200 tokens; the 2 that finished were short ones (20 asked, 10 used)
    router(3.0, 44, 42, 420, 1600, 840)
    (win,) = view.traffic(3.0)
    assert (win.osl_mean, win.osl_p50, win.osl_p95) == (100.0, 100.0, 200.0)  # 200 asked x 0.5 used
    # nothing finished in the window: the share used comes from the router's lifetime totals (420 / 840)
    router(6.0, 46, 42, 420, 2000, 840)
    (win,) = view.traffic(6.0)
    assert win.osl_mean == 100.0
    # shorter answers asked for: the estimate does not lower the finished requests' OSL (30 here)
    router(9.0, 50, 46, 540, 2040, 1640)  # 4 arrivals asking 10 each; 4 finished: 120 tokens of 800 asked
    (win,) = view.traffic(9.0)
    assert win.osl_mean == 30.0
    # no max_tokens published (an older router, or none asked): the finished requests' OSL as before
    plain = ClusterView(window_s=3.0)
    for t, n, out in ((0.0, 40, 400), (3.0, 44, 460)):
        plain.router_put("r0", cpb.RouterWindowStats(window_s=60, osl_mean=10.0, num_arrivals_total=n,
                                                     num_finished_total=n, num_output_tokens_total=out), t)
    (win,) = plain.traffic(3.0)
    assert win.osl_mean == 15.0


def test_a_started_worker_that_registered_is_not_also_counted_as_its_placeholder() -> None:
    """Found live (bench/planner_modes_live.py, both mode): the launcher keeps a start's
    placeholder until its start call returns, after the worker registered; for that instant the
    view counted the worker twice (desired decode 4 on a budget of 4 with 1 prefill; at zero
    traffic the phantom would have let the planner drain one worker too many)."""
    view = ClusterView(window_s=3.0)
    starting = {"starting-decode-0": Transition("starting-decode-0", "decode", WorkerState.STARTING, 10.0)}
    registered = {"prefill": {"p0": None}, "decode": {"d0": None, "d1": None}}
    obs = view.observe(11.0, registered, starting, since_s={"p0": 0.0, "d0": 0.0, "d1": 11.0})
    assert sorted((w.worker_id, w.state) for w in obs.tier("decode")) == [
        ("d0", WorkerState.READY), ("d1", WorkerState.READY)]  # d1, first seen at 11 > 10: the start
    assert sum(1 for w in obs.workers if w.role == "decode") == 2
    # not registered yet: the placeholder counts; an old worker does not stand for it
    obs = view.observe(11.0, {"prefill": {"p0": None}, "decode": {"d0": None}}, starting,
                       since_s={"p0": 0.0, "d0": 0.0})
    assert sorted(w.worker_id for w in obs.workers if w.role == "decode") == ["d0", "starting-decode-0"]


def test_workers_come_from_registrations_and_the_launchers_transitions() -> None:
    view = ClusterView(window_s=3.0)
    view.steps_put("w1", steps(5, 0.01, 1, 10, role=PREFILL))  # switched to prefill, decode key not yet gone
    obs = view.observe(5.0, {"prefill": {"p0": None, "w1": None}, "decode": {"d0": None, "w1": None}},
                       {"d0": Transition("d0", "decode", WorkerState.DRAINING, 4.0),
                        "starting-decode-0": Transition("starting-decode-0", "decode", WorkerState.STARTING, 4.5)})
    got = sorted((w.worker_id, w.role, w.state) for w in obs.workers)
    assert got == [("d0", "decode", WorkerState.DRAINING), ("p0", "prefill", WorkerState.READY),
                   ("starting-decode-0", "decode", WorkerState.STARTING), ("w1", "prefill", WorkerState.READY)]


def test_settings_make_the_core_config() -> None:
    cfg = ClusterConfig(gpu_budget=0, adjustment_interval_s=2.0, itl_slo_ms=60)
    p = planner_config(cfg, num_workers=3)
    assert (p.gpu_budget, p.grace_s, p.itl_slo_ms, p.min_prefill, p.mode) == (3, 4.0, 60, 1, "load")
    assert planner_config(ClusterConfig(mode="aggregated"), 1).min_prefill == 0
    for bad in (dict(planner_mode="fast"), dict(min_decode=0), dict(itl_slo_ms=0), dict(gpu_budget=-1)):
        with pytest.raises(ConfigError):
            ClusterConfig(**bad)
    assert keys.planner_history_key("ns", 7) == "/tandem/ns/planner/history/000000000007"
    assert keys.worker_steps_key("ns", "d0") == "/tandem/ns/metrics/steps/d0"


def test_a_decision_round_trips_as_its_message() -> None:
    from planner import Action, ActionKind, Decision, Observation, Reason, RouterWindow

    d = Decision(1.0, "load", 1, 2, (Action(ActionKind.START, "decode"),),
                 (Reason("itl-over-slo", "decode", {"itl_s": 0.08}),))
    obs = Observation(1.0, (), (RouterWindow(window_s=4.0, num_arrivals=6),))
    msg = cpb.PlannerDecision.FromString(decision_to_pb(d, "pl", obs, 3, dry_run=True).SerializeToString())
    assert (msg.num_prefill, msg.num_decode, msg.seq, msg.dry_run, msg.request_rate) == (1, 2, 3, True, 1.5)
    assert msg.actions[0].kind == cpb.PlannerAction.KIND_START and msg.actions[0].role == "decode"
    assert msg.reasons[0].code == "itl-over-slo" and msg.reasons[0].values["itl_s"] == pytest.approx(0.08)


def test_the_services_fast_check_starts_on_a_breach_and_leaves_the_steps_to_the_tick() -> None:
    import asyncio
    from dataclasses import replace

    from plannerlib import profile

    from planner.service import PlannerService

    cfg = ClusterConfig(adjustment_interval_s=10.0, planner_fast_interval_s=2.0, planner_startup_s=60.0,
                        planner_wake_s=5.0)
    config = planner_config(cfg, num_workers=4)
    assert (config.fast_interval_s, config.horizon_s, config.wake_s) == (2.0, 70.0, 5.0)
    assert planner_config(replace(cfg, planner_fast_interval_s=10.0), 4).fast_interval_s == 0  # not within a tick
    with pytest.raises(ConfigError):
        ClusterConfig(planner_fast_interval_s=-1)
    service = PlannerService(cfg, config, dry_run=True, profile=profile())  # profile: the load mode's priors
    registered = {"prefill": {"p0": None}, "decode": {"d0": None}}
    for t, total in ((0.0, 0), (10.0, 50)):  # 5 req/s of 1000-token prompts, 100-token answers
        service.view.router_put("r0", cpb.RouterWindowStats(
            window_s=60, num_arrivals=total, num_arrivals_total=total, num_finished_total=total, isl_mean=1000.0,
            osl_mean=100.0), t)
    service.view.steps_put("d0", steps(10, 0.01 + 1e-4 * 4 + 1e-8 * 400, 4, 400))  # the profile's step
    assert not asyncio.run(service.tick(registered)).actions
    # Between ticks every seat of d0 (the profile's 100) is taken and 20 wait: asked 2000 x 120 / 100 = 2400
    # tok/s of 1000-token contexts, 3810 tok/s a worker at 0.8 of its capacity; seats 120 > 90 -> 2: one start
    # (on the second check that sees it).
    full = steps(20, 0.03, 100, 100_000, running=100)
    full.num_waiting, full.num_active_kv_tokens, full.decode_tokens_per_s = 20, 100_000, 2000.0
    service.view.steps_put("d0", full)
    assert asyncio.run(service.react(registered)).codes() == ["fast-breach-once"]  # not published
    d = asyncio.run(service.react(registered))  # seen by two checks in a row: a breach
    assert [(a.kind.value, a.role) for a in d.actions] == [("start", "decode")] and "fast-up" in d.codes()
    assert service.last is d and service.seq == 2  # published like a tick's decision
    # the fast check consumed nothing: the next tick's observation still holds that summary's 20 steps
    (d0,) = [w for w in service.view.observe(20.0, registered).workers if w.role == "decode"]
    assert d0.num_steps == 20 and d0.num_waiting == 20
