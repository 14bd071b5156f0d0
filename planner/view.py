"""The planner's view of a live cluster: etcd's messages folded into the core's
:class:`~planner.observations.Observation`, one per tick. No I/O and no clock: the service feeds
it what its watches saw, with times on its own monotonic clock.

- **Workers**: a registration under ``workers/{role}/`` is a READY worker of that tier (a worker
  that switched serves its new tier at once); the launcher adds those it is starting or
  draining (no longer registered), as :class:`Transition`\\ s.
- **Step summaries** (``metrics/steps/``, one a second per worker): every summary since the last
  tick is merged, weighted by its steps, so a tick sees its whole interval and not the last second
  of it; a worker that published nothing since has its counts and no steps (the regressions learn
  nothing twice).
- **Traffic**: routers publish their arrivals since they started (``num_arrivals_total``); the
  view differences them over ``window_s`` (several ticks), so a sparse load is not "zero traffic"
  because one tick saw no arrival, and the end of the traffic shows within that window, not the
  routers' 60 s. Mean lengths too (prompt tokens at arrival over arrivals, answer tokens over
  finished requests: the routers' token totals differenced), so a shift of the mix shows within
  that window; their percentiles keep the routers' 60 s window's ratio to its mean. Answers
  growing longer show at arrival (:func:`early_osl`: the tokens the arrivals asked for, times the
  share finished requests used), not once they finish. Latency percentiles come from the
  routers' own windows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

from planner.observations import NAN, ROLES, Observation, RouterWindow, WorkerState, WorkerStep
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as wpb

ROLE_FROM_PB = {wpb.WORKER_ROLE_PREFILL: "prefill", wpb.WORKER_ROLE_DECODE: "decode"}


@dataclass(frozen=True)
class Transition:
    """A worker the launcher is starting (not registered yet) or draining (deregistered)."""

    worker_id: str
    role: str
    state: WorkerState
    since_s: float


def _opt(msg: cpb.WorkerStepStats | cpb.RouterWindowStats, name: str) -> float:
    return getattr(msg, name) if msg.HasField(name) else NAN


def _rescaled(lengths: dict[str, float], mean: float) -> dict[str, float]:
    """``lengths`` (mean and percentiles of one window) moved to another window's ``mean``."""
    ratio = mean / lengths["mean"] if lengths["mean"] > 0 else NAN  # NaN (no finished request): unknown
    return {q: mean if q == "mean" else v * ratio for q, v in lengths.items()}


def early_osl(arrivals: int, requested: int, window: tuple[int, int], lifetime: tuple[int, int]) -> float:
    """The OSL the window's arrivals will have, known when they arrive: the answer tokens they
    asked for (``requested``: max_tokens x n) per arrival, times the share of what they asked for
    that finished requests used (answer tokens over their requested tokens: ``window``'s, or the
    router's ``lifetime`` totals while none finished in the window; at most 1). NaN when unknown
    (no arrival, no max_tokens, nothing finished yet). The view takes it only above the finished
    requests' OSL: up early when answers get longer, down as before (once they finish)."""
    used, asked = window if window[1] > 0 else lifetime
    if arrivals <= 0 or requested <= 0 or asked <= 0:
        return NAN
    return requested / arrivals * min(1.0, used / asked)


def merge_steps(summaries: list[cpb.WorkerStepStats]) -> dict[str, float]:
    """Step means over several summaries, weighted by their steps (NaN without steps)."""
    steps = sum(m.num_steps for m in summaries if m.HasField("step_s"))
    window = sum(m.window_s for m in summaries)
    out = {"num_steps": float(steps), "num_prompt_tokens": float(sum(m.num_prompt_tokens for m in summaries)),
           "num_cached_tokens": float(sum(m.num_cached_tokens for m in summaries)),
           "tokens_per_s": sum(m.tokens_per_s * m.window_s for m in summaries) / window if window else NAN,
           "decode_tokens_per_s": sum(m.decode_tokens_per_s * m.window_s for m in summaries) / window if window
           else NAN}
    for name in ("step_s", "step_prefill_tokens", "step_decode_tokens", "step_kv_tokens"):
        out[name] = (sum(getattr(m, name) * m.num_steps for m in summaries if m.HasField(name)) / steps
                     if steps else NAN)
    return out


