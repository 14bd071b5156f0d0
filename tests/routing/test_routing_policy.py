"""The routing policy: exact choices for hand-computed costs, tie-breaking, temperature, the
decode tier's local-prefill rule, the default prefill weight, and the KV-unaware baselines.
Costs written as sums are at ``prefill_load_scale`` 1 unless a test says otherwise."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.policy import POLICIES, PREFILL_LOAD_SCALE, WorkerLoad, choose, follows_prefill, kv_costs, lowest_cost
from runtime.settings import ClusterConfig

BS = 16


def load(worker_id: str, active_blocks: int = 0, prefill_tokens: int = 0, requests: int = 0) -> WorkerLoad:
    return WorkerLoad(worker_id, num_inflight=requests, num_inflight_prefill_tokens=prefill_tokens,
                      num_active_blocks=active_blocks)


def test_worked_example_picks_the_second_worker() -> None:
    """A 10-block prompt. Costs (prefill blocks + decode blocks): 8+10, 5+5, 2+9 -> the second.
    (At the default weight, 32, the third: 64+9 against 160+5.)"""
    overlaps = {"w1": 2, "w2": 5, "w3": 8}
    loads = [load("w1", active_blocks=10), load("w2", active_blocks=5), load("w3", active_blocks=9)]
    costs = kv_costs(10 * BS, overlaps, loads, BS, prefill_load_scale=1.0)
    assert [(c.new_blocks + c.queued_blocks, c.active_blocks, c.cost) for c in costs] == [
        (8, 10, 18), (5, 5, 10), (2, 9, 11)]
    for seed in range(20):
        d = choose("kv", 10 * BS, overlaps, loads, BS, prefill_load_scale=1.0, rng=random.Random(seed))
        assert (d.worker_id, d.overlap_blocks, d.cost) == ("w2", 5, 10)
    d = choose("kv", 10 * BS, overlaps, loads, BS)
    assert (d.worker_id, d.cost) == ("w3", 2 * 32 + 9)


def test_queued_prefill_and_scale() -> None:
    """Queued prompt tokens count in blocks (rounded up); prefill_load_scale weighs prefill."""
    loads = [load("a", active_blocks=0, prefill_tokens=17), load("b", active_blocks=3)]
    costs = {c.worker_id: c.cost for c in kv_costs(4 * BS, {}, loads, BS, prefill_load_scale=1.0)}
    assert costs == {"a": 4 + 2, "b": 4 + 3}
    costs = {c.worker_id: c.cost for c in kv_costs(4 * BS, {}, loads, BS, prefill_load_scale=0.5)}
    assert costs == {"a": 3.0, "b": 5.0}
    assert choose("kv", 4 * BS, {}, loads, BS, prefill_load_scale=0.5).worker_id == "a"
    assert choose("kv", 4 * BS, {}, loads, BS, prefill_load_scale=2.0).worker_id == "b"  # 12 vs 11


def test_default_weight_keeps_a_cached_prompt_against_a_little_more_decode_load() -> None:
    """The benchmark's case: a 2k-token context (128 blocks) cached on "hot", plus a 4-block new
    message; every request in flight holds about as many blocks (132). At weight 1 one request
    more on "hot" (4 + 132 against 132) sends the prompt away to be recomputed; at the default,
    32, "hot" keeps it until it carries 32 requests more than "cold" (32*4 + A_hot against
    32*132 + A_cold: A_hot - A_cold < 4096) or has more than 128 blocks more queued."""
    assert PREFILL_LOAD_SCALE == ClusterConfig().prefill_load_scale == 32.0
    prompt, overlaps = 132 * BS, {"hot": 128}

    def pick(hot: WorkerLoad, cold: WorkerLoad, **kw) -> tuple[str, float]:
        d = choose("kv", prompt, overlaps, [hot, cold], BS, **kw)
        return d.worker_id, d.cost

    assert pick(load("hot", 132), load("cold", 0), prefill_load_scale=1.0) == ("cold", 132)
    assert pick(load("hot", 132), load("cold", 0)) == ("hot", 32 * 4 + 132)
    assert pick(load("hot", 31 * 132), load("cold", 0)) == ("hot", 32 * 4 + 31 * 132)  # 4220 < 4224
    assert pick(load("hot", 32 * 132), load("cold", 0)) == ("cold", 32 * 132)  # 4352 > 4224
    assert pick(load("hot", 40 * 132), load("cold", 10 * 132)) == ("hot", 32 * 4 + 40 * 132)  # 30 more
    # Queued prompt blocks weigh as much as new ones: 129 queued (2049 tokens, rounded up) lose.
    assert pick(load("hot", 0, prefill_tokens=2049), load("cold", 0)) == ("cold", 32 * 132)
    assert pick(load("hot", 0, prefill_tokens=2032), load("cold", 0)) == ("hot", 32 * (4 + 127))


def test_ties_are_broken_at_random() -> None:
    loads = [load("a", 3), load("b", 3), load("c", 4)]
    picks = Counter(choose("kv", BS, {}, loads, BS, rng=random.Random(s)).worker_id for s in range(200))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 50


def test_temperature_samples_softmax_of_negative_cost() -> None:
    loads = [load("cheap", 0), load("dear", 2)]
    cands = kv_costs(BS, {}, loads, BS)
    rng = random.Random(0)
    picks = Counter(lowest_cost(cands, temperature=1.0, rng=rng).worker_id for _ in range(4000))
    # P(cheap) = 1 / (1 + e^-2) = 0.881
    assert 0.85 < picks["cheap"] / 4000 < 0.91
    picks = Counter(lowest_cost(cands, temperature=1000.0, rng=rng).worker_id for _ in range(4000))
    assert 0.45 < picks["cheap"] / 4000 < 0.55
    assert lowest_cost([], 1.0) is None


def test_decode_tier_counts_overlap_only_where_it_prefills_locally() -> None:
    """Disaggregated: a decode worker that would still compute more than max_local_prefill_tokens
    leaves the prompt to the prefill tier, and its overlap does not count."""
    prompt = 10 * BS  # 160 tokens, max local 48: local only with an overlap of 7+ blocks
    overlaps = {"near": 8, "partial": 5}
    loads = [load("near", active_blocks=6), load("partial", active_blocks=3), load("cold", active_blocks=4)]
    costs = {c.worker_id: c for c in kv_costs(prompt, overlaps, loads, BS, 1.0, max_local_prefill_tokens=48)}
    assert (costs["near"].local_prefill, costs["near"].cost) == (True, 2 + 6)
    assert (costs["partial"].local_prefill, costs["partial"].cost) == (False, 10 + 3)
    assert (costs["cold"].local_prefill, costs["cold"].cost) == (False, 10 + 4)
    d = choose("kv", prompt, overlaps, loads, BS, prefill_load_scale=1.0, max_local_prefill_tokens=48)
    assert (d.worker_id, d.local_prefill, d.overlap_blocks) == ("near", True, 8)
    # Much busier, "near" loses to a remote prefill for "partial" (whose overlap is not used).
    loads[0] = load("near", active_blocks=12)
    d = choose("kv", prompt, overlaps, loads, BS, prefill_load_scale=1.0, max_local_prefill_tokens=48)
    assert (d.worker_id, d.local_prefill) == ("partial", False)
    # -1: the prompt's KV comes from a prefill worker wherever it goes: decode load decides.
    d = choose("kv", prompt, overlaps, loads, BS, prefill_load_scale=1.0, max_local_prefill_tokens=-1)
    assert (d.worker_id, d.local_prefill, d.cost) == ("partial", False, 13)
    # Without a usable prefill tier every worker prefills locally: overlap counts everywhere.
    loads = [load("near", 6), load("partial", 3), load("cold", 4)]  # 2+6, 5+3, 10+4: a tie
    picks = {choose("kv", prompt, overlaps, loads, BS, prefill_load_scale=1.0, rng=random.Random(s)) for s in range(40)}
    assert {(d.worker_id, d.local_prefill, d.cost) for d in picks} == {("near", True, 8), ("partial", True, 8)}


def test_baseline_policies() -> None:
    loads = [load("b", 9, requests=2), load("a", 0, requests=5), load("c", 1, requests=1)]
    assert [choose("round_robin", BS, {}, loads, BS, turn=t).worker_id for t in range(4)] == ["a", "b", "c", "a"]
    assert {choose("random", BS, {}, loads, BS, rng=random.Random(s)).worker_id for s in range(50)} == {"a", "b", "c"}
    assert choose("least_loaded", BS, {}, loads, BS).worker_id == "c"
    # They ignore the index; local prefill is decided from the prompt's length alone.
    d = choose("round_robin", 100, {"a": 6}, loads, BS, max_local_prefill_tokens=64)
    assert (d.worker_id, d.overlap_blocks, d.local_prefill) == ("a", 6, False)
    assert choose("random", 64, {}, loads, BS, max_local_prefill_tokens=64).local_prefill
    for policy in POLICIES:
        assert choose(policy, BS, {}, [], BS) is None
    with pytest.raises(ValueError, match="unknown routing policy"):
        choose("fastest", BS, {}, loads, BS)


def test_a_prefix_on_its_way_is_waited_for_unless_its_prefill_worker_is_sooner() -> None:
    """A 38-block prompt whose first 36 blocks are on their way to decode worker d from prefill
    worker p, 20 of them still to compute there. Waiting: 20 + d's queued + 2 new blocks on d;
    following: p's queued (those 20 among them) + 2 new blocks on p."""
    def costs(d_queued_tokens: int, p_queued_tokens: int):
        local = kv_costs(38 * BS, {"d": 36}, [load("d", prefill_tokens=d_queued_tokens)], BS)[0]
        remote = kv_costs(38 * BS, {"p": 36}, [load("p", prefill_tokens=p_queued_tokens)], BS)[0]
        return local, remote
    assert not follows_prefill(20, *costs(0, 20 * BS))  # a tie (22 each): wait, nothing moves twice
    assert not follows_prefill(20, *costs(0, 30 * BS))  # p has more queued: 32 against 22
    assert follows_prefill(20, *costs(12 * BS, 30 * BS))  # d's own prompts queued: 32 against 34
    assert not follows_prefill(0, *costs(0, 0))  # computed, only moving: 2 against 2
