"""The planner core's replica counts in each mode, worked out by hand from plannerlib's profile."""

import math

from plannerlib import config, observe, profile, tier, window, worker

from planner import ActionKind, Planner, WorkerState


def starts(decision, role):
    return sum(1 for a in decision.actions if a.kind is ActionKind.START and a.role == role)


def drains(decision, role):
    return [a.worker_id for a in decision.actions if a.kind is ActionKind.DRAIN and a.role == role]


def test_throughput_mode_sizes_each_tier_from_the_profile() -> None:
    # prefill at 1000-token prompts: 0.11 s busy each, 20 req/s -> a load of 2.2 workers, one pooled queue
    # (M/M/c) whose waits must stay, for 99% of the prompts, within 2 - 0.11 = 1.89 s and, for 99.8%, within
    # the router's spill point, 8 steps of 1000 tokens = 0.88 s (binding): 2 workers cannot hold it; 3: Erlang
    # C(3, 2.2) = 0.5422, tail ln(0.5422) - 0.8 x 0.88 / 0.11 = -7.012 <= ln 0.002 = -6.2146; the part of the
    # third worker needed: 2.2 + 0.8 x 6.2146 / 7.012 = 2.9090 -> 3 workers.
    # decode: context 1000 + 500/2 = 1250; the largest batch under 50 ms: 0.01 + 1e-4 n + 1.25e-5 n <= 0.05
    # -> n = 355, capped at max_num_seqs 100: step 0.01 + 0.01 + 0.00125 = 0.02125 s, 4705.9 tok/s x 0.8 = 3764.7;
    # 20 req/s x 500 tokens = 10000 tok/s -> 2.66 -> 3 workers.
    planner = Planner(config(), profile())
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 1), window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (3, 3)
    assert starts(d, "prefill") == 2 and starts(d, "decode") == 2
    forecast = next(r for r in d.reasons if r.code == "forecast")
    assert math.isclose(forecast.values["prefill_need"], 2.9090, rel_tol=1e-3)
    assert math.isclose(forecast.values["decode_need"], 10000 / (100 / 0.02125 * 0.8), rel_tol=1e-3)


