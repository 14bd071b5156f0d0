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
