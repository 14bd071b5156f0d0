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
  (``kv_gbps``, one pull per request) before its first decode step;
- the launcher: a new worker serves ``startup_s`` after it is started; a drained worker takes no
  new request and frees its GPU when it has finished what it holds; a switching worker does the
  same and serves the other tier ``switch_s`` later.

Pure-decode stretches are advanced in closed form (every step emits one token per running
request and the step time grows linearly with the KV read), so an hour of traffic takes minutes.
A request's inter-token gaps are counted exactly: it is good when its TTFT and the 99th
percentile (nearest rank) of its gaps meet the targets.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from bench.planner_workload import TRACE_BLOCK_TOKENS, Arrival
from planner.observations import RouterWindow, WorkerState, WorkerStep
from router import policy

BLOCK = 16  # the router's KV block size (tokens)


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
    startup_s: float = 60.0
    switch_s: float = 2.0
    max_segment_steps: int = 256
    fast_forward: bool = True  # False: every step one at a time (the closed form's reference)


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

    @property
    def finished(self) -> bool:
        return not math.isnan(self.done_t)

    def good(self, ttft_s: float) -> bool:
        if not self.finished or self.rejected or self.ttft > ttft_s:
            return False
        allowed = self.n_gaps - math.ceil(0.99 * self.n_gaps)  # gaps the 99th percentile may exceed
        return self.n_over <= allowed


@dataclass
class Seq:
    """A request on a decode worker."""

    req: Req
    ctx: int = 0  # KV tokens held
    left: int = 0  # tokens still to emit
    prefill_left: int = 0  # tokens to compute before it decodes (local prefill or recompute)
    stint: int = -1  # fast-forward: the step it joined at (-1: none open)
    gen: int = 0  # invalidates its heap entries


@dataclass
class Window:
    steps: int = 0
    step_s: float = 0.0
    prefill_tokens: int = 0
    decode_rows: int = 0
    kv_tokens: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Job:
    """A prompt on a prefill worker."""

    req: Req
    new: int
    cached: int
    done: int = 0
    started: bool = False


class SegmentLog:
    """The step times of one worker, as segments of steps whose duration grows linearly."""

    def __init__(self, itl_s: float) -> None:
        self.itl_s = itl_s
        self.first: list[int] = []  # first step index
        self.rows: list[list[float]] = []  # [t_start, k, T0, slope]
        self.over_before: list[int] = []  # steps over the ITL target before each segment

    def append(self, first_step: int, t: float, k: int, t0: float, slope: float) -> None:
        before = 0
        if self.rows:
            before = self.over_before[-1] + self._over(len(self.rows) - 1, int(self.rows[-1][1]))
        self.first.append(first_step)
        self.rows.append([t, k, t0, slope])
        self.over_before.append(before)

    def _over(self, i: int, upto: int) -> int:
        """Steps among the segment's first ``upto`` whose duration exceeds the target."""
        _, _, t0, slope = self.rows[i]
        if slope <= 0:
            return upto if t0 > self.itl_s else 0
        j_min = 0 if t0 > self.itl_s else math.floor((self.itl_s - t0) / slope) + 1
        return max(0, upto - j_min)

    def _seg(self, step: int) -> int:
        return bisect.bisect_right(self.first, step) - 1

    def end_time(self, step: int) -> float:
        i = self._seg(step)
        t, _, t0, slope = self.rows[i]
        j = step - self.first[i] + 1
        return t + j * t0 + slope * j * (j - 1) / 2

    def over_until(self, step: int) -> int:
        """Steps with index < ``step`` over the target."""
        if step <= 0 or not self.rows:
            return 0
        i = self._seg(step - 1)
        return self.over_before[i] + self._over(i, step - self.first[i])