def test_throughput_mode_scales_down_only_past_the_band() -> None:
    # need 2.909 prefill workers with 3 serving (test above): ceil(2.909 / 0.9) = 4 > 3 -> stay at 3. At 10
    # req/s (a load of 1.1): 2 workers hold the tail (C(2, 1.1) = 0.39032, ln 0.39032 - 0.9 x 8 = -8.1408), the
    # need is 1.1 + 0.9 x 6.2146 / 8.1408 = 1.787: ceil(1.787 / 0.9) = 2 -> drain one. (At 11 req/s, 1.901:
    # ceil(2.11) = 3, stay.)
    planner = Planner(config(), profile())
    workers = tier("prefill", 3) + tier("decode", 3)
    d = planner.tick(observe(10.0, workers, window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (3, 3) and not d.actions
    busy = [w if w.worker_id != "p0" else type(w)(**{**vars(w), "num_running": 3}) for w in workers]
    # 14.2 req/s (a load of 1.562): 2 workers miss the tail (C(2, 1.562) = 0.685, ln 0.685 - 0.438 x 8 =
    # -3.882 > -6.215), 3 hold it (C = 0.2595: -1.349 - 1.438 x 8 = -12.853): need 2 + 2.333 / 8.971 = 2.260,
    # ceil(2.260 / 0.9) = 3: stay
    d = planner.tick(observe(30.0, busy, window(14.2, 1000, 500)))
    assert d.num_prefill == 3 and not drains(d, "prefill")
    # 10 req/s: need 1.787 -> 2: one worker fewer, on the second such tick (the least loaded: p1, nothing
    # running)
    d = planner.tick(observe(50.0, busy, window(10.0, 1000, 500)))
    assert d.num_prefill == 3 and not d.actions
    d = planner.tick(observe(70.0, busy, window(10.0, 1000, 500)))
    assert d.num_prefill == 2
    assert drains(d, "prefill") == ["p1"]


def test_load_mode_adds_one_decode_worker_when_itl_is_over_the_slo() -> None:
    # 100 running sequences of 40000 tokens: 0.01 + 0.01 + 1e-8 * 4e6 = 0.06 s > 50 ms -> +1.
    planner = Planner(config(mode="load"), profile())
    workers = tier("prefill", 1) + tier("decode", 2, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(10.0, workers, window(5.0)))
    assert (d.num_prefill, d.num_decode) == (1, 3)
    assert starts(d, "decode") == 1 and len(d.actions) == 1
    reason = next(r for r in d.reasons if r.code == "itl-over-slo")
    assert math.isclose(reason.values["itl_s"], 0.06, rel_tol=1e-6)


def test_load_mode_starts_no_decode_worker_for_one_sequence_alone_over_the_slo() -> None:
    # One sequence of 4.5M tokens: 0.01 + 1e-4 + 1e-8 * 4.5e6 = 0.0551 s > 50 ms, but with a worker more
    # the busiest still runs that one sequence (ceil(1 / 2) = 1): the same step. Starting one would
    # change nothing but the bill (and be drained again when idle: a 1 <-> 2 flap), so: no action.
    planner = Planner(config(mode="load"), profile())
    workers = tier("prefill", 1) + tier("decode", 1, num_running=1, num_active_kv_tokens=4_500_000, kv_usage=0.05)
    d = planner.tick(observe(10.0, workers, window(0.2)))
    assert (d.num_prefill, d.num_decode) == (1, 1) and not d.actions
    reason = next(r for r in d.reasons if r.code == "itl-floor")
    assert math.isclose(reason.values["itl_s"], 0.0551, rel_tol=1e-6)
    assert math.isclose(reason.values["itl_s_n_plus_1"], 0.0551, rel_tol=1e-6)
    # Ten such sequences (0.461 s): with a worker more the busiest runs five (0.01 + 5e-4 + 0.225) -> +1.
    ten = tier("prefill", 1) + tier("decode", 1, num_running=10, num_active_kv_tokens=45_000_000, kv_usage=0.5)
    d = Planner(config(mode="load"), profile()).tick(observe(10.0, ten, window(0.2)))
    assert (d.num_prefill, d.num_decode) == (1, 2)
    assert math.isclose(next(r for r in d.reasons if r.code == "itl-over-slo").values["itl_s_n_plus_1"], 0.2355,
                        rel_tol=1e-6)


def test_load_mode_adds_one_decode_worker_when_requests_wait_for_a_seat() -> None:
    # 100 running (max_num_seqs) of 1000 tokens: a 21 ms step, well under the SLO; but 30 wait for a seat.
    planner = Planner(config(mode="load"), profile())
    full = dict(num_running=100, num_active_kv_tokens=100_000, kv_usage=0.01)
    workers = tier("prefill", 1) + tier("decode", 1, **full) + [worker("d9", "decode", num_waiting=30, **full)]
    d = planner.tick(observe(10.0, workers, window(5.0)))
    assert (d.num_prefill, d.num_decode) == (1, 3)
    reason = next(r for r in d.reasons if r.code == "itl-over-slo")
    assert reason.values["waiting_for_a_seat"] == 30 and reason.values["itl_s"] < 0.05


def test_load_mode_adds_the_prefill_workers_the_queue_needs_in_one_tick() -> None:
    # 30000 queued tokens + a 1000-token prompt: 31 steps x 0.01 + 1e-4 x 31000 = 3.41 s > 2 s -> up, by the
    # need: 60000 queued over N workers + 1000 within 2 s: N=3: 21 steps -> 0.21 + 2.1 = 2.31 s; N=4: 16000 ->
    # 0.16 + 1.6 = 1.76 s -> 4 (the queue drained within the 10 s interval is 60000 x 1.1e-4 / 10 = 0.66 GPU: 1).
    planner = Planner(config(mode="load"), profile())
    workers = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    d = planner.tick(observe(10.0, workers, window(5.0, isl=1000)))
    reason = next(r for r in d.reasons if r.code == "ttft-over-slo")
    assert math.isclose(reason.values["ttft_s"], 3.41, rel_tol=1e-6)
    assert reason.values["need"] == 4
    assert (d.num_prefill, d.num_decode) == (4, 1) and starts(d, "prefill") == 2


def test_load_mode_prefill_need_counts_the_tokens_computed_per_second() -> None:
    # 2 workers each computing 8000 tok/s (1.1e-4 s per token: 0.88 busy > 0.9? no; the queue of 30000 each
    # makes TTFT 3.41 s) -> busy = (16000 + 60000 / 10) x 1.1e-4 = 2.42 GPU at 0.8 -> 3.025 -> 4; the TTFT rule
    # also says 4 (above).  With 20000 tok/s each: (40000 + 6000) x 1.1e-4 = 5.06 / 0.8 = 6.325 -> 7.
    planner = Planner(config(mode="load"), profile())
    workers = tier("prefill", 2, num_queued_prefill_tokens=30000, tokens_per_s=20000.0) + tier("decode", 1)
    d = planner.tick(observe(10.0, workers, window(5.0, isl=1000)))
    assert next(r for r in d.reasons if r.code == "ttft-over-slo").values["need"] == 7
    assert d.num_prefill == 7 and starts(d, "prefill") == 5


def test_load_mode_adds_the_decode_workers_the_steady_batch_needs_in_one_tick() -> None:
    # 2 workers, 90 running sequences of 40000 tokens each: ITL 0.01 + 0.009 + 0.036 = 55 ms > 50 ms; a third
    # worker would cut it (60 each: 40 ms), so up. 1600 tok/s each, doubled by 90 waiting each: 6400 tok/s.
    # A worker's capacity at 50 ms: (0.05 - 0.01) / (1e-4 + 1e-8 x 40000) = 80 sequences per 50 ms step =
    # 1600 tok/s; at 0.8 of it: 6400 / 1280 = 5 (KV: 0.36 x 2 / 180 per sequence x 360 / 5 = 0.29;
    # seats: 72 <= 90): 3 more in one tick, not +1 per tick.
    planner = Planner(config(mode="load"), profile())
    hot = dict(num_running=90, num_waiting=90, num_active_kv_tokens=3_600_000, kv_usage=0.36,
               decode_tokens_per_s=1600.0)
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 2, **hot), window(5.0)))
    reason = next(r for r in d.reasons if r.code == "itl-over-slo")
    assert math.isclose(reason.values["itl_s"], 0.055, rel_tol=1e-6) and reason.values["need"] == 5
    assert (d.num_prefill, d.num_decode) == (1, 5) and starts(d, "decode") == 3


