"""The planner core on an aggregated cluster: one tier of workers that prefill and decode
(registered as decode), sized against both targets; worked out by hand from plannerlib's profile
as in test_planner_modes (the same loads, where a disaggregated planner would grow the prefill tier)."""

import math

import pytest
from plannerlib import config, observe, profile, tier, window

from planner import ActionKind, Planner, PlannerConfig
from planner.service import planner_config
from runtime.settings import ClusterConfig


def agg(**kw):
    return config(**({"aggregated": True, "min_prefill": 0} | kw))


def actions(decision) -> list[tuple[ActionKind, str]]:
    return sorted((a.kind, a.role) for a in decision.actions)


def test_load_mode_adds_a_worker_when_itl_is_over_the_slo() -> None:
    # 100 running sequences of 40000 tokens: 0.01 + 0.01 + 1e-8 * 4e6 = 0.06 s > 50 ms -> +1.
    planner = Planner(agg(mode="load"), profile())
    d = planner.tick(observe(10.0, tier("decode", 2, num_running=100, num_active_kv_tokens=4_000_000, kv_usage=0.4),
                             window(5.0)))
    assert (d.num_prefill, d.num_decode) == (0, 3) and actions(d) == [(ActionKind.START, "decode")]
    itl = next(r for r in d.reasons if r.code == "itl-over-slo")
    assert itl.role == "decode" and math.isclose(itl.values["itl_s"], 0.06, rel_tol=1e-6)


def test_load_mode_adds_a_worker_when_the_prompt_queue_makes_ttft_miss() -> None:
    # 30000 queued prompt tokens + a 1000-token prompt: 31 steps x 0.01 + 1e-4 x 31000 = 3.41 s > 2 s.
    # Disaggregated, this starts prefill workers; here the one tier grows, and no prefill tier appears.
    # By the need: 60000 queued over N + 1000 within 2 s: N=3: 2.31 s, N=4: 1.76 s -> 4, two starts.
    planner = Planner(agg(mode="load"), profile())
    d = planner.tick(observe(10.0, tier("decode", 2, num_queued_prefill_tokens=30000), window(5.0, isl=1000)))
    assert (d.num_prefill, d.num_decode) == (0, 4) and actions(d) == [(ActionKind.START, "decode")] * 2
    ttft = next(r for r in d.reasons if r.code == "ttft-over-slo")
    assert ttft.role == "decode" and math.isclose(ttft.values["ttft_s"], 3.41, rel_tol=1e-6)


def test_load_mode_shrinks_only_when_both_targets_would_hold_with_one_fewer() -> None:
    # Decode side: 3 workers at 500 tok/s of 10 sequences of 1000 tokens; with 2, steady ITL 10.9 ms < 40 ms:
    # low (test_planner_modes). Prompt side: 15000 queued tokens each, TTFT 16 x 0.01 + 1e-4 x 16000 = 1.76 s
    # (met), but spread over 2 workers 22500 + 1000 tokens: 24 x 0.01 + 2.35 = 2.59 s > 0.8 x 2 s: not low.
    quiet = dict(num_running=10, num_active_kv_tokens=10_000, kv_usage=0.01, decode_tokens_per_s=500.0,
                 tokens_per_s=500.0)
    planner = Planner(agg(mode="load"), profile())
    for now in (10.0, 20.0, 30.0):
        d = planner.tick(observe(now, tier("decode", 3, num_queued_prefill_tokens=15000, **quiet), window(5.0)))
        assert not d.actions, d
    # without the prompt queue both are low: one worker fewer, on the second low tick
    planner = Planner(agg(mode="load"), profile())
    first = planner.tick(observe(10.0, tier("decode", 3, **quiet), window(5.0)))
    assert not first.actions
    second = planner.tick(observe(20.0, tier("decode", 3, **quiet), window(5.0)))
    assert (second.num_prefill, second.num_decode) == (0, 2) and actions(second) == [(ActionKind.DRAIN, "decode")]


def test_throughput_mode_sizes_the_one_tier_for_both_needs() -> None:
    # test_planner_modes' forecast: 20 req/s of 1000 + 500 tokens needs 2.75 prefill and 2.66 decode
    # workers' time; an aggregated worker shares its time between the two: ceil(5.41) = 6 workers.
    planner = Planner(agg(), profile())
    d = planner.tick(observe(10.0, tier("decode", 1), window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (0, 6)
    assert actions(d) == [(ActionKind.START, "decode")] * 5
    # the budget is the tier's ceiling
    planner = Planner(agg(gpu_budget=4), profile())
    d = planner.tick(observe(10.0, tier("decode", 1), window(20.0, 1000, 500)))
    assert (d.num_prefill, d.num_decode) == (0, 4) and "budget-clamp" in d.codes()


def test_an_aggregated_cluster_gets_an_aggregated_planner() -> None:
    p = planner_config(ClusterConfig(mode="aggregated"), 2)
    assert p.aggregated and p.min_prefill == 0
    assert not planner_config(ClusterConfig(), 2).aggregated
    with pytest.raises(ValueError, match="no prefill tier"):
        PlannerConfig(aggregated=True, min_prefill=1)
