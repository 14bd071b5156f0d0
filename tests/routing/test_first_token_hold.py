"""The router's first-token hold (``first_token_hold``), pure: the rule that decides how long a
handed-off request's first token may wait for the decode worker's first, and what the router
learns of that gap, on hand-computed cases. The router process holding one: tests/router/
test_model_readiness.py; the replay doing the same: tests/bench/test_replay_first_token_hold.py."""

from __future__ import annotations

import pytest

from router.policy import HandoffGap, TokenInterval, first_token_hold_s

ITL_S = 0.05


def test_auto_holds_a_gap_over_the_itl_target_that_fits_in_the_ttft_headroom() -> None:
    # 80 ms predicted (> 50 ms), 1.5 s of TTFT left: held, at most for those 1.5 s
    assert first_token_hold_s("auto", 0.08, ITL_S, 1.5) == 1.5
    assert first_token_hold_s("auto", 1.5, ITL_S, 1.5) == 1.5  # just fits
    # released at once: the gap meets the ITL target (50 ms is not over it), it would push the
    # TTFT past its target, nothing is known yet, or the TTFT is already spent
    assert first_token_hold_s("auto", 0.04, ITL_S, 1.5) == 0.0
    assert first_token_hold_s("auto", 0.05, ITL_S, 1.5) == 0.0
    assert first_token_hold_s("auto", 1.6, ITL_S, 1.5) == 0.0
    assert first_token_hold_s("auto", None, ITL_S, 1.5) == 0.0
    assert first_token_hold_s("auto", 0.08, ITL_S, -0.1) == 0.0


def test_auto_does_not_hold_for_an_answer_whose_mean_itl_meets_the_target_with_the_gap() -> None:
    # 150 ms gap, 30 ms per token after it: 64 tokens have a mean ITL of (150 + 62 * 30) / 63 = 31.9 ms
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=64, itl_s=0.030) == 0.0
    # 6 tokens: (150 + 4 * 30) / 5 = 54 ms, over the target: held; 8 tokens: (150 + 6 * 30) / 7 = 47 ms: not
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=6, itl_s=0.030) == 1.5
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=8, itl_s=0.030) == 0.0
    # a slow decode tier (60 ms per token) misses it anyway: the gap's own interval is what the hold spares
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=64, itl_s=0.060) == 1.5
    # no length (max_tokens unset), no time per token learned yet, or two tokens (the gap is the one interval)
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=None, itl_s=0.030) == 1.5
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=64, itl_s=None) == 1.5
    assert first_token_hold_s("auto", 0.15, ITL_S, 1.5, num_tokens=2, itl_s=0.0) == 1.5
    assert first_token_hold_s("on", 0.15, ITL_S, 1.5, num_tokens=64, itl_s=0.030) == 1.5  # on: every handoff
    interval = TokenInterval(decay=0.5)
    assert interval.predict() is None
    interval.observe(0.030, 1)
    interval.observe(0.100, 2)  # 2 tokens in one message; the first observation counts half
    assert interval.predict() == pytest.approx((0.015 + 0.100) / 2.5)


def test_on_holds_every_handoff_within_the_headroom_and_off_none() -> None:
    assert first_token_hold_s("on", 0.01, ITL_S, 0.7) == 0.7
    assert first_token_hold_s("on", None, ITL_S, 0.7) == 0.7
    assert first_token_hold_s("on", 5.0, ITL_S, 0.7) == 0.7  # it still goes out by the TTFT target
    assert first_token_hold_s("on", 0.08, ITL_S, 0.0) == 0.0
    assert first_token_hold_s("off", 0.08, ITL_S, 1.5) == 0.0
    with pytest.raises(ValueError, match="first_token_hold"):
        first_token_hold_s("always", 0.08, ITL_S, 1.5)


def test_the_gap_is_learned_as_a_transfer_rate_plus_the_rest() -> None:
    gap = HandoffGap(decay=0.5)
    assert gap.predict(1000) is None
    # 1000 tokens moved in 20 ms, seen 30 ms after the first token: 20 us/token, 10 ms of the rest
    gap.observe(1000, 0.020, 0.030)
    assert gap.predict(2000) == pytest.approx(2000 * 20e-6 + 0.010)
    # 3000 tokens in 30 ms, gap 60 ms; the first counts half: 40 ms / 3500 tokens, rest 35 ms / 1.5
    gap.observe(3000, 0.030, 0.060)
    assert gap.predict(3500) == pytest.approx(0.040 + 0.035 / 1.5)
    # nothing moved (the decode worker held the whole prompt): the rest alone
    cached = HandoffGap()
    cached.observe(0, 0.0, 0.012)
    assert cached.predict(5000) == pytest.approx(0.012)