def test_load_mode_sizes_an_up_for_the_arrivals_when_they_ask_more_than_the_workers_show() -> None:
    # The same prefill queue as above at 40 req/s of 1000 tokens: 40000 tok/s x 1.1e-4 s = 4.4 GPU (more than
    # the queue's 0.66) at 0.8 -> 5.5 -> 6 (the TTFT rule says 4).
    planner = Planner(config(mode="load"), profile())
    workers = tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1)
    d = planner.tick(observe(10.0, workers, window(40.0, isl=1000)))
    assert next(r for r in d.reasons if r.code == "ttft-over-slo").values["need"] == 6 and d.num_prefill == 6
    # The decode tier above (6400 tok/s by its counters, need 5) at 20 req/s x 500 answer tokens = 10000 tok/s:
    # 10000 / 1280 = 7.8 -> 8.
    planner = Planner(config(mode="load"), profile())
    hot = dict(num_running=90, num_waiting=90, num_active_kv_tokens=3_600_000, kv_usage=0.36,
               decode_tokens_per_s=1600.0)
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 2, **hot), window(20.0, 10, 500)))
    assert next(r for r in d.reasons if r.code == "itl-over-slo").values["need"] == 8 and d.num_decode == 8


def test_load_mode_adds_no_worker_for_one_busy_worker_when_the_tier_load_fits() -> None:
    # d0: 100 sequences of 40000 tokens, ITL 60 ms; d1 idle. Spread over 3 the ITL would be 27 ms, but the
    # need of the tier is 2: nothing decodes per second beyond them (steady ITL 10 ms), KV 0.004 x 100 / 2 =
    # 0.2, seats 50: a worker more takes none of d0's sequences (the router does not move them).
    planner = Planner(config(mode="load"), profile())
    workers = [*tier("prefill", 1), worker("d0", "decode", num_running=100, num_active_kv_tokens=4_000_000,
                                            kv_usage=0.4), worker("d1", "decode")]
    d = planner.tick(observe(10.0, workers, window(0.5)))
    reason = next(r for r in d.reasons if r.role == "decode")
    assert reason.code == "itl-imbalance" and reason.values["need"] == 2
    assert not d.actions and d.num_decode == 2


