"""The first-token hold's fit in the TTFT headroom is judged on the gap's mean, not its high estimate: a few
handoffs that waited seconds for a decode seat put the high estimate over the headroom, and then no handoff was
held (bench/planner.py, Mooncake, planner-load with a warm pool: ITL misses 68 -> 150)."""

import pytest

from router.policy import HandoffGap, first_token_hold_s

ITL_S = 0.05


def test_a_seat_wait_outlier_does_not_stop_the_hold() -> None:
    gap = HandoffGap(decay=0.0)  # the mean is the last gap seen: computed by hand
    gap.observe(0, 0.0, 0.08)
    gap.observe(0, 0.0, 3.0)  # waited for a seat: residual 3.0 - 0.08 = 2.92
    gap.observe(0, 0.0, 0.08)  # residual 0.08 - 3.0 = -2.92
    assert gap.predict(0) == pytest.approx(0.08)
    # fewer than 1 / (1 - 0.99) residuals: the largest, 2.92, over the mean
    assert gap.high(0) == pytest.approx(3.0)
    # the high estimate says "over the target", the mean says "fits in 1.5 s": held for the headroom
    assert first_token_hold_s("auto", gap.high(0), ITL_S, 1.5, mean_gap_s=gap.predict(0)) == 1.5
    # without the mean the high estimate must fit, as before: not held
    assert first_token_hold_s("auto", gap.high(0), ITL_S, 1.5) == 0.0
    # a mean that does not fit: not held; a high estimate under the target: not held whatever the mean
    assert first_token_hold_s("auto", 3.0, ITL_S, 1.5, mean_gap_s=1.6) == 0.0
    assert first_token_hold_s("auto", 0.04, ITL_S, 1.5, mean_gap_s=0.03) == 0.0
    # the long-answer exemption still reads the high estimate: 3.0 + 62 x 0.03 > 63 x 0.05: held
    assert first_token_hold_s("auto", 3.0, ITL_S, 1.5, num_tokens=64, itl_s=0.03, mean_gap_s=0.08) == 1.5

