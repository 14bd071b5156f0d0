"""The prefill tier's sizing keeps the router's spill point rarer than a TTFT miss (``Profile.prefill_workers``):
a prompt spilled to a decode worker breaks the ITL of every request decoding there, not one request's TTFT."""

import math

import pytest
from plannerlib import profile

from planner.profile import PREFILL_SPILL_QUANTILE, PREFILL_TTFT_QUANTILE, Profile


def test_the_spill_point_is_kept_at_its_own_stricter_quantile() -> None:
    p = profile()  # prefill: 0.01 + 1e-4 x ISL s alone, 9090.9 tokens/s busy; 1000 tokens a step
    assert (PREFILL_TTFT_QUANTILE, PREFILL_SPILL_QUANTILE) == (0.99, 0.998)
    rate = 9090.9 / 1000  # 1000-token prompts of 0.11 s each: one busy worker
    # spill point: 8 steps x 1000 tokens / 9090.9 tokens/s = 0.88 s = 8 services; TTFT slack 2 - 0.11 = 1.89 s.
    # M/M/c, load 1: ln P(wait > 0.88) at c = 2 is ln C(2, 1) - (2 - 1) x 8 = ln(1/3) - 8 = -9.0986, at c = 1 it
    # is 0 (saturated): interpolated, 99% at 1 + 4.6052 / 9.0986 = 1.5061 (the rule before: one quantile, both
    # slacks' shorter); 99.8% at 1 + 6.2146 / 9.0986 = 1.6830
    assert p.prefill_workers(rate, 1000, math.nan, 2.0) == pytest.approx(1.6830, abs=2e-4)
    assert p.prefill_workers(rate, 1000, math.nan, 2.0, spill_quantile=0.99) == pytest.approx(1.5061, abs=2e-4)
    # a TTFT target tighter than the spill point binds instead: slack 0.5 - 0.11 = 0.39 s = 3.5455 services;
    # ln C(2, 1) - 3.5455 = -4.6441 under ln 0.01: 1 + 4.6052 / 4.6441 = 1.9916 (> 1.6830 of the spill point)
    assert p.prefill_workers(rate, 1000, math.nan, 0.5) == pytest.approx(1.9916, abs=2e-4)


def test_the_mix_shifts_first_interval_gets_the_prefill_worker_its_start_lacked() -> None:
    # bench/planner.py's start for the mix shift: the first 20 s, 38.8 prompts/s of mean 5985 tokens (p95 11794).
    # Sized with 8 prefill workers, a two-second burst at t = 35 s (300-344k prompt tokens/s against 294k) queued
    # past the spill point on every worker; the spilled prompts' chunks slowed both decode workers' steps to
    # 55-85 ms and 43 requests missed their ITL. The rule asks for 9.
    p = Profile.load("h200-llama-3.1-8b")
    assert math.ceil(p.prefill_workers(38.8, 5985, 11794, 2.0, spill_quantile=0.99)) == 8
    assert math.ceil(p.prefill_workers(38.8, 5985, 11794, 2.0)) == 9