def test_load_mode_adds_decode_workers_before_the_itl_misses_when_the_arrivals_rise() -> None:
    # 2 workers of 50 sequences of 1000 tokens: ITL 0.01 + 0.005 + 0.0005 = 15.5 ms, fine today. A worker's
    # capacity at 50 ms: (0.05 - 0.01) / 1.1e-4 = 363 sequences, 100 seats: 100 / (0.01 + 0.011) = 4761.9 tok/s.
    # The routers see 30 req/s x 500 answer tokens = 15000 tok/s (their own counters: 3000 each): 7500 each
    # > 0.9 x 4761.9 = 4285.7 -> up now, to 15000 / (0.8 x 4761.9) = 3.94 -> 4.
    planner = Planner(config(mode="load"), profile())
    busy = dict(num_running=50, num_active_kv_tokens=50_000, kv_usage=0.005, decode_tokens_per_s=3000.0)
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 2, **busy), window(30.0, 10, 500)))
    reason = next(r for r in d.reasons if r.role == "decode")
    assert reason.code == "itl-rising" and math.isclose(reason.values["capacity_tokens_per_s"], 100 / 0.021)
    assert reason.values["need"] == 4 and d.num_decode == 4 and starts(d, "decode") == 2
    # at 15 req/s (7500 tok/s: 3750 each < 4285.7): no rise
    d = Planner(config(mode="load"), profile()).tick(
        observe(10.0, tier("prefill", 1) + tier("decode", 2, **busy), window(15.0, 10, 500)))
    assert not d.actions


def test_load_mode_keeps_a_decode_worker_the_rising_test_would_take_back() -> None:
    # 3 workers decoding 2400 tok/s each of 10 sequences of 1000 tokens. With 2: 3600 each, steady ITL
    # 0.01 / (1 - 3600 x 1.1e-4) = 16.6 ms < 40 ms, but 3600 > 0.8 x 0.9 x 4761.9 = 3428.6 tok/s (the capacity
    # at 50 ms): 2 would sit in the rising band's reach. Stay. At 2000 each (3000 with 2): down, on the 2nd tick.
    def ticks(rate: float) -> list:
        planner = Planner(config(mode="load"), profile())
        load = dict(num_running=10, num_active_kv_tokens=10_000, kv_usage=0.01, decode_tokens_per_s=rate)
        return [planner.tick(observe(now, tier("prefill", 1) + tier("decode", 3, **load), window(5.0)))
                for now in (10.0, 20.0)]
    assert not any(d.actions for d in ticks(2400.0))
    assert [len(drains(d, "decode")) for d in ticks(2000.0)] == [0, 1]


def test_load_mode_adds_prefill_workers_when_the_arrivals_would_saturate_them() -> None:
    # 2 idle prefill workers, no queue; 20 req/s of 1000 tokens: 20000 x 1.1e-4 / 2 = 1.1 > 0.9 each -> up,
    # to 2.2 / 0.8 = 2.75 -> 3.
    planner = Planner(config(mode="load"), profile())
    d = planner.tick(observe(10.0, tier("prefill", 2) + tier("decode", 1), window(20.0, 1000, 10)))
    assert next(r for r in d.reasons if r.role == "prefill").values["need"] == 3 and d.num_prefill == 3


