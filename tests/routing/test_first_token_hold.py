"""The router's first-token hold (``first_token_hold``), pure: the rule that decides how long a
handed-off request's first token may wait for the decode worker's first, and what the router
learns of that gap, on hand-computed cases. The router process holding one: tests/router/
test_model_readiness.py; the replay doing the same: tests/bench/test_replay_first_token_hold.py."""

from __future__ import annotations

import pytest

from router.policy import HandoffGap, first_token_hold_s

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