def test_the_gaps_spread_is_learned_as_a_quantile_of_the_recent_residuals() -> None:
    # decay 0: the mean is the last gap seen, so each residual is the gap less the gap before it
    gap = HandoffGap(decay=0.0, quantile=0.99, window=3)
    gap.observe(0, 0.0, 0.040)
    assert gap.high(0) == pytest.approx(0.040)  # no residual yet: the mean
    gap.observe(0, 0.0, 0.060)  # residual +20 ms
    gap.observe(0, 0.0, 0.040)  # -20 ms
    gap.observe(0, 0.0, 0.042)  # +2 ms
    # residuals [+20, -20, +2] ms: fewer than 100, so the 0.99 quantile is the largest
    assert gap.predict(0) == pytest.approx(0.042)
    assert gap.high(0) == pytest.approx(0.042 + 0.020)
    median = HandoffGap(decay=0.0, quantile=0.5, window=3)
    for seen in (0.040, 0.060, 0.040, 0.042):
        median.observe(0, 0.0, seen)
    assert median.high(0) == pytest.approx(0.042 + 0.002)  # sorted [-20, +2, +20]: index int(1.5) = 1
    gap.observe(0, 0.0, 0.042)  # residual 0: the window of 3 lets the +20 go: [-20, +2, 0]
    assert gap.high(0) == pytest.approx(0.042 + 0.002)
    # a gap that comes in under its mean does not bring the high estimate under the mean
    low = HandoffGap(decay=0.0)
    low.observe(0, 0.0, 0.050)
    low.observe(0, 0.0, 0.030)
    assert low.high(0) == pytest.approx(0.030)
    # the transfer part scales with the tokens as in predict; the spread is added as seconds
    moved = HandoffGap(decay=0.0)
    moved.observe(1000, 0.020, 0.030)  # 20 us/token, 10 ms of the rest
    moved.observe(1000, 0.020, 0.036)  # predicted 30 ms: residual +6 ms; mean now 20 us/token + 16 ms
    assert moved.high(2000) == pytest.approx(2000 * 20e-6 + 0.016 + 0.006)


def test_a_few_outliers_move_the_high_estimate_only_with_a_quantile_under_one() -> None:
    # 200 handoffs alternating 40 / 44 ms (residuals +-4 ms), then one that waited 5 s for a decode seat
    # and two back at 40 / 44 ms: the 0.99 quantile of 202 residuals (the first handoff has none) is the
    # third largest, 4 ms
    gap = HandoffGap(decay=0.0, quantile=0.99)
    full = HandoffGap(decay=0.0)  # the default: the largest residual of the window
    for g in (gap, full):
        for i in range(200):
            g.observe(0, 0.0, 0.040 if i % 2 == 0 else 0.044)
        for seen in (5.0, 0.040, 0.044):
            g.observe(0, 0.0, seen)
    assert gap.high(0) == pytest.approx(0.044 + 0.004)
    # the default takes the outlier's residual (5 - 0.044 s): the hold then holds, as long as the mean (44 ms)
    # fits in the TTFT left; it costs no target (the hold ends there at the latest)
    assert full.high(0) == pytest.approx(0.044 + 5.0 - 0.044)
    assert first_token_hold_s("auto", full.high(0), ITL_S, 1.5, mean_gap_s=full.predict(0)) == 1.5


def test_the_default_high_estimate_is_the_largest_recent_residual() -> None:
    # 200 handoffs alternating 44 / 46 ms (residuals +-2 ms), one at 54 ms (+8 ms), back to 44 (-10) and 46 (+2):
    # the mean is the last gap, 46 ms. The largest residual puts the high estimate at 46 + 8 = 54 ms, over the
    # 50 ms target: held. The 0.99 quantile of the 202 residuals is the third largest, +2 ms: 48 ms, not held,
    # and a short answer's one gap like the 54 ms one fails its p99 ITL (H200 mix shift, planner-both: 31 ITL
    # misses with the 0.99 quantile, 7 with the largest).
    default, q99 = HandoffGap(decay=0.0), HandoffGap(decay=0.0, quantile=0.99)
    assert default.quantile == 1.0 and default.window == 256
    for g in (default, q99):
        for i in range(200):
            g.observe(0, 0.0, 0.044 if i % 2 == 0 else 0.046)
        for seen in (0.054, 0.044, 0.046):
            g.observe(0, 0.0, seen)
    assert default.predict(0) == pytest.approx(0.046) and q99.predict(0) == pytest.approx(0.046)
    assert default.high(0) == pytest.approx(0.054)
    assert q99.high(0) == pytest.approx(0.048)
    assert first_token_hold_s("auto", default.high(0), ITL_S, 1.5, mean_gap_s=default.predict(0)) == 1.5
    assert first_token_hold_s("auto", q99.high(0), ITL_S, 1.5, mean_gap_s=q99.predict(0)) == 0.0


def test_auto_holds_when_the_spread_puts_the_high_estimate_over_the_target_though_the_mean_is_under() -> None:
    # the mix shift on the H200 replay: gaps of 36-52 ms around a 44 ms mean, a wait for the decode
    # worker's next step plus a step; a short answer (under 101 tokens) fails its p99 ITL on one gap
    spread = HandoffGap(decay=0.0)
    for seen in (0.036, 0.052, 0.036, 0.052, 0.044):
        spread.observe(0, 0.0, seen)
    # residuals +16, -16, +16, -8 ms: the mean (44 ms) is under 50 ms, the high estimate 60 ms over it
    assert spread.predict(0) == pytest.approx(0.044) and spread.high(0) == pytest.approx(0.060)
    assert first_token_hold_s("auto", spread.predict(0), ITL_S, 1.5) == 0.0
    assert first_token_hold_s("auto", spread.high(0), ITL_S, 1.5) == 1.5
    # a tight gap under the target: nothing held (residuals +-2 ms around 44 ms: high 46 ms)
    tight = HandoffGap(decay=0.0)
    for seen in (0.043, 0.045, 0.043, 0.045, 0.044):
        tight.observe(0, 0.0, seen)
    assert tight.high(0) == pytest.approx(0.046)
    assert first_token_hold_s("auto", tight.high(0), ITL_S, 1.5) == 0.0
    # a long answer is still spared by its mean ITL (64 tokens at 30 ms: (60 + 62 * 30) / 63 = 30.5 ms)
    assert first_token_hold_s("auto", spread.high(0), ITL_S, 1.5, num_tokens=64, itl_s=0.030) == 0.0