def test_load_mode_adds_workers_while_a_start_is_in_progress() -> None:
    # Tick 1: 2 prefill workers with 30000 queued each -> 4 (above): 2 starts. Tick 2 (they are still
    # starting: a change in progress) the queues have doubled: 120000 over N + 1000 within 2 s: N=7:
    # 18143 -> 19 steps 0.19 + 1.814 = 2.004 s > 2 s; N=8: 16000 -> 1.76 s -> 8, so 8 - 4 = 4 more start now,
    # not after the start-up; starts only (no drain, no switch while a change is in progress).
    planner = Planner(config(mode="load"), profile())
    d = planner.tick(observe(10.0, tier("prefill", 2, num_queued_prefill_tokens=30000) + tier("decode", 1),
                             window(5.0, isl=1000)))
    assert starts(d, "prefill") == 2
    starting = [worker(f"s{i}", "prefill", WorkerState.STARTING, since=10.0) for i in range(2)]
    later = tier("prefill", 2, num_queued_prefill_tokens=60000) + starting + tier("decode", 1)
    d = planner.tick(observe(20.0, later, window(5.0, isl=1000)))
    assert "in-progress" in d.codes() and "load-up-meanwhile" in d.codes()
    assert starts(d, "prefill") == 4 and len(d.actions) == 4 and d.num_prefill == 8
    # the same queue a tick later, those 4 issued and not seen yet: nothing more
    d = planner.tick(observe(30.0, later, window(5.0, isl=1000)))
    assert not d.actions


def test_load_mode_scales_down_after_two_low_ticks_only_if_n_minus_1_stays_under_80_percent() -> None:
    # 3 decode workers at 500 tok/s each, 10 sequences of 1000 tokens: with 2 workers each makes 750 tok/s,
    # steady ITL = a / (1 - 750 * (1e-4 + 1e-8 * 1000)) = 0.01 / 0.9175 = 10.9 ms < 40 ms -> -1, on the 2nd tick.
    planner = Planner(config(mode="load"), profile())
    quiet = dict(num_running=10, num_active_kv_tokens=10_000, kv_usage=0.01, decode_tokens_per_s=500.0)
    workers = tier("prefill", 1) + tier("decode", 3, **quiet)
    first = planner.tick(observe(10.0, workers, window(5.0)))
    assert not first.actions and "load-low-waiting" in first.codes()
    second = planner.tick(observe(20.0, workers, window(5.0)))
    assert second.num_decode == 2 and len(drains(second, "decode")) == 1
    low = next(r for r in second.reasons if r.code == "load-low" and r.role == "decode")
    assert math.isclose(low.values["itl_s_n_minus_1"], 0.01 / 0.9175, rel_tol=1e-6)
    # 1466.7 tok/s each of 10 sequences of 25000 tokens: 2 workers at 2200 tok/s -> steady ITL
    # 0.01 / (1 - 2200 * (1e-4 + 1e-8 * 25000)) = 43.5 ms: under the SLO (it could spare one) but over 80%: stay.
    planner = Planner(config(mode="load"), profile())
    warm = quiet | {"num_active_kv_tokens": 250_000, "decode_tokens_per_s": 2200 * 2 / 3}
    for now in (10.0, 20.0, 30.0):
        d = planner.tick(observe(now, tier("prefill", 1) + tier("decode", 3, **warm), window(5.0)))
        assert not d.actions
    ok = next(r for r in d.reasons if r.role == "decode")
    assert ok.code == "load-ok" and math.isclose(ok.values["itl_s_n_minus_1"], 0.01 / 0.23, rel_tol=1e-6)
    # 4000 tok/s each: 2 workers would need 6000 tok/s -> 0.01 / (1 - 6000 * 1.1e-4) = 29.4 ms, a batch of
    # 6000 x 0.0294 = 176 > 100 seats: no steady batch -> stay (3 workers: 17.9 ms, 71 seats: no rise either).
    planner = Planner(config(mode="load"), profile())
    hot = quiet | {"decode_tokens_per_s": 4000.0}
    for now in (10.0, 20.0, 30.0):
        d = planner.tick(observe(now, tier("prefill", 1) + tier("decode", 3, **hot), window(5.0)))
        assert not d.actions