class Worker:
    _ids = itertools.count()

    def __init__(self, sim: Simulation, role: str, now: float, ready: bool) -> None:
        self.sim = sim
        self.id = f"{role[0]}{next(Worker._ids)}"
        self.role = role
        self.state = WorkerState.READY if ready else WorkerState.STARTING
        self.since = now
        self.gpu_since = now
        self.switch_to = ""
        self.busy = False
        self.version = 0
        self.window = Window()
        self._reset_role()

    def _reset_role(self) -> None:
        cfg = self.sim.cfg
        # prefill
        self.jobs: deque[Job] = deque()
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.pinned = 0
        # decode
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.pulling = 0
        self.kv_used = 0
        self.sum_ctx = 0  # over decoding seqs
        self.steps = 0
        self.log = SegmentLog(cfg.itl_s)
        self.heap: list[tuple[int, int, int, Seq]] = []  # (finish step, gen, rid, seq) of open stints
        self.n_fast = 0  # seqs with an open stint
        self.releasing = False
        self.fast = False
        self.plan: tuple = ()

    # ---- shared ----------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        if self.role == "prefill":
            return not self.jobs and not self.pinned and not self.busy
        return not self.running and not self.waiting and not self.pulling and not self.busy

    @property
    def queued_prefill_tokens(self) -> int:
        if self.role == "prefill":
            return sum(j.new - j.done for j in self.jobs)
        return sum(s.prefill_left for s in self.running) + sum(s.prefill_left for s in self.waiting)

    def kick(self, now: float) -> None:
        """Start a step if idle and there is work."""
        if not self.busy:
            self._step_prefill(now) if self.role == "prefill" else self._step_decode(now)

    def step_end(self, now: float, version: int) -> None:
        if version != self.version:
            return
        self.busy = False
        self._end_prefill(now) if self.role == "prefill" else self._end_decode(now)
        self.kick(now)
        self.sim.maybe_release(self, now)

    def _schedule(self, at: float) -> None:
        self.busy = True
        self.version += 1
        self.sim.push(at, "step", (self, self.version))

    def _record(self, dt: float, prefill: int, rows: int, kv: float, steps: int = 1) -> None:
        w = self.window
        w.steps += steps
        w.step_s += dt
        w.prefill_tokens += prefill
        w.decode_rows += rows
        w.kv_tokens += kv

    # ---- prefill role ----------------------------------------------------------------------------
    def cached_tokens(self, hashes: tuple[int, ...], isl: int) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache or (n + 1) * TRACE_BLOCK_TOKENS > isl:
                break
            n += 1
        return min(n * TRACE_BLOCK_TOKENS, isl - 1)

    def add_job(self, req: Req, now: float) -> None:
        a = req.arrival
        cached = self.cached_tokens(a.hashes, a.isl)
        for h in a.hashes[:cached // TRACE_BLOCK_TOKENS]:
            self.cache.move_to_end(h)
        self.jobs.append(Job(req, a.isl - cached, cached))
        self.window.prompt_tokens += a.isl
        self.window.cached_tokens += cached
        self.kick(now)

    def _kv_free_prefill(self) -> int:
        held = self.pinned + sum(j.cached + j.done + (j.new - j.done) for j in self.jobs if j.started)
        return self.sim.cfg.kv_capacity_tokens - held

    def _step_prefill(self, now: float) -> None:
        cfg = self.sim.cfg
        budget, chunks, plan = cfg.max_num_batched_tokens, [], []
        free = self._kv_free_prefill()
        for job in self.jobs:
            if budget <= 0:
                break
            if not job.started:
                if job.new + job.cached > free:
                    break  # no KV room: it waits (FCFS)
                job.started = True
                free -= job.new + job.cached
            take = min(job.new - job.done, budget)
            chunks.append((take, job.cached + job.done))
            plan.append((job, take))
            budget -= take
        if not plan:
            return
        dt = self.sim.model.time(chunks, 0, 0)
        self.plan = tuple(plan)
        self._record(dt, sum(t for _, t in plan), 0, 0.0)
        self._schedule(now + dt)

    def _end_prefill(self, now: float) -> None:
        for job, take in self.plan:
            job.done += take
        while self.jobs and self.jobs[0].done >= self.jobs[0].new:
            job = self.jobs.popleft()
            a = job.req.arrival
            self._insert_cache(a.hashes[:a.isl // TRACE_BLOCK_TOKENS])
            self.pinned += a.isl
            self.sim.prefilled(job.req, self, now)
        self.plan = ()

    def _insert_cache(self, hashes: tuple[int, ...]) -> None:
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        room = max(0, self._kv_free_prefill()) // TRACE_BLOCK_TOKENS
        while len(self.cache) > room:
            self.cache.popitem(last=False)

    def unpin(self, tokens: int, now: float) -> None:
        self.pinned -= tokens
        self.kick(now)
        self.sim.maybe_release(self, now)

    # ---- decode role -----------------------------------------------------------------------------
    def handoff(self, req: Req, now: float) -> float | None:
        """``add_prefilled``: reserve KV for the pull and return when it lands; None: no room, the
        request was queued to recompute its prompt here."""
        cfg = self.sim.cfg
        isl = req.arrival.isl
        if len(self.running) >= cfg.max_num_seqs or self.kv_now(now) + isl > cfg.kv_capacity_tokens:
            self.waiting.append(Seq(req, prefill_left=isl + req.emitted, left=req.arrival.osl - req.emitted))
            self.interrupt(now)
            return None
        self.kv_used += isl
        self.pulling += 1
        return now + cfg.kv_latency_s + isl * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9)

    def pulled(self, req: Req, now: float) -> None:
        self.pulling -= 1
        seq = Seq(req, ctx=req.arrival.isl, left=req.arrival.osl - req.emitted)
        self.running.append(seq)
        self.sum_ctx += seq.ctx
        if seq.left <= 0:
            self._finish(seq, now)
        self.interrupt(now)

    def add_local(self, req: Req, now: float) -> None:
        self.waiting.append(Seq(req, prefill_left=req.arrival.isl, left=req.arrival.osl))
        self.interrupt(now)

    def _steps_started(self, now: float) -> int:
        """Fast-forward: steps of the current segment launched by ``now`` (finished ones and the
        one in progress, whose KV the scheduler has allocated already)."""
        if not (self.busy and self.fast):
            return 0
        t_start, k, t0, slope = self.log.rows[-1]
        elapsed = now - t_start
        lo, hi = 0, int(k)
        while lo < hi:  # steps finished by now
            mid = (lo + hi + 1) // 2
            if mid * t0 + slope * mid * (mid - 1) / 2 <= elapsed:
                lo = mid
            else:
                hi = mid - 1
        return min(int(k), lo + 1)

    def kv_now(self, now: float) -> int:
        """KV tokens held now (the closed form brings ``kv_used`` up to date only at segment ends)."""
        return self.kv_used + self.n_fast * self._steps_started(now)

    def interrupt(self, now: float) -> None:
        """New work: cut a fast-forward segment at the step in progress (or start one if idle)."""
        if not self.busy:
            self.kick(now)
            return
        if not self.fast:
            return
        t_start, k, t0, slope = self.log.rows[-1]
        j = self._steps_started(now)
        if j < k:
            self.log.rows[-1][1] = j
            self.plan = (j,)
            self.version += 1
            self.sim.push(t_start + j * t0 + slope * j * (j - 1) / 2, "step", (self, self.version))

    def _step_decode(self, now: float) -> None:
        cfg = self.sim.cfg
        decoding = [s for s in self.running if s.prefill_left == 0]
        if cfg.fast_forward and decoding and len(decoding) == len(self.running) and not self._admits():
            n = len(decoding)
            for s in decoding:
                if s.stint < 0:
                    s.stint = self.steps
                    s.gen += 1
                    heapq.heappush(self.heap, (self.steps + s.left, s.gen, s.req.rid, s))
            self.n_fast = n
            self.fast = True
            k = min(self.heap[0][0] - self.steps, cfg.max_segment_steps, (cfg.kv_capacity_tokens - self.kv_used) // n)
            if k >= 1:
                t0 = self.sim.model.time([], n, self.sum_ctx + n)
                slope = self.sim.model.time([], n, self.sum_ctx + 2 * n) - t0
                self.log.append(self.steps, now, k, t0, slope)
                self.plan = (k,)
                self.busy = True
                self.version += 1
                self.sim.push(now + k * t0 + slope * k * (k - 1) / 2, "step", (self, self.version))
                return
        self._close_stints()
        self._slow_step(now)

    def _admits(self) -> bool:
        """Whether the next step would admit a waiting request (the scheduler's test): while it
        would not, the running requests decode alone and the closed form holds."""
        if not self.waiting or len(self.running) >= self.sim.cfg.max_num_seqs:
            return False
        head = self.waiting[0]
        return self.kv_used + min(head.prefill_left, self.sim.cfg.max_num_batched_tokens) \
            <= self.sim.cfg.kv_capacity_tokens

    def _close_stint(self, s: Seq, end_step: int) -> None:
        k = end_step - s.stint
        if k > 0:
            r = s.req
            first_end = self.log.end_time(s.stint)
            gap = first_end - r.last_t
            r.n_over += (gap > self.sim.cfg.itl_s) + self.log.over_until(end_step) - self.log.over_until(s.stint + 1)
            r.n_gaps += k
            r.emitted += k
            s.left -= k
            r.last_t = self.log.end_time(end_step - 1)
        s.stint = -1
        s.gen += 1

    def _close_stints(self) -> None:
        if self.fast:
            for s in self.running:
                if s.stint >= 0:
                    s.ctx += self.steps - s.stint
                    self._close_stint(s, self.steps)
            self.heap = []
            self.n_fast = 0
            self.fast = False

    def _end_decode(self, now: float) -> None:
        if self.fast:
            (k,) = self.plan
            n = self.n_fast
            sum_ctx = self.sum_ctx - sum(s.ctx for s in self.running if s.stint < 0)  # joined meanwhile
            _, _, t0, slope = self.log.rows[-1]
            self._record(k * t0 + slope * k * (k - 1) / 2, 0, n * k, k * (sum_ctx + n) + n * k * (k - 1) / 2, k)
            self.steps += k
            self.sum_ctx += n * k
            self.kv_used += n * k
            while self.heap and self.heap[0][0] <= self.steps:
                _, gen, _, s = heapq.heappop(self.heap)
                if s.gen == gen:
                    s.ctx += self.steps - s.stint
                    self._close_stint(s, self.steps)
                    self.n_fast -= 1
                    self._finish(s, now)
            return
        self._end_slow(now)

    def _finish(self, s: Seq, now: float) -> None:
        self.running.remove(s)
        self.kv_used -= s.ctx
        self.sum_ctx -= s.ctx
        self.sim.finished(s.req, now)

    # slow steps: one at a time, scheduled as engine/scheduler.py does
    def _slow_step(self, now: float) -> None:
        cfg = self.sim.cfg
        budget, plan = cfg.max_num_batched_tokens, []
        i = 0
        preempted = False
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            need = 1 if s.prefill_left == 0 else min(s.prefill_left, budget)
            if self.kv_used + need > cfg.kv_capacity_tokens:
                self._preempt(self.running[-1])  # the latest admitted (never one planned: they come first)
                preempted = True
                continue
            plan.append((s, need))
            self.kv_used += need
            budget -= need
            i += 1
        budget = cfg.max_num_batched_tokens - sum(t for _, t in plan)
        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            s = self.waiting[0]
            take = min(s.prefill_left, budget)
            if self.kv_used + take > cfg.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.running.append(s)
            self.kv_used += take
            plan.append((s, take))
            budget -= take
        if not plan:
            return
        chunks = [(t, s.ctx) for s, t in plan if s.prefill_left > 0]
        decodes = [s for s, t in plan if s.prefill_left == 0]
        kv = sum(s.ctx + 1 for s in decodes)
        dt = self.sim.model.time(chunks, len(decodes), kv)
        self.plan = tuple(plan)
        self.log.append(self.steps, now, 1, dt, 0.0)
        self._record(dt, sum(t for t, _ in chunks), len(decodes), kv)
        self._schedule(now + dt)

    def _preempt(self, s: Seq) -> None:
        self.running.remove(s)
        self.kv_used -= s.ctx
        if s.prefill_left == 0:
            self.sum_ctx -= s.ctx
        s.prefill_left = s.req.arrival.isl + s.req.emitted
        s.ctx = 0
        self.waiting.appendleft(s)

    def _end_slow(self, now: float) -> None:
        itl = self.sim.cfg.itl_s
        self.steps += 1
        for s, t in self.plan:
            r = s.req
            if s.prefill_left > 0:
                s.prefill_left -= t
                s.ctx += t
                if s.prefill_left > 0:
                    continue
                self.sum_ctx += s.ctx
            else:
                s.ctx += 1
                self.sum_ctx += 1
            # the step sampled a token for this request
            if math.isnan(r.ttft):
                r.ttft = now - r.arrival.t
            else:
                gap = now - r.last_t
                r.n_gaps += 1
                r.n_over += gap > itl
            r.last_t = now
            r.emitted += 1
            s.left -= 1
            if s.left <= 0:
                self._finish(s, now)
        self.plan = ()

    # ---- observation -------------------------------------------------------------------------------
    def observe(self, now: float, interval_s: float) -> WorkerStep:
        w, self.window = self.window, Window()
        n = w.steps
        tokens = w.prefill_tokens + w.decode_rows
        decoding = [s for s in self.running if s.prefill_left == 0]
        return WorkerStep(
            worker_id=self.id, role=self.role, state=self.state, since_s=self.since,
            num_waiting=len(self.waiting) + sum(1 for j in self.jobs if not j.started),
            num_running=len(decoding) if self.role == "decode" else sum(1 for j in self.jobs if j.started),
            num_queued_prefill_tokens=self.queued_prefill_tokens,
            num_active_kv_tokens=self.sum_ctx + self.n_fast * self._steps_started(now) if self.role == "decode" else 0,
            kv_usage=(self.kv_now(now) if self.role == "decode" else self.sim.cfg.kv_capacity_tokens
                      - self._kv_free_prefill()) / self.sim.cfg.kv_capacity_tokens,
            num_steps=n, step_s=w.step_s / n if n else math.nan,
            step_prefill_tokens=w.prefill_tokens / n if n else math.nan,
            step_decode_tokens=w.decode_rows / n if n else math.nan,
            step_kv_tokens=w.kv_tokens / n if n else math.nan,
            tokens_per_s=tokens / interval_s, decode_tokens_per_s=w.decode_rows / interval_s,
            num_prompt_tokens=w.prompt_tokens, num_cached_tokens=w.cached_tokens)


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

    def push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def add_worker(self, role: str, now: float, ready: bool = True) -> Worker:
        w = Worker(self, role, now, ready)
        self.workers[w.id] = w
        if not ready:
            self.push(now + self.cfg.startup_s, "ready", w)
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
        limit = 8 * self.cfg.max_num_batched_tokens
        remote = bool(prefill) and not policy.prefill_saturated(prefill_loads, limit)
        choice = self._choose_decode(req, decode, self.cfg.max_local_prefill_tokens if remote else None, now)
        req.decode_worker = choice.worker_id
        if choice.local_prefill:
            self.workers[choice.worker_id].add_local(req, now)
            return
        overlaps = {w.id: w.cached_tokens(req.arrival.hashes, req.arrival.isl) // BLOCK for w in prefill}
        pick = policy.choose("kv", req.arrival.isl, overlaps, prefill_loads, BLOCK)
        self.workers[pick.worker_id].add_job(req, now)

    def _choose_decode(self, req: Req, decode: list[Worker], max_local: int | None, now: float) -> policy.Decision:
        loads = [policy.WorkerLoad(w.id, len(w.running) + len(w.waiting) + w.pulling, w.queued_prefill_tokens,
                                   num_active_blocks=policy.blocks(w.kv_now(now), BLOCK)) for w in decode]
        decision = policy.choose("kv", req.arrival.isl, {}, loads, BLOCK, max_local_prefill_tokens=max_local)
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
            target = self.workers[self._choose_decode(req, decode, -1, now).worker_id]
            req.decode_worker = target.id
        landed = target.handoff(req, now)
        if landed is None:
            prefill.unpin(req.arrival.isl, now)
        else:
            self.push(landed, "pulled", (target, prefill, req))

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
