"""A hand-checkable profile and observation builders for the planner core's tests.

Profile (numbers chosen so expectations can be worked out by hand):
- prefill: latency(isl) = 0.01 + 1e-4 * isl s; busy throughput 9090.9 tokens/s at 1000-token prompts;
  so the load-mode prior is a = 0.01 s per step + b = 1e-4 s per token, with 1000-token steps;
- decode: step(n, ctx) = 0.01 + 1e-4 * n + 1e-8 * n * ctx s (exact on the grid).
"""

from __future__ import annotations

from planner import Observation, PlannerConfig, Profile, RouterWindow, WorkerState, WorkerStep
from planner.profile import DecodeGrid, PrefillCurve

A, B, C = 0.01, 1e-4, 1e-8
ISL = (100, 1000, 10000)
BATCH = (1, 50, 100)
CONTEXT = (100, 1000, 10000, 100000)


def decode_step(n: float, ctx: float) -> float:
    return A + B * n + C * n * ctx


def profile() -> Profile:
    return Profile(
        name="test", max_num_batched_tokens=1000, max_num_seqs=100, kv_capacity_tokens=10_000_000,
        prefill=PrefillCurve(ISL, tuple(0.01 + 1e-4 * i for i in ISL), (9090.9, 9090.9, 9090.9)),
        decode=DecodeGrid(BATCH, CONTEXT, tuple(tuple(decode_step(b, c) for c in CONTEXT) for b in BATCH)))


def config(**kw) -> PlannerConfig:
    base = dict(mode="throughput", gpu_budget=16, predictor="constant", adjustment_interval_s=10.0, grace_s=10.0,
                start_timeout_s=100.0, action_timeout_s=1000.0, scale_down_ticks=2)
    return PlannerConfig(**(base | kw))


def worker(wid: str, role: str, state: WorkerState = WorkerState.READY, since: float = 0.0, **kw) -> WorkerStep:
    return WorkerStep(worker_id=wid, role=role, state=state, since_s=since, **kw)


def tier(role: str, n: int, **kw) -> list[WorkerStep]:
    return [worker(f"{role[0]}{i}", role, **kw) for i in range(n)]


def window(rate: float, isl: float = 1000.0, osl: float = 100.0, window_s: float = 10.0) -> RouterWindow:
    n = round(rate * window_s)
    return RouterWindow(window_s=window_s, num_arrivals=n, num_finished=n, isl_mean=isl, osl_mean=osl)


def observe(now: float, workers: list[WorkerStep], *windows: RouterWindow, gpus_free: int | None = None
            ) -> Observation:
    return Observation(now, tuple(workers), tuple(windows), gpus_free)
