"""Forecasts, the online regression and the profile file: the planner's inputs, checked by hand."""

import json
import math

import pytest
from plannerlib import decode_step, profile

from planner.predictors import AutoRegressive, Constant, KalmanTrend, MovingAverage, make_predictor
from planner.profile import Profile, erlang_c, pooled_workers
from planner.regression import StepRegression


def test_constant_and_moving_average_skip_nan() -> None:
    c, m = Constant(), MovingAverage(3)
    assert math.isnan(c.predict()) and math.isnan(m.predict())
    for v in (1.0, 2.0, math.nan, 6.0, 10.0):
        c.observe(v)
        m.observe(v)
    assert c.predict() == 10.0
    assert m.predict() == pytest.approx((2 + 6 + 10) / 3)


def test_kalman_follows_a_linear_trend() -> None:
    k = KalmanTrend()
    for t in range(40):
        k.observe(5.0 + 2.0 * t)
    assert k.predict() == pytest.approx(5.0 + 2.0 * 40, rel=1e-3)  # level + slope: the next point
    assert k.predict(4) == pytest.approx(5.0 + 2.0 * 43, rel=1e-3)  # the throughput mode's horizon


def test_autoreg_follows_a_periodic_load_better_than_the_last_value() -> None:
    ar, last = AutoRegressive(), Constant()
    errors = {"ar": 0.0, "last": 0.0}
    for t in range(120):
        v = 100 + 50 * math.sin(2 * math.pi * t / 20)
        if t >= 40:
            errors["ar"] += abs(ar.predict() - v)
            errors["last"] += abs(last.predict() - v)
        ar.observe(v)
        last.observe(v)
    assert errors["ar"] < 0.2 * errors["last"]
    with pytest.raises(ValueError):
        make_predictor("crystal-ball")


def test_regression_starts_at_its_prior_and_learns_the_live_system() -> None:
    reg = StepRegression(1, prior=(0.01, 1e-4))
    assert reg.predict((1000.0,)) == pytest.approx(0.11)
    for tokens in (100.0, 500.0, 1000.0, 2000.0) * 50:  # the live system is twice as slow
        reg.observe((tokens,), 2 * (0.01 + 1e-4 * tokens))
    reg.observe((1.0,), math.nan)  # ignored
    assert reg.predict((1000.0,)) == pytest.approx(0.22, rel=0.02)
    assert math.isnan(StepRegression(2).predict((1.0, 1.0)))  # no prior, no samples: no fit


def test_profile_curves_capacities_and_file_round_trip(tmp_path) -> None:
    p = profile()
    assert p.prefill_latency_s(550) == pytest.approx(0.01 + 1e-4 * 550)  # interpolated
    assert p.prefill_latency_s(20000) == pytest.approx(0.01 + 1e-4 * 20000)  # extrapolated
    assert p.decode_step_s(75, 5000) == pytest.approx(decode_step(75, 5000))  # bilinear: exact here
    # at 100000 tokens of context: 0.01 + 1e-4 n + 1e-3 n <= 0.05 -> n = 36
    assert p.decode_max_batch(100000, 0.05) == 36
    assert p.decode_max_batch(200000, 0.05) == 19  # extrapolated: 0.01 + 2.1e-3 n <= 0.05 -> n = 19.05
    path = tmp_path / "p.json"
    p.with_capacity(2000, 50).save(path)
    loaded = Profile.load(str(path))
    assert loaded.decode == p.decode and loaded.prefill == p.prefill
    assert loaded.capacity["decode_max_batch"][0] == 100  # context 100: max_num_seqs binds
    bad = json.loads(path.read_text())
    del bad["decode"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="decode"):
        Profile.load(str(path))
    with pytest.raises(ValueError, match="known"):
        Profile.load("no-such-profile")


def test_pooled_prefill_tier_is_sized_by_its_queueing_tail() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: an arrival waits with probability rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.0) == 1.0  # saturated
    # load 1, service 1 s, slack 1 s, 99%: C(3, 1) = 0.0909 -> ln 0.0909 - 2 x 1 = -4.398 > ln 0.01 = -4.605;
    # C(4, 1) = 0.02041 -> -3.892 - 3 = -6.892: 4 workers, of which 3 + (4.605 - 4.398) / (6.892 - 4.398)
    assert pooled_workers(1.0, 1.0, 1.0, 0.99) == pytest.approx(3.0831, abs=2e-4)
    # a tier of many short prompts runs hotter than one of few: 40 prompts/s of 0.155 s (6.2 busy workers)
    # with 1.65 s of slack need 7 workers, not the 6.2 / 0.8 = 7.75 -> 8 of a utilization cap
    assert 6.2 < pooled_workers(6.2, 0.155, 1.65, 0.99) <= 7.0


def test_shipped_profiles_load_and_agree_with_the_sim_timing_model() -> None:
    from engine.sim import SimProfile

    for name in ("h200-llama-3.1-8b", "cpu-smollm2-135m"):
        p, sim = Profile.load(name), SimProfile.load(name)
        for b in p.decode.batch:
            for c in p.decode.context:
                assert p.decode_step_s(b, c) == pytest.approx(sim.step_time_s([], [c] * b), rel=1e-5)
        isl = p.prefill.isl[0]
        assert p.prefill_latency_s(isl) == pytest.approx(sim.step_time_s([(isl, 0)], []), rel=1e-5)
