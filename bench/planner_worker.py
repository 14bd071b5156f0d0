"""The workers of ``bench/planner_sim.py``'s replay: one GPU each, in the prefill or the decode
role (a switch re-initializes the role's state, as the real worker keeps only its weights).

A prefill worker steps FCFS chunked prefill; a decode worker steps continuous batching as
``engine/scheduler.py`` does (one step at a time while prompts are computed, waiting requests
can be admitted or a request is preempted), and advances stretches of pure decoding in closed
form: every step emits one token per running request and its time grows linearly with the KV it
reads, so a request's token times are the worker's step end times (:class:`SegmentLog`) from the
step it joined on, and its gaps over the ITL target are counted from the segments it spans.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.planner_workload import TRACE_BLOCK_TOKENS
from planner.observations import WorkerState, WorkerStep

if TYPE_CHECKING:
    from bench.planner_sim import Req, Simulation


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
    cached: int  # prompt tokens not computed: its prefix found in the device cache or the host tier
    done: int = 0
    started: bool = False
    host: int = 0  # of ``cached``, the tokens copied back from the host tier when it starts


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
        # the host KV tier (SimConfig.host_kv_gb): the process's pinned host memory, so a tier switch
        # keeps it (and a park: Simulation hands it to the worker that wakes); device evictions land here
        self.host: OrderedDict[int, None] = OrderedDict()
        self._reset_role()

    def _reset_role(self) -> None:
        cfg = self.sim.cfg
        # prefill
        self.jobs: deque[Job] = deque()
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.pinned = 0
        self.offload_tokens = 0  # evicted to the host tier since the last step: copied before the next
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
        return sum(self.prefix_tokens(hashes, isl))

    def prefix_tokens(self, hashes: tuple[int, ...], isl: int) -> tuple[int, int]:
        """The prompt's leading tokens found here, as (in the device cache, only in the host tier):
        whole blocks, each in either, the last prompt token always computed (as the engine does)."""
        dev = host = 0
        for h in hashes:
            if (dev + host + 1) * TRACE_BLOCK_TOKENS > isl:
                break
            if h in self.cache:
                dev += 1
            elif h in self.host:
                host += 1
            else:
                break
        dev_t, host_t = dev * TRACE_BLOCK_TOKENS, host * TRACE_BLOCK_TOKENS
        cut = max(0, dev_t + host_t - (isl - 1))  # (at most a token, from the last block: it is a host one?)
        if cut and host and hashes[dev + host - 1] not in self.cache:
            return dev_t, host_t - cut
        return dev_t - cut, host_t

    def add_job(self, req: Req, now: float) -> None:
        a = req.arrival
        dev, host = self.prefix_tokens(a.hashes, a.isl)
        cached = dev + host
        for h in self._lru_order(a.hashes[:cached // TRACE_BLOCK_TOKENS]):
            if h in self.cache:
                self.cache.move_to_end(h)
            else:  # copied back when the job starts; the host copy stays (an LRU hit)
                self.host.move_to_end(h)
        self.jobs.append(Job(req, a.isl - cached, cached, host=host))
        self.window.prompt_tokens += a.isl
        self.window.cached_tokens += cached
        self.sim.hit_tokens[0] += dev
        self.sim.hit_tokens[1] += host
        self.kick(now)

    def _kv_free_prefill(self) -> int:
        held = self.pinned + sum(j.cached + j.done + (j.new - j.done) for j in self.jobs if j.started)
        return self.sim.cfg.kv_capacity_tokens - held

    def _step_prefill(self, now: float) -> None:
        cfg = self.sim.cfg
        budget, chunks, plan = cfg.max_num_batched_tokens, [], []
        free = self._kv_free_prefill()
        copy_tokens = 0
        for job in self.jobs:
            if budget <= 0:
                break
            if not job.started:
                if job.new + job.cached > free:
                    break  # no KV room: it waits (FCFS)
                job.started = True
                free -= job.new + job.cached
                copy_tokens += job.host
            take = min(job.new - job.done, budget)
            chunks.append((take, job.cached + job.done))
            plan.append((job, take))
            budget -= take
        if not plan:
            return
        copy_tokens += self.offload_tokens
        self.offload_tokens = 0
        dt = self.sim.model.time(chunks, 0, 0) + (self.sim.host_copy_s(copy_tokens) if copy_tokens else 0.0)
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

    def _lru_order(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        """A prompt's blocks in the order they become the most recent (the last, the last evicted)."""
        return hashes[::-1] if self.sim.cfg.cache_evicts_tail_first else hashes

    def _insert_cache(self, hashes: tuple[int, ...]) -> None:
        for h in self._lru_order(hashes):
            self.cache[h] = None
            self.cache.move_to_end(h)
        room = max(0, self._kv_free_prefill()) // TRACE_BLOCK_TOKENS
        while len(self.cache) > room:
            h, _ = self.cache.popitem(last=False)
            self._to_host(h)

    def _to_host(self, h: int) -> None:
        """A block evicted from the device cache goes to the host tier (its LRU end), which evicts
        its own least recently used: copied before the worker's next step (``host_offload_charged``)
        unless the host tier holds it already (a block loaded from there: the tier is inclusive)."""
        cap = self.sim.host_blocks
        if cap <= 0:
            return
        if h not in self.host and self.sim.cfg.host_offload_charged:
            self.offload_tokens += TRACE_BLOCK_TOKENS
        self.host[h] = None
        self.host.move_to_end(h)
        while len(self.host) > cap:
            self.host.popitem(last=False)

    def unpin(self, tokens: int, now: float) -> None:
        self.pinned -= tokens
        self.kick(now)
        self.sim.maybe_release(self, now)

    # ---- decode role -----------------------------------------------------------------------------
    def handoff(self, req: Req, now: float) -> float | None:
        """``add_prefilled``: reserve KV for the pull and return when it lands; None: no room, the
        request was queued to recompute its prompt here. Every seat taken but KV room: recomputed
        too (``seats_full="recompute"``), or pulled to wait for a seat (``"wait"``)."""
        cfg = self.sim.cfg
        isl = req.arrival.isl
        seats_full = len(self.running) >= cfg.max_num_seqs and cfg.seats_full == "recompute"
        if seats_full or self.kv_now(now) + isl > cfg.kv_capacity_tokens:
            self.waiting.append(Seq(req, prefill_left=isl + req.emitted, left=req.arrival.osl - req.emitted))
            self.interrupt(now)
            return None
        self.kv_used += isl
        self.pulling += 1
        return now + cfg.kv_latency_s + isl * cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e9)

    def pulled(self, req: Req, now: float) -> None:
        self.pulling -= 1
        seq = Seq(req, ctx=req.arrival.isl, left=req.arrival.osl - req.emitted)
        cfg = self.sim.cfg
        # "wait": its KV held, it waits for a seat ("recompute": it joins, as kv_ready does, seats or not)
        if cfg.seats_full == "wait" and len(self.running) >= cfg.max_num_seqs:
            self.waiting.append(seq)
            self.interrupt(now)
            return
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
                for s in decoding:
                    self.sim.decode_token(s.req, now + t0)  # (as the step is planned, as _slow_step does)
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
        return self.kv_used + max(1, min(head.prefill_left, self.sim.cfg.max_num_batched_tokens)) \
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
            take = min(s.prefill_left, budget) if s.prefill_left else 1  # 1: pulled, decodes (its KV held)
            if self.kv_used + take > cfg.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.running.append(s)
            if not s.prefill_left:
                self.sum_ctx += s.ctx
            self.kv_used += take
            plan.append((s, take))
            budget -= take
        if not plan:
            return
        chunks = [(t, s.ctx) for s, t in plan if s.prefill_left > 0]
        decodes = [s for s, t in plan if s.prefill_left == 0]
        kv = sum(s.ctx + 1 for s in decodes)
        dt = self.sim.model.time(chunks, len(decodes), kv)
        for s, t in plan:
            if s.prefill_left <= t:  # the step samples a token for it
                self.sim.decode_token(s.req, now + dt)
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
    def observe(self, now: float, interval_s: float, reset: bool = True) -> WorkerStep:
        """The step summary of the window since the last reset (``interval_s`` long); ``reset``
        False: a look that leaves the window running (the planner's fast check between ticks)."""
        w = self.window
        if reset:
            self.window = Window()
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
