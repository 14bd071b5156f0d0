"""What the planner core sees at one tick: typed, torch-free, filled by an adapter.

The adapter (the later etcd integration, or ``bench/planner.py``'s replay) builds one
:class:`Observation` per tick from the workers' step summaries and the routers' request
windows, and the launcher's view of each worker's lifecycle. Nothing here reads a clock: every
time is a number the adapter passes in (seconds on one monotonic clock of its choice).

Missing measurements are ``math.nan`` (a window with no finished request has no TTFT
percentile); counts are never NaN. The core never decides from NaN except toward the
minimums when traffic is known to be zero (:attr:`RouterWindow.num_arrivals` == 0 on every
window and no worker has work).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

NAN = math.nan
ROLES = ("prefill", "decode")


def other_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown tier {role!r}; expected one of {ROLES}")
    return "decode" if role == "prefill" else "prefill"


class WorkerState(enum.Enum):
    """A worker's lifecycle as the launcher knows it."""

    STARTING = "starting"  # asked for; not serving yet (loading, or waiting for a GPU)
    READY = "ready"  # registered and serving its role
    DRAINING = "draining"  # takes no new requests; finishes its in-flight ones, then its GPU is free
    SWITCHING = "switching"  # draining its role to re-register in the other one, same process


@dataclass(frozen=True)
class WorkerStep:
    """One worker's step summary over the last metrics window (about a second).

    ``step_*`` are means over the steps taken in the window (NaN when it took none); the
    counts are the worker's state at the end of the window."""

    worker_id: str
    role: str
    state: WorkerState = WorkerState.READY
    since_s: float = 0.0  # when it entered ``state`` (the adapter's clock)
    num_gpus: int = 1
    # queue state
    num_waiting: int = 0
    num_running: int = 0
    num_queued_prefill_tokens: int = 0  # prompt tokens not computed yet (waiting and running)
    num_active_kv_tokens: int = 0  # KV tokens held by running requests: the decode load
    kv_usage: float = 0.0  # used / total KV blocks, 0..1
    # step timing over the window
    num_steps: int = 0
    step_s: float = NAN  # mean wall time of a step
    step_prefill_tokens: float = NAN  # mean prompt tokens computed per step
    step_decode_tokens: float = NAN  # mean decode rows (running sequences) per step
    step_kv_tokens: float = NAN  # mean KV tokens the step's decodes attended to
    tokens_per_s: float = NAN  # tokens computed per second of window (prefill + decode)
    decode_tokens_per_s: float = NAN  # tokens sampled by decode rows per second of window
    # prefix cache, over the window: prompt tokens admitted and of those served from cache
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        other_role(self.role)  # validates
        if self.num_gpus < 1:
            raise ValueError(f"worker {self.worker_id}: num_gpus must be >= 1")

    @property
    def has_work(self) -> bool:
        return bool(self.num_waiting or self.num_running or self.num_queued_prefill_tokens)


@dataclass(frozen=True)
class RouterWindow:
    """One router's request window (``router/stats.py`` publishes its ancestor). Lengths are
    token counts of the requests that finished in the window; NaN where none did."""

    window_s: float
    num_arrivals: int
    num_finished: int = 0
    isl_mean: float = NAN
    isl_p50: float = NAN
    isl_p95: float = NAN
    osl_mean: float = NAN
    osl_p50: float = NAN
    osl_p95: float = NAN
    ttft_ms_p50: float = NAN
    ttft_ms_p95: float = NAN
    ttft_ms_p99: float = NAN
    itl_ms_p50: float = NAN
    itl_ms_p95: float = NAN
    itl_ms_p99: float = NAN
    num_inflight: int = 0

    @property
    def request_rate(self) -> float:
        return self.num_arrivals / self.window_s if self.window_s > 0 else NAN


@dataclass(frozen=True)
class Observation:
    """Everything one tick decides from. ``num_gpus_free``: GPUs the launcher could give a new
    worker now (None: unknown, the core assumes the budget is the only limit). ``num_parked``:
    workers the launcher keeps parked (its warm pool: no GPU held, not in ``workers``); a start
    takes one first and serves after ``PlannerConfig.wake_s``."""

    now_s: float
    workers: tuple[WorkerStep, ...] = ()
    windows: tuple[RouterWindow, ...] = ()
    num_gpus_free: int | None = None
    num_parked: int = 0

    def tier(self, role: str, states: tuple[WorkerState, ...] = (WorkerState.READY,)) -> list[WorkerStep]:
        return [w for w in self.workers if w.role == role and w.state in states]

    def worker(self, worker_id: str) -> WorkerStep | None:
        return next((w for w in self.workers if w.worker_id == worker_id), None)


@dataclass(frozen=True)
class Traffic:
    """The routers' windows merged: arrivals summed, lengths and latencies weighted by finishes."""

    window_s: float = NAN
    num_arrivals: int = 0
    num_finished: int = 0
    isl_mean: float = NAN
    isl_p95: float = NAN
    osl_mean: float = NAN
    osl_p95: float = NAN
    ttft_ms_p95: float = NAN
    itl_ms_p95: float = NAN

    @property
    def request_rate(self) -> float:
        return self.num_arrivals / self.window_s if self.window_s > 0 else NAN

    @classmethod
    def merge(cls, windows: tuple[RouterWindow, ...]) -> Traffic:
        if not windows:
            return cls()
        window_s = max(w.window_s for w in windows)

        def weighted(name: str) -> float:
            pairs = [(getattr(w, name), w.num_finished) for w in windows
                     if w.num_finished > 0 and not math.isnan(getattr(w, name))]
            total = sum(n for _, n in pairs)
            return sum(v * n for v, n in pairs) / total if total else NAN

        return cls(window_s=window_s, num_arrivals=sum(w.num_arrivals for w in windows),
                   num_finished=sum(w.num_finished for w in windows), isl_mean=weighted("isl_mean"),
                   isl_p95=weighted("isl_p95"), osl_mean=weighted("osl_mean"), osl_p95=weighted("osl_p95"),
                   ttft_ms_p95=weighted("ttft_ms_p95"), itl_ms_p95=weighted("itl_ms_p95"))
