"""Discrete-event replay of a tandem cluster for ``bench/planner.py``: one process, simulated time.

What is modelled, after the real code:

- step times: ``engine.sim.SimProfile.step_time_s`` (the sim engine's fitted timing model);
- a prefill worker: the scheduler's FCFS chunked prefill (``max_num_batched_tokens`` per step,
  the oldest prompt first), a prefix cache of the trace's 512-token blocks (LRU, in the KV memory
  left over), KV pinned after the prefill until the decode worker has pulled it;
- a decode worker: continuous batching in admission order under the same token budget, at most
  ``max_num_seqs`` running, a KV capacity: a request handed over without room is recomputed
  locally (``Scheduler.add_prefilled``), a running request without a block preempts the latest
  admitted one (freed, recomputed later), prompts too long to be worth a remote prefill
  (``max_local_prefill_tokens``) or arriving while the prefill tier is saturated prefill locally
  in chunks, mixed with the decodes;
- the router: ``router.policy`` (the KV-aware cost, the saturation test) picks the workers; the
  first token comes from the prefill worker; the decode worker pulls the prompt's KV
  (``kv_gbps``, one pull per request) before its first decode step; the router's first-token
  hold (``first_token_hold``: ``policy.first_token_hold_s`` on the gap ``policy.HandoffGap``
  learns from the handoffs seen, as the router does) keeps the first token until the decode
  worker's first, or until the TTFT target if that comes first;
- the launcher: a new worker serves ``startup_s`` after it is started; a drained worker takes no
  new request and frees its GPU when it has finished what it holds; a switching worker does the
  same and serves the other tier ``switch_s`` later;
- the warm pool (``warm_pool`` > 0): a drained worker does not exit while fewer than ``warm_pool``
  are parked: it parks (its weights to host memory, ``park_s`` more on its GPU, then none) and a
  later start takes the parked worker that has waited longest, serving ``wake_s`` after it is
  started instead of ``startup_s``; the pool is full at the start (``warm_pool`` workers that
  loaded and parked before the replay: their load, ``startup_s`` each, is counted in GPU-hours);
  parked workers hold no GPU, count no GPU-hours and no place in the GPU budget;
- a handoff to a decode worker whose seats are all taken (``max_num_seqs`` running) but with KV
  room: ``seats_full="wait"`` (the engine's ``Scheduler.add_prefilled``) pulls its KV and waits
  for a seat, its KV held, then decodes from its first token; ``"recompute"`` (the engine before
  it) queues it to recompute its prompt there;
- the host KV tier (``host_kv_gb`` > 0; issue 13, after tier11's engine tier): each prefill worker
  has an LRU of the trace's 512-token blocks in host DRAM, ``host_kv_gb`` GB (1e9 bytes) of it, in
  blocks of ``kv_bytes_per_token`` x 512 (the engine's setting, ``host_kv_cache_gib``, is in GiB).
  Assumed, as the engine does: a block evicted from the worker's device prefix cache is copied there
  unless the tier holds it already (inclusive); a prompt's prefix is its leading blocks each found
  on the device or in the host tier (in any mix); the host ones are copied back, not computed, and
  count as cached tokens in the worker's step summary; the host copy stays (a use, LRU). Copies take
  ``host_gbps`` (50 GB/s: pinned memory over PCIe Gen5 x16, of 64 nominal; not measured here) on
  the worker's step: a prompt's loads in the step its prefill starts, the evictions' offloads in
  the worker's next step (the engine runs both on the compute stream between steps;
  ``host_offload_charged`` False: offloads free, as if overlapped). Decode workers have no prefix
  cache here, so no tier either (the engine's decode workers have one: not modelled). The tier is
  the process's host memory: a tier switch keeps it, a park keeps it (the worker that wakes gets it
  back), an exit loses it; the device cache is lost in all three (nothing is offloaded on a park).
  The router's KV-aware cost (``router.policy.kv_costs``) sees the host-held blocks as the router
  does where this build's router knows the host tier (tier11's ``router.kv_index.Overlap`` with its
  ``num_host``, each costing ``router.policy.HOST_BLOCK_WEIGHT``, 0.1, of a new block); without it,
  or with ``host_overlap_weight`` set, a host block counts that fraction of a device hit in the
  overlap (unset: 0.9, the same cost). Either agrees with the tier here: a 512-token block's copy,
  1.3 ms at 50 GB/s, is 3-12% of its compute on the H200 profile (11-44 ms by context).

Pure-decode stretches are advanced in closed form (every step emits one token per running
request and the step time grows linearly with the KV read), so an hour of traffic takes minutes.
A request's inter-token gaps are counted exactly: it is good when its TTFT and the 99th
percentile (nearest rank) of its gaps meet the targets.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from bench.planner_worker import Worker
from bench.planner_workload import TRACE_BLOCK_TOKENS, Arrival
from planner.observations import RouterWindow, WorkerState
from router import kv_index, policy

BLOCK = 16  # the router's KV block size (tokens)
# the router's overlap with its host-tier blocks (tier11's router.kv_index.Overlap), where this build has it
ROUTER_OVERLAP = getattr(kv_index, "Overlap", None)


@dataclass(frozen=True)
class SimConfig:
    ttft_s: float = 2.0
    itl_s: float = 0.05
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 819_200  # per worker: 100 GiB of Llama-3.1-8B KV
    kv_bytes_per_token: int = 131_072
    kv_gbps: float = 50.0  # one pull's bandwidth, GB/s (a 400 Gb/s RDMA NIC per GPU)
    kv_latency_s: float = 0.002
    max_local_prefill_tokens: int = 64
    first_token_hold: str = "auto"  # the router's setting (runtime.settings): auto, on, off
    seed: int = 0  # the router's random tie-breaks between equally good workers
    # the router prefills on the decode worker when every prefill worker has more than this queued
    # (router/core.py: 8 x max_num_batched_tokens); 0: that rule
    prefill_queue_limit_tokens: int = 0
    startup_s: float = 60.0
    switch_s: float = 2.0
    warm_pool: int = 0  # parked workers the launcher keeps (0: a drained worker exits)
    # measured on an H200 with Llama-3.1-8B's shapes (bench/planner_park.py): unpark 3.4-4.9 s (weights
    # 0.56 s at 29 GB/s, KV 0.08 s, decode graphs 2.8-4.3 s), park 7.3-12.5 s (pinned host copies)
    wake_s: float = 5.0  # a parked worker's start: weights host->GPU, KV re-allocated, graphs, registered
    park_s: float = 10.0  # a drained worker's park: weights GPU->host, on its GPU still
    seats_full: str = "wait"  # a handoff when every decode seat is taken, with KV room: or "wait"
    max_segment_steps: int = 256
    fast_forward: bool = True  # False: every step one at a time (the closed form's reference)
    # the host KV tier of a prefill worker (module docstring): its capacity, GB (1e9 bytes) of host DRAM
    # per worker (0: off); an H200 node has ~2 TB for 8 GPUs, so up to ~200 GB each
    host_kv_gb: float = 0.0
    host_gbps: float = 50.0  # its copies host<->GPU, GB/s (pinned memory over PCIe Gen5 x16: ~50 of 64 nominal)
    # an eviction's copy to the host tier takes its time before the worker's next step (the engine
    # runs its tier copies on the compute stream between steps); False: free (overlapped)
    host_offload_charged: bool = True
    # the router's KV-aware cost counts a host-held prompt block as this fraction of a device hit's
    # overlap (1: as cached on the GPU, 0: as a recompute); None: the router's own (router.policy's
    # HOST_BLOCK_WEIGHT through router.kv_index.Overlap) where this build's router has one, else 0.9
    host_overlap_weight: float | None = None
    # a prompt's blocks in the device prefix cache's LRU: False, its head the least recent (the replay
    # as it was: a full cache evicts a prefix's head first, leaving its tail unusable); True, its tail
    # (as the engine's BlockManager.free does, so the head, the part a later prompt can use, stays)
    cache_evicts_tail_first: bool = False
    # the router's saturation spill only onto decode workers it does not slow (``router.policy.spill_plan``:
    # none decoding, or the prompt within ``max_local_prefill_tokens``); none: the prompt queues on the prefill
    # tier unless that is far behind. The router's setting ``spill_only_to_idle_decode`` (on by default); False:
    # every decode worker a spill target (the router before it).
    spill_idle_only: bool = True


def handoff_bound(cfg: SimConfig, gap_s: float, num_gaps: int, prefill_s: float) -> bool:
    """Whether a handed-off request's first-to-second-token gap (``gap_s``: the KV pull and one
    decode step) alone fails its p99 ITL whatever the deployment: the gap is over the ITL target,
    the answer has too few gaps (< 101) for the 99th percentile to leave that one out, and the
    router's first-token hold does not absorb it (off, or the gap does not fit in the TTFT left
    after the prefill's ``prefill_s``). For ``bench/planner.py``'s ``infeasible()``."""
    if num_gaps <= 0 or num_gaps != math.ceil(0.99 * num_gaps) or gap_s <= cfg.itl_s:
        return False
    return cfg.first_token_hold == "off" or prefill_s + gap_s > cfg.ttft_s


class StepModel:
    """``SimProfile.step_time_s`` for a batch given as prompt chunks plus ``n`` decodes reading
    ``kv`` KV tokens in all (the model is linear in the decodes: one list entry carries the KV)."""

    def __init__(self, sim: object) -> None:
        self.sim = sim
        probe = sim.step_time_s([], [100, 200, 300])
        if not math.isclose(probe, self.time([], 3, 600), rel_tol=1e-9):
            raise ValueError("the sim profile's decode time is not linear in the batch: cannot fast-forward")

    def time(self, prefills: list[tuple[int, int]], n: int, kv: int) -> float:
        if n == 0:
            return self.sim.step_time_s(prefills, [])
        one = self.sim.step_time_s(prefills, [kv])
        return one + (n - 1) * (self.sim.step_time_s([], [0, 0]) - self.sim.step_time_s([], [0]))


@dataclass
class Req:
    rid: int
    arrival: Arrival
    ttft: float = math.nan
    done_t: float = math.nan
    last_t: float = math.nan
    emitted: int = 0
    n_gaps: int = 0
    n_over: int = 0
    rejected: bool = False
    decode_worker: str = ""
    infeasible: bool = False  # no deployment meets its TTFT: bench.planner.infeasible()
    handoff_t: float = math.nan  # handed off: when the prefill's first token came (till the decode's first)
    transfer_s: float = math.nan  # its KV pull (nan: recomputed on the decode worker)
    hold_until: float = math.nan  # its first token held at the router until the decode's first, at most till this

    @property
    def finished(self) -> bool:
        return not math.isnan(self.done_t)

    def good(self, ttft_s: float) -> bool:
        if not self.finished or self.rejected or self.ttft > ttft_s:
            return False
        allowed = self.n_gaps - math.ceil(0.99 * self.n_gaps)  # gaps the 99th percentile may exceed
        return self.n_over <= allowed


def percentiles(values: list[float], *qs: float) -> list[float]:
    if not values:
        return [math.nan] * len(qs)
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] for q in qs]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def router_window(arrivals: int, done: list[Req], interval_s: float, inflight: int) -> RouterWindow:
    isl = [float(r.arrival.isl) for r in done]
    osl = [float(r.arrival.osl) for r in done]
    ttft = [r.ttft * 1000 for r in done]
    itl = [(r.done_t - r.arrival.t - r.ttft) / (r.arrival.osl - 1) * 1000 for r in done if r.arrival.osl > 1]
    i50, i95 = percentiles(isl, 50, 95)
    o50, o95 = percentiles(osl, 50, 95)
    t50, t95, t99 = percentiles(ttft, 50, 95, 99)
    l50, l95, l99 = percentiles(itl, 50, 95, 99)
    return RouterWindow(window_s=interval_s, num_arrivals=arrivals, num_finished=len(done), isl_mean=mean(isl),
                        isl_p50=i50, isl_p95=i95, osl_mean=mean(osl), osl_p50=o50, osl_p95=o95, ttft_ms_p50=t50,
                        ttft_ms_p95=t95, ttft_ms_p99=t99, itl_ms_p50=l50, itl_ms_p95=l95, itl_ms_p99=l99,
                        num_inflight=inflight)


@dataclass
class Simulation:
    """The cluster: workers, the router, the event queue. ``bench/planner.py`` drives it."""

    cfg: SimConfig
    model: StepModel
    workers: dict[str, Worker] = field(default_factory=dict)
    released: list[tuple[float, float]] = field(default_factory=list)  # (gpu_since, until) of gone workers
    events: list = field(default_factory=list)
    done_window: list[Req] = field(default_factory=list)
    num_inflight: int = 0
    seq: itertools.count = field(default_factory=itertools.count)
    rng_turn: itertools.count = field(default_factory=itertools.count)
    rng: random.Random = field(init=False)
    handoff_gap: policy.HandoffGap = field(default_factory=policy.HandoffGap)  # the router's, learned
    parked: list[float] = field(default_factory=list)  # when each parked worker can be woken, oldest first
    num_woken: int = 0
    num_parked: int = 0
    parked_host: list = field(default_factory=list)  # each parked worker's host KV tier (as ``parked``)
    hit_tokens: list[int] = field(default_factory=lambda: [0, 0])  # prompt tokens found: in a device cache, host tier
    num_local_prefill: int = 0  # requests the router sent to prefill on their decode worker

    def __post_init__(self) -> None:
        if self.cfg.seats_full not in ("recompute", "wait"):
            raise ValueError(f"seats_full must be recompute or wait, got {self.cfg.seats_full!r}")
        self.rng = random.Random(self.cfg.seed)  # (the process-wide one made two runs of a replay differ)
        self.parked = [0.0] * self.cfg.warm_pool
        self.parked_host = [OrderedDict() for _ in range(self.cfg.warm_pool)]
        weight = self.cfg.host_overlap_weight
        if self.cfg.host_kv_gb < 0 or self.cfg.host_gbps <= 0 or not (weight is None or 0 <= weight <= 1):
            raise ValueError("host_kv_gb must be >= 0, host_gbps > 0, host_overlap_weight in [0, 1] or None")
        self.host_blocks = int(self.cfg.host_kv_gb * 1e9 // (self.cfg.kv_bytes_per_token * TRACE_BLOCK_TOKENS))
        # the pool's workers loaded on a GPU (a start-up each) before they parked
        self.released += [(0.0, self.cfg.startup_s)] * self.cfg.warm_pool

    def host_copy_s(self, tokens: int) -> float:
        """A copy of ``tokens`` of KV between the host tier and the GPU (either way)."""
        return tokens * self.cfg.kv_bytes_per_token / (self.cfg.host_gbps * 1e9)

    def push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def add_worker(self, role: str, now: float, ready: bool = True) -> Worker:
        w = Worker(self, role, now, ready)
        self.workers[w.id] = w
        if not ready:
            delay = self.cfg.startup_s
            if self.parked and self.parked[0] <= now:  # a parked worker takes its GPU back
                self.parked.pop(0)
                w.host = self.parked_host.pop(0)  # and its host tier, kept while it was parked
                self.num_woken += 1
                delay = self.cfg.wake_s
            self.push(now + delay, "ready", w)
        return w

    def tier(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role and w.state is WorkerState.READY]

    # ---- requests --------------------------------------------------------------------------------
    def arrive(self, req: Req, now: float) -> None:
        self.num_inflight += 1
        decode = self.tier("decode")
        if not decode:
            req.rejected = True
            self.finished(req, now)
            return
        prefill = self.tier("prefill")
        prefill_loads = [policy.WorkerLoad(w.id, len(w.jobs), w.queued_prefill_tokens,
                                           num_active_blocks=policy.blocks(sum(j.req.arrival.isl for j in w.jobs),
                                                                           BLOCK)) for w in prefill]
        limit = self.cfg.prefill_queue_limit_tokens or 8 * self.cfg.max_num_batched_tokens
        remote = bool(prefill) and not policy.prefill_saturated(prefill_loads, limit)
        loads = self._decode_loads(decode, now)
        max_local = self.cfg.max_local_prefill_tokens if remote else None
        if not remote and prefill and self.cfg.spill_idle_only:  # the router's rule (spill_only_to_idle_decode)
            # no decode worker holds a prefix here (the decode tier's overlaps are {}): each computes the whole prompt
            loads, max_local = policy.spill_plan(loads, {w.worker_id: req.arrival.isl for w in loads},
                                                 self.cfg.max_local_prefill_tokens, prefill_loads, limit)
        choice = self._choose_decode(req, loads, max_local)
        req.decode_worker = choice.worker_id
        if choice.local_prefill:
            self.num_local_prefill += 1
            self.workers[choice.worker_id].add_local(req, now)
            return
        overlaps = {w.id: self._overlap(w, req.arrival) for w in prefill}
        pick = policy.choose("kv", req.arrival.isl, overlaps, prefill_loads, BLOCK, rng=self.rng)
        self.workers[pick.worker_id].add_job(req, now)

    def _overlap(self, w: Worker, a: Arrival) -> float:
        """The router's overlap for ``w`` (its 16-token blocks): device-cached blocks count whole,
        host-held ones less (their copy costs less than their compute): as the router counts them
        (an ``Overlap`` with its host blocks, for ``router.policy.kv_costs``) where this build's
        router knows the host tier and no ``host_overlap_weight`` is set, else that weight each
        (0.9 unset: the same cost as a ``HOST_BLOCK_WEIGHT`` of 0.1 of a new block)."""
        dev, host = w.prefix_tokens(a.hashes, a.isl)
        if not host:
            return dev // BLOCK
        weight = self.cfg.host_overlap_weight
        if weight is None and ROUTER_OVERLAP is not None:
            total = (dev + host) // BLOCK
            return ROUTER_OVERLAP(total, total - dev // BLOCK)
        return dev // BLOCK + (0.9 if weight is None else weight) * host / BLOCK

    @staticmethod
    def _decode_loads(decode: list[Worker], now: float) -> list[policy.WorkerLoad]:
        """What the router knows of the decode workers: its requests in flight there (running, waiting for a seat,
        pulling their KV), their prompt tokens to prefill, their KV."""
        return [policy.WorkerLoad(w.id, len(w.running) + len(w.waiting) + w.pulling, w.queued_prefill_tokens,
                                  num_active_blocks=policy.blocks(w.kv_now(now), BLOCK)) for w in decode]

    def _choose_decode(self, req: Req, loads: list[policy.WorkerLoad], max_local: int | None) -> policy.Decision:
        decision = policy.choose("kv", req.arrival.isl, {}, loads, BLOCK, max_local_prefill_tokens=max_local,
                                 rng=self.rng)
        assert decision is not None
        return decision

    def prefilled(self, req: Req, prefill: Worker, now: float) -> None:
        """The prefill worker sampled the first token: the client has it; the decode worker pulls."""
        req.ttft = now - req.arrival.t
        req.last_t = now
        req.emitted = 1
        if req.arrival.osl <= 1:
            prefill.unpin(req.arrival.isl, now)
            self.finished(req, now)
            return
        target = self.workers.get(req.decode_worker)
        if target is None or target.state is not WorkerState.READY or target.role != "decode":
            decode = self.tier("decode")  # the router retries on another decode worker
            if not decode:
                prefill.unpin(req.arrival.isl, now)
                req.rejected = True
                self.finished(req, now)
                return
            target = self.workers[self._choose_decode(req, self._decode_loads(decode, now), -1).worker_id]
            req.decode_worker = target.id
        landed = target.handoff(req, now)
        if landed is None:
            prefill.unpin(req.arrival.isl, now)
        else:
            self.push(landed, "pulled", (target, prefill, req))
        req.handoff_t = now
        req.transfer_s = math.nan if landed is None else landed - now
        hold_s = policy.first_token_hold_s(self.cfg.first_token_hold, self.handoff_gap.high(req.arrival.isl),
                                           self.cfg.itl_s, self.cfg.ttft_s - req.ttft,
                                           mean_gap_s=self.handoff_gap.predict(req.arrival.isl))
        if hold_s > 0:  # the TTFT is known at the decode worker's first token; until then, its bound
            req.hold_until = now + hold_s
            req.ttft = req.hold_until - req.arrival.t

    def decode_token(self, req: Req, t: float) -> None:
        """A decode worker plans a step that samples a token of ``req`` at ``t`` (called when the
        step is planned, in the closed form as one at a time, so both see the same): the first after
        a handoff ends the router's view of the handoff (learned), and its hold: the held first
        token went out with it, or alone at the hold's end if that came first."""
        if math.isnan(req.handoff_t):
            return
        if not math.isnan(req.transfer_s):
            self.handoff_gap.observe(req.arrival.isl, req.transfer_s, t - req.handoff_t)
        if not math.isnan(req.hold_until):
            req.last_t = min(t, req.hold_until)
            req.ttft = req.last_t - req.arrival.t
        req.handoff_t = req.hold_until = math.nan

    def finished(self, req: Req, now: float) -> None:
        req.done_t = now
        self.num_inflight -= 1
        self.done_window.append(req)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def maybe_release(self, w: Worker, now: float) -> None:
        if w.state not in (WorkerState.DRAINING, WorkerState.SWITCHING) or not w.idle:
            return
        if self.workers.get(w.id) is not w:  # already gone
            return
        if w.state is WorkerState.DRAINING:
            del self.workers[w.id]
            if len(self.parked) < self.cfg.warm_pool:  # it parks: its GPU is free once its weights are off it
                self.parked.append(now + self.cfg.park_s)
                self.parked_host.append(w.host)  # its device cache is gone, its host tier stays
                self.num_parked += 1
                now += self.cfg.park_s
            self.released.append((w.gpu_since, now))
        elif not w.releasing:
            w.releasing = True
            self.push(now + self.cfg.switch_s, "switched", w)

    def gpu_seconds(self, now: float) -> float:
        return sum(b - a for a, b in self.released) + sum(now - w.gpu_since for w in self.workers.values())

    def run_until(self, t_end: float) -> None:
        while self.events and self.events[0][0] <= t_end:
            t, _, kind, payload = heapq.heappop(self.events)
            if kind == "step":
                worker, version = payload
                worker.step_end(t, version)
            elif kind == "arrive":
                self.arrive(payload, t)
            elif kind == "pulled":
                decode, prefill, req = payload
                prefill.unpin(req.arrival.isl, t)
                decode.pulled(req, t)
            elif kind == "ready":
                if payload.id in self.workers and payload.state is WorkerState.STARTING:
                    payload.state, payload.since = WorkerState.READY, t
            elif kind == "switched":
                payload.role, payload.switch_to = payload.switch_to, ""
                payload._reset_role()
                payload.state, payload.since = WorkerState.READY, t
