"""``bench/planner_sim.py``'s host KV tier (``SimConfig.host_kv_gb``): blocks evicted from a
prefill worker's device prefix cache land in its host tier (an LRU of the trace's 512-token
blocks); a prompt whose prefix is there pays a host->GPU copy instead of computing it; the
replay's router counts host-held blocks between a device hit and a recompute; a parked worker
keeps its tier. Expectations by hand, against the sim engine's fitted H200 profile."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.planner_sim import Req, SimConfig, Simulation, StepModel
from bench.planner_workload import TRACE_BLOCK_TOKENS, Arrival, shape
from engine.sim import SimProfile
from planner.observations import WorkerState
from router import policy

SIM = SimProfile.load("h200-llama-3.1-8b")
KV = SimConfig().kv_bytes_per_token
BLOCK_GB = TRACE_BLOCK_TOKENS * KV / 1e9  # one trace block of KV (64 MiB)


def host_gb(num_blocks: int) -> float:
    return num_blocks * BLOCK_GB + 1e-9


def test_device_evictions_fill_the_host_tier_lru_and_a_prefix_spans_both() -> None:
    # room for 2 blocks on the device, 2 in the host tier
    sim = Simulation(SimConfig(kv_capacity_tokens=2 * TRACE_BLOCK_TOKENS, host_kv_gb=host_gb(2)), StepModel(SIM))
    assert sim.host_blocks == 2
    w = sim.add_worker("prefill", 0.0)
    w._insert_cache((1, 2, 3))
    assert list(w.cache) == [2, 3] and list(w.host) == [1]  # the oldest went to the host
    w._insert_cache((4, 5))
    assert list(w.cache) == [4, 5] and list(w.host) == [2, 3]  # 1 out of the host's LRU end
    # a prompt over blocks 2 (host) 3 (host) 4 (device) 9 (nowhere): 1 device block, 2 host blocks
    assert w.prefix_tokens((2, 3, 4, 9), 4 * TRACE_BLOCK_TOKENS) == (TRACE_BLOCK_TOKENS, 2 * TRACE_BLOCK_TOKENS)
    # the last prompt token is always computed: taken from the last block found (a host one here)
    assert w.prefix_tokens((4, 2), 2 * TRACE_BLOCK_TOKENS) == (TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS - 1)
    assert w.prefix_tokens((9, 4), 2 * TRACE_BLOCK_TOKENS) == (0, 0)
    # a host hit is a use: 2 becomes the most recent, so the next eviction pushes 3 out
    w.add_job(Req(0, Arrival(0.0, 2 * TRACE_BLOCK_TOKENS + 1, 1, (2, 7, 8))), 0.0)
    assert list(w.host) == [3, 2]
    w.jobs.clear()
    w.busy = False
    w._insert_cache((6,))  # evicts 4 to the host: 3 is the least recent there
    assert list(w.host) == [2, 4]
    off = Simulation(SimConfig(kv_capacity_tokens=2 * TRACE_BLOCK_TOKENS), StepModel(SIM)).add_worker("prefill", 0.0)
    off._insert_cache((1, 2, 3))
    assert list(off.cache) == [2, 3] and not off.host  # the tier off: an eviction is gone


def repeat_ttft(cfg: SimConfig) -> tuple[float, Simulation]:
    """A 2050-token prompt (4 whole blocks + 2 tokens) at 0 s, a 1537-token one (3 blocks + 1) at
    2 s, the first again at 5 s: each alone on the worker."""
    sim = Simulation(cfg, StepModel(SIM))
    sim.add_worker("prefill", 0.0)
    sim.add_worker("decode", 0.0)
    a = Arrival(0.0, 2050, 2, (1, 2, 3, 4, 5))
    reqs = [Req(0, a), Req(1, Arrival(2.0, 1537, 2, (21, 22, 23, 24))), Req(2, Arrival(5.0, a.isl, a.osl, a.hashes))]
    for r in reqs:
        sim.push(r.arrival.t, "arrive", r)
    sim.run_until(math.inf)
    assert all(r.good(cfg.ttft_s) for r in reqs)
    return reqs[2].ttft, sim


def test_a_host_hit_pays_its_copy_less_than_a_recompute_more_than_a_device_hit() -> None:
    # 3000 tokens of KV: room for 5 cached blocks. The first prompt leaves 1-4, the second 21-23:
    # 1 and 2 are evicted (to the host tier when there is one), 3 and 4 stay on the GPU
    small = dict(kv_capacity_tokens=3000, first_token_hold="off")
    recompute = SIM.step_time_s([(2048, 0)], []) + SIM.step_time_s([(2, 2048)], [])  # 2048-token chunks
    device = SIM.step_time_s([(2, 2048)], [])  # 4 blocks cached on the GPU: 2 tokens to compute
    copy = 2 * TRACE_BLOCK_TOKENS * KV / (50.0 * 1e9)  # blocks 1-2 back from the host at 50 GB/s: 2.7 ms
    off, sim_off = repeat_ttft(SimConfig(**small))
    on, sim_on = repeat_ttft(SimConfig(**small, host_kv_gb=host_gb(8), host_offload_charged=False))
    big, sim_big = repeat_ttft(SimConfig(first_token_hold="off"))  # 100 GiB: nothing evicted
    assert off == pytest.approx(recompute)  # block 1 gone: the whole prompt computed again
    assert on == pytest.approx(device + copy)
    assert big == pytest.approx(device)
    assert big < on < off
    assert sim_off.hit_tokens == [0, 0]
    assert sim_on.hit_tokens == [2 * TRACE_BLOCK_TOKENS, 2 * TRACE_BLOCK_TOKENS]
    assert sim_big.hit_tokens == [4 * TRACE_BLOCK_TOKENS, 0]
    # the evictions' offloads (blocks 1-2, at the second prompt's end) go before the worker's next
    # step: the third prompt's, which pays them with its own loads
    charged, _ = repeat_ttft(SimConfig(**small, host_kv_gb=host_gb(8)))
    assert charged == pytest.approx(device + 2 * copy) and charged < off
    slow, _ = repeat_ttft(SimConfig(**small, host_kv_gb=host_gb(8), host_gbps=5.0))
    assert slow == pytest.approx(device + 20 * copy)


@pytest.mark.parametrize("weight", [None, 0.5])
def test_the_router_counts_a_host_block_between_a_device_hit_and_none(weight: float | None) -> None:
    sim = Simulation(SimConfig(host_kv_gb=host_gb(8), host_overlap_weight=weight), StepModel(SIM))
    device, host, empty = (sim.add_worker("prefill", 0.0) for _ in range(3))
    sim.add_worker("decode", 0.0)
    hashes = (11, 12, 13, 14, 15)
    a = Arrival(0.0, 2050, 2, hashes)  # 129 router blocks, the first 128 held (4 trace blocks)
    for h in hashes[:4]:
        device.cache[h] = None
        host.host[h] = None
    workers = (device, host, empty)
    overlaps = {w.id: sim._overlap(w, a) for w in workers}
    loads = [policy.WorkerLoad(w.id) for w in workers]
    costs = {c.worker_id: c.cost for c in policy.kv_costs(a.isl, overlaps, loads, 16)}
    scale = policy.PREFILL_LOAD_SCALE
    # unset: the router's weight (tier11's router.policy.HOST_BLOCK_WEIGHT where the build has it: a
    # host block costs 0.1 of a new one), else the replay's 0.9 of a device hit: the same cost
    host_cost = 1 + (getattr(policy, "HOST_BLOCK_WEIGHT", 0.1) * 128 if weight is None else 0.5 * 128)
    assert costs == pytest.approx({device.id: scale * 1, host.id: scale * host_cost, empty.id: scale * 129})
    sim.arrive(Req(0, a), 0.0)
    assert [len(w.jobs) for w in (device, host, empty)] == [1, 0, 0]
    device.state = WorkerState.DRAINING  # the device holder gone: the host holder beats the empty one
    sim.arrive(Req(1, a), 0.0)
    assert [len(w.jobs) for w in (device, host, empty)] == [1, 1, 0]
    assert host.jobs[0].host == 4 * TRACE_BLOCK_TOKENS and host.jobs[0].cached == 4 * TRACE_BLOCK_TOKENS


@pytest.mark.parametrize("pool", [1, 0])
def test_a_parked_worker_keeps_its_host_tier_not_its_device_cache(pool: int) -> None:
    sim = Simulation(SimConfig(host_kv_gb=host_gb(8), warm_pool=pool), StepModel(SIM))
    if pool:
        sim.add_worker("prefill", 0.0, ready=False)  # takes the pool's parked worker: the pool has room
    w = sim.add_worker("prefill", 0.0)
    w.cache[1] = None
    w.host[2] = None
    w.state = WorkerState.DRAINING
    sim.maybe_release(w, 1.0)
    assert w.id not in sim.workers and len(sim.parked) == pool
    woken = sim.add_worker("prefill", 20.0, ready=False)
    assert not woken.cache  # a GPU's cache does not survive a park
    assert list(woken.host) == ([2] if pool else [])  # the host memory does; an exit loses it


def replay(cfg: SimConfig, arrivals: list[Arrival]) -> tuple[list[tuple], Simulation]:
    sim = Simulation(cfg, StepModel(SIM))
    for role in ("prefill", "prefill", "decode"):
        sim.add_worker(role, 0.0)
    reqs = [Req(i, a) for i, a in enumerate(arrivals)]
    for r in reqs:
        sim.push(r.arrival.t, "arrive", r)
    sim.run_until(math.inf)
    return [(r.ttft, r.done_t, r.n_gaps, r.n_over) for r in reqs], sim


def test_the_tier_changes_nothing_where_no_prefix_comes_back() -> None:
    # a built-in shape's prompts share nothing: a tier that evictions fill and nothing reads must
    # leave every request's times as they are with the tier off (a small device cache, 20000 tokens:
    # it evicts, and its room binds, so a tier that took any of it would show)
    # (the offloads' copies left out: they cost time where nothing comes back, checked after)
    w = shape("flat", duration_s=20.0, scale=0.5)
    cfg = SimConfig(kv_capacity_tokens=20_000)
    on = SimConfig(kv_capacity_tokens=20_000, host_kv_gb=50.0, host_offload_charged=False)
    base, _ = replay(cfg, w.arrivals)
    same, sim = replay(on, w.arrivals)
    assert sim.host_blocks == 745 and len(base) > 300
    assert sum(len(x.host) for x in sim.workers.values()) > 100  # evictions did fill it
    assert same == base
    charged, _ = replay(replace(on, host_offload_charged=True), w.arrivals)
    assert charged != base  # (timed by hand in the repeat test above)


@pytest.mark.parametrize("tail_first", [False, True])
def test_which_end_of_a_prompt_the_device_cache_evicts_first(tail_first: bool) -> None:
    cfg = SimConfig(kv_capacity_tokens=2 * TRACE_BLOCK_TOKENS, host_kv_gb=host_gb(4),
                    cache_evicts_tail_first=tail_first)
    w = Simulation(cfg, StepModel(SIM)).add_worker("prefill", 0.0)
    w._insert_cache((1, 2, 3))
    isl = 3 * TRACE_BLOCK_TOKENS + 1
    if tail_first:  # the engine's order: the tail goes, the head (what a later prompt can use) stays
        assert set(w.cache) == {1, 2} and list(w.host) == [3]
        assert w.prefix_tokens((1, 2, 3), isl) == (2 * TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS)
    else:  # the replay as it was: the head goes first, the tail left on the GPU is of no use alone
        assert set(w.cache) == {2, 3} and list(w.host) == [1]
        assert w.prefix_tokens((1, 2, 3), isl) == (2 * TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS)
        w.host.clear()
        assert w.prefix_tokens((1, 2, 3), isl) == (0, 0)