def test_both_mode_throughput_is_the_floor_and_load_scales_above_it() -> None:
    # the forecast asks for 3 decode workers; the decode load is low (would go -1): it stays at the floor 3.
    planner = Planner(config(mode="both"), profile())
    quiet = dict(num_running=10, num_active_kv_tokens=10_000, kv_usage=0.01, decode_tokens_per_s=500.0)
    workers = tier("prefill", 3) + tier("decode", 3, **quiet)
    for now in (10.0, 20.0, 30.0):
        d = planner.tick(observe(now, workers, window(20.0, 1000, 500)))
        assert (d.num_prefill, d.num_decode) == (3, 3) and not d.actions
    # ITL over the SLO (100 sequences of 40000 tokens: 60 ms): load scales above the floor, to its need:
    # 20 req/s x 500 tokens = 10000 tok/s at 40000-token contexts, 1600 tok/s each at 50 ms (above):
    # 10000 / 1280 = 7.8 -> 8 (the forecast sized for 1250-token contexts).
    hot = tier("prefill", 3) + tier("decode", 3, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4)
    d = planner.tick(observe(40.0, hot, window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (3, 8)


def test_load_mode_sizes_a_ramp_for_the_rate_a_start_up_ahead() -> None:
    # arrivals ramp 8, 10, 12, 14 req/s of 1000 tokens onto 2 prefill workers that keep up (no queue; one
    # alone would be over 0.8: no down). Today's rate never saturates them (14 x 1000 x 1.1e-4 / 2 = 0.77 <
    # 0.9). A start takes 30 s (3 ticks): the
    # Kalman trend's rate then (its own figure) puts each worker over 0.9 once it passes 0.9 x 2 / 0.11 =
    # 16.4 req/s: up on that tick and not before, to ceil(lead x 0.11 / 0.8) workers.
    from planner.predictors import make_predictor

    planner = Planner(config(mode="load", predictor="kalman", horizon_s=30.0), profile())
    trend = make_predictor("kalman")
    for i, rate in enumerate((8.0, 10.0, 12.0, 14.0)):
        workers = tier("prefill", 2, tokens_per_s=rate * 1000 / 2) + tier("decode", 1)
        d = planner.tick(observe(10.0 * (i + 1), workers, window(rate, 1000, 10)))
        trend.observe(rate)
        lead = trend.predict(3)
        if lead <= 0.9 * 2 / 0.11:
            assert not starts(d, "prefill")
        else:
            break
    assert lead > 16.4 and rate <= 14.0
    assert d.num_prefill == math.ceil(lead * 0.11 / 0.8 - 1e-9) > 2
    assert "ttft-over-slo" in d.codes()


def test_throughput_mode_follows_a_shift_of_prompt_lengths_within_a_tick() -> None:
    # 10000-token prompts, then 100-token ones: the next forecast is the last window's arrivals' 100 tokens
    # (not 5050, the mean of both), so the prefill need drops at once: 20 x 100 / 9090.9 = a load of 0.22
    # that one worker holds (slack 0.88 s, the spill point, over 0.011 s: C(1, 0.22) = 0.22, ln 0.22 - 0.78 x
    # 80 = -63.914; need 0.22 + 0.78 x 6.2146 / 63.914 = 0.2958), not the 12+ workers of 5050 tokens.
    planner = Planner(config(), profile())
    workers = tier("prefill", 1) + tier("decode", 1)
    planner.tick(observe(10.0, workers, window(20.0, 10000, 100)))
    planner.tick(observe(20.0, workers, window(20.0, 100, 100)))
    assert planner.throughput.forecast().isl == 100.0
    assert math.isclose(planner.throughput.needs()[0], 0.2958, rel_tol=0.01)


def test_throughput_mode_works_off_the_backlog() -> None:
    # The first test's load (20 req/s, 1000-token prompts, 500-token answers: 3 + 3 workers) with work waiting.
    # prefill (one pooled queue): 2 x 20000 queued prompt tokens worked off within max(interval 10 s,
    # horizon 0) = 10 s: 40000 / 1000 / 10 = 4 prompts/s more, a load of 24 x 0.11 = 2.64; c = 3: Erlang
    # C(3, 2.64) = 0.78198 (B: 0.725275, 0.489108, 0.300902), tail ln 0.78198 - 0.36 x 0.88 / 0.11 = -3.12596 >
    # ln 0.002 = -6.21461 (the spill point's 99.8%); c = 4: C = 0.368728 (B4 = 0.165690), -0.997722 - 1.36 x 8 =
    # -11.8777: need 3 + (-3.12596 + 6.21461) / (-3.12596 + 11.8777) = 3.3529 -> 4 (3 without the queue).
    # decode: d0, d1 have every seat taken (100) and requests waiting: they serve no arrival until their
    # queues are gone, so the forecast's 2.656 workers are needed besides them: 4.656 -> 5. d2 has requests
    # waiting with seats free (prompts it computes itself), d3 a full KV and nobody waiting: not saturated.
    def decide(backlog: bool) -> object:
        seats = dict(num_running=100, num_waiting=30) if backlog else {}
        workers = [*tier("prefill", 2, num_queued_prefill_tokens=20000 if backlog else 0),
                   worker("d0", "decode", **seats), worker("d1", "decode", **seats),
                   worker("d2", "decode", num_running=10, num_waiting=5 if backlog else 0),
                   worker("d3", "decode", kv_usage=0.95 if backlog else 0.0)]
        return Planner(config(), profile()).tick(observe(10.0, workers, window(20.0, 1000, 500)))

    d = decide(backlog=True)
    forecast = next(r for r in d.reasons if r.code == "forecast")
    assert math.isclose(forecast.values["prefill_need"], 3.3529, rel_tol=1e-4)
    assert math.isclose(forecast.values["decode_need"], 10000 / (100 / 0.02125 * 0.8) + 2, rel_tol=1e-6)
    assert forecast.values["saturated_decode_workers"] == 2 and forecast.values["drain_s"] == 10.0
    assert (d.num_prefill, d.num_decode) == (4, 5) and starts(d, "prefill") == 2 and starts(d, "decode") == 1
    quiet = decide(backlog=False)  # the same workers without the backlog: 3 + 3 (4 decode serving: stay)
    assert (quiet.num_prefill, quiet.num_decode) == (3, 4) and starts(quiet, "prefill") == 1
    # no arrival in the next window, the saturated workers still there: not idle (the minimums): 2 workers
    planner = Planner(config(), profile())
    assert not planner.tick(observe(10.0, tier("prefill", 3) + tier("decode", 3), window(20.0, 1000, 500))).actions
    full = tier("prefill", 3) + tier("decode", 3, num_running=100, num_waiting=10)
    d = planner.tick(observe(20.0, full, window(0.0)))
    assert next(r for r in d.reasons if r.code == "forecast").values["decode_need"] == 3


def test_throughput_mode_adds_workers_while_a_start_is_in_progress() -> None:
    # Tick 1: 20 req/s -> 3 + 3 from 1 + 1 (the first test): 2 + 2 starts. Tick 2, those 4 still starting (a
    # change in progress), 40 req/s: decode 40 x 500 / 3764.7 = 5.31 -> 6: 3 more; prefill: a load of 4.4,
    # c = 5: C(5, 4.4) = 0.718389, ln 0.718389 - 0.6 x 8 = -5.13079 > ln 0.002 = -6.21461 (c = 4 is under the
    # load); c = 6: C(6, 4.4) = 0.391922 (B6 = 0.146666), -0.936680 - 1.6 x 8 = -13.73668: need 5 + (-5.13079 +
    # 6.21461) / (-5.13079 + 13.73668) = 5.1259 -> 6: 3 more. Starts only, now, not after the start-up.
    planner = Planner(config(), profile())
    d = planner.tick(observe(10.0, tier("prefill", 1) + tier("decode", 1), window(20.0, 1000, 500)))
    assert starts(d, "prefill") == 2 and starts(d, "decode") == 2
    starting = [worker(f"s{r[0]}{i}", r, WorkerState.STARTING, since=10.0) for r in ("prefill", "decode")
                for i in range(2)]
    workers = tier("prefill", 1) + tier("decode", 1) + starting
    d = planner.tick(observe(20.0, workers, window(40.0, 1000, 500)))
    assert "in-progress" in d.codes() and "forecast-up-meanwhile" in d.codes()
    assert starts(d, "prefill") == 3 and starts(d, "decode") == 3 and len(d.actions) == 6
    assert (d.num_prefill, d.num_decode) == (6, 6)
    # the same a tick later, those 6 issued and not seen yet: nothing more
    d = planner.tick(observe(30.0, workers, window(40.0, 1000, 500)))
    assert not d.actions and "in-progress" in d.codes()