class ClusterView:
    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._fresh: dict[str, list[cpb.WorkerStepStats]] = {}  # worker id -> summaries since the last tick
        self._last: dict[str, cpb.WorkerStepStats] = {}
        # id -> (t, arrivals, finished, prompt tokens, output tokens, requested tokens, finished requests'
        # requested tokens): the router's totals since it started
        self._routers: dict[str, deque[tuple[float, int, int, int, int, int, int]]] = {}
        self._windows: dict[str, cpb.RouterWindowStats] = {}

    # ---- folding what the watches saw ------------------------------------------------------------
    def steps_put(self, worker_id: str, msg: cpb.WorkerStepStats) -> None:
        self._fresh.setdefault(worker_id, []).append(msg)
        self._last[worker_id] = msg

    def steps_deleted(self, worker_id: str) -> None:
        self._fresh.pop(worker_id, None)
        self._last.pop(worker_id, None)

    def router_put(self, router_id: str, msg: cpb.RouterWindowStats, now_s: float) -> None:
        history = self._routers.setdefault(router_id, deque())
        if history and msg.num_arrivals_total < history[-1][1]:  # a new router of the same id
            history.clear()
        history.append((now_s, msg.num_arrivals_total, msg.num_finished_total, msg.num_prompt_tokens_total,
                        msg.num_output_tokens_total, msg.num_requested_tokens_total,
                        msg.num_finished_requested_tokens_total))
        while len(history) > 2 and history[1][0] <= now_s - self.window_s:
            history.popleft()  # keep one sample at or before the window's start
        self._windows[router_id] = msg

    def router_deleted(self, router_id: str) -> None:
        self._routers.pop(router_id, None)
        self._windows.pop(router_id, None)

    # ---- one tick ----------------------------------------------------------------------------------
    def traffic(self, now_s: float) -> tuple[RouterWindow, ...]:
        out = []
        for router_id, msg in self._windows.items():
            history = self._routers.get(router_id)
            if not history:
                continue
            t0, a0, f0, p0, o0, r0, q0 = history[0]
            t1, a1, f1, p1, o1, r1, q1 = history[-1]
            isl = {q: _opt(msg, f"isl_{q}") for q in ("mean", "p50", "p95")}
            osl = {q: _opt(msg, f"osl_{q}") for q in ("mean", "p50", "p95")}
            if t1 - t0 < 1e-6:  # one sample yet: the router's own window
                window_s, arrivals, finished = msg.window_s, msg.num_arrivals, msg.num_finished
            else:
                window_s, arrivals, finished = t1 - t0, a1 - a0, f1 - f0
                # Lengths over this window too, from the token totals (a router that publishes
                # them): the 60 s window's means lag a shift of the mix. Its percentiles keep
                # their ratio to its mean (the shape of the lengths), scaled to this window's mean.
                if arrivals > 0 and p1 > p0:
                    isl = _rescaled(isl, (p1 - p0) / arrivals)
                if finished > 0 and o1 > o0:
                    osl = _rescaled(osl, (o1 - o0) / finished)
                early = early_osl(arrivals, r1 - r0, (o1 - o0, q1 - q0), (o1, q1))
                if early > osl["mean"] or (math.isnan(osl["mean"]) and early > 0):
                    osl = _rescaled(osl, early) if osl["mean"] > 0 else {q: early for q in osl}
            out.append(RouterWindow(
                window_s=window_s, num_arrivals=arrivals, num_finished=finished,
                isl_mean=isl["mean"], isl_p50=isl["p50"], isl_p95=isl["p95"],
                osl_mean=osl["mean"], osl_p50=osl["p50"], osl_p95=osl["p95"],
                ttft_ms_p50=_opt(msg, "ttft_ms_p50"), ttft_ms_p95=_opt(msg, "ttft_ms_p95"),
                ttft_ms_p99=_opt(msg, "ttft_ms_p99"), itl_ms_p50=_opt(msg, "itl_ms_p50"),
                itl_ms_p95=_opt(msg, "itl_ms_p95"), itl_ms_p99=_opt(msg, "itl_ms_p99"),
                num_inflight=msg.num_inflight))
        return tuple(out)

    def observe(self, now_s: float, registered: Mapping[str, Mapping[str, object]],
                transitions: Mapping[str, Transition] = (), num_gpus_free: int | None = None,
                since_s: Mapping[str, float] | None = None, consume: bool = True) -> Observation:
        """The tick's observation. ``registered``: per tier, the registered worker ids; a worker in
        ``transitions`` is taken in the launcher's state instead. ``since_s``: when each registered
        worker was first seen (the core's grace for new workers). ``consume`` False (the fast check
        between ticks): the step summaries since the last tick stay for the next tick's."""
        workers: list[WorkerStep] = []
        seen: set[str] = set()
        for role in ("prefill", "decode"):
            for worker_id in registered.get(role, {}):
                if worker_id in seen:
                    continue  # mid-switch, registered in both for an instant: the summary's tier wins
                last = self._last.get(worker_id)
                if last is not None and ROLE_FROM_PB.get(last.role, role) != role and \
                        worker_id in registered.get(ROLE_FROM_PB[last.role], {}):
                    continue
                seen.add(worker_id)
                t = transitions.get(worker_id) if transitions else None
                state = t.state if t is not None and t.state is not WorkerState.STARTING else WorkerState.READY
                workers.append(self._step(worker_id, role, state, (since_s or {}).get(worker_id, 0.0)))
        # A start's placeholder stays with the launcher until its call returns, after the worker
        # registered: a worker first seen since the start was issued is that start (counted once).
        new = {r: sorted((since_s or {}).get(w.worker_id, -math.inf) for w in workers
                         if w.role == r and w.worker_id not in (transitions or {})) for r in ROLES}
        for t in sorted(transitions.values() if transitions else (), key=lambda t: t.since_s):
            if t.worker_id in seen:
                continue
            if t.state is WorkerState.STARTING:
                match = next((i for i, s in enumerate(new[t.role]) if s >= t.since_s), None)
                if match is not None:
                    del new[t.role][match]
                    continue
            workers.append(WorkerStep(t.worker_id, t.role, t.state, t.since_s))
        if consume:
            self._fresh.clear()
        return Observation(now_s, tuple(workers), self.traffic(now_s), num_gpus_free)

    def _step(self, worker_id: str, role: str, state: WorkerState, since_s: float) -> WorkerStep:
        last = self._last.get(worker_id)
        step = WorkerStep(worker_id, role, state, since_s)
        if last is None:
            return step
        merged = merge_steps(self._fresh.get(worker_id, []))
        return replace(
            step, num_waiting=last.num_waiting, num_running=last.num_running,
            num_queued_prefill_tokens=last.num_queued_prefill_tokens, num_active_kv_tokens=last.num_active_kv_tokens,
            kv_usage=last.kv_usage, num_steps=int(merged["num_steps"]), step_s=merged["step_s"],
            step_prefill_tokens=merged["step_prefill_tokens"], step_decode_tokens=merged["step_decode_tokens"],
            step_kv_tokens=merged["step_kv_tokens"],
            tokens_per_s=merged["tokens_per_s"] if not math.isnan(merged["tokens_per_s"]) else 0.0,
            decode_tokens_per_s=(merged["decode_tokens_per_s"] if not math.isnan(merged["decode_tokens_per_s"])
                                 else 0.0),
            num_prompt_tokens=int(merged["num_prompt_tokens"]), num_cached_tokens=int(merged["num_cached_tokens"]))
