"""Request-level statistics over a sliding window, published to etcd as a ``RouterWindowStats``
message under ``/tandem/{ns}/metrics/router/{router_id}`` about once a second: arrivals,
ISL/OSL, TTFT and ITL percentiles. The planner reads them; Prometheus gets the same observations
as histograms from ``router.metrics``."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, fields

from runtime.pb import tandem_control_pb2 as cpb


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    num_arrivals: int
    num_finished: int
    request_rate: float  # arrivals per second over the window
    num_inflight: int
    # None where the window holds no finished request
    isl_mean: float | None = None
    isl_p50: float | None = None
    isl_p95: float | None = None
    osl_mean: float | None = None
    osl_p50: float | None = None
    osl_p95: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p95: float | None = None
    ttft_ms_p99: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p95: float | None = None
    itl_ms_p99: float | None = None
    e2e_ms_p50: float | None = None
    num_arrivals_total: int = 0  # since the router started: readers difference them for any interval
    num_finished_total: int = 0
    num_prompt_tokens_total: int = 0  # of every arrival, counted when it arrives
    num_output_tokens_total: int = 0  # of every finished request
    num_requested_tokens_total: int = 0  # max_tokens x n of every arrival (0 without max_tokens), at arrival
    num_finished_requested_tokens_total: int = 0  # the same, of every finished request

    def to_pb(self, router_id: str) -> cpb.RouterWindowStats:
        """The etcd value (``RouterWindowStats``): unset fields where there is no value."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return cpb.RouterWindowStats(router_id=router_id, published_at_unix_ms=int(time.time() * 1000),
                                     **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class _Finished:
    t: float
    isl: int
    osl: int
    ttft_ms: float
    itl_ms: float  # mean inter-token latency of the request; NaN with fewer than 2 tokens
    e2e_ms: float


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class RequestWindow:
    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._arrivals: deque[float] = deque()
        self._finished: deque[_Finished] = deque()
        self.num_inflight = 0
        self.num_arrivals_total = 0
        self.num_finished_total = 0
        self.num_prompt_tokens_total = 0
        self.num_output_tokens_total = 0
        self.num_requested_tokens_total = 0
        self.num_finished_requested_tokens_total = 0

    def arrived(self, isl: int = 0, now: float | None = None, requested: int = 0) -> None:
        """``requested``: the answer tokens it asks for at most (max_tokens x n; 0: unbounded)."""
        self._arrivals.append(time.monotonic() if now is None else now)
        self.num_inflight += 1
        self.num_arrivals_total += 1
        self.num_prompt_tokens_total += isl
        self.num_requested_tokens_total += requested

    def finished(self, isl: int, osl: int, ttft_s: float | None, e2e_s: float, now: float | None = None,
                 requested: int = 0) -> None:
        self.num_inflight -= 1
        self.num_finished_total += 1
        self.num_output_tokens_total += osl
        self.num_finished_requested_tokens_total += requested
        if ttft_s is None:  # failed before its first token: counted as an arrival only
            return
        itl = (e2e_s - ttft_s) / (osl - 1) * 1000 if osl > 1 else math.nan
        self._finished.append(_Finished(time.monotonic() if now is None else now, isl, osl, ttft_s * 1000, itl,
                                        e2e_s * 1000))

    def _prune(self, now: float | None) -> None:
        horizon = (time.monotonic() if now is None else now) - self.window_s
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()
        while self._finished and self._finished[0].t < horizon:
            self._finished.popleft()

    def attainment(self, ttft_ms: float, itl_ms: float, now: float | None = None) -> dict[str, float | None]:
        """Of the requests finished in the window, the fraction that met each SLO target: ``ttft``,
        ``itl`` (the request's mean inter-token latency; one with a single token meets it) and
        ``both``. None where no request finished in the window."""
        self._prune(now)
        done = list(self._finished)
        if not done:
            return {"ttft": None, "itl": None, "both": None}
        ttft_ok = [f.ttft_ms <= ttft_ms for f in done]
        itl_ok = [math.isnan(f.itl_ms) or f.itl_ms <= itl_ms for f in done]
        return {"ttft": sum(ttft_ok) / len(done), "itl": sum(itl_ok) / len(done),
                "both": sum(a and b for a, b in zip(ttft_ok, itl_ok)) / len(done)}

    def num_finished(self, now: float | None = None) -> int:
        self._prune(now)
        return len(self._finished)

    def snapshot(self, now: float | None = None) -> WindowStats:
        self._prune(now)
        done = list(self._finished)
        isl, osl = [float(f.isl) for f in done], [float(f.osl) for f in done]
        ttft = [f.ttft_ms for f in done]
        itl = [f.itl_ms for f in done if not math.isnan(f.itl_ms)]

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return WindowStats(
            window_s=self.window_s, num_arrivals=len(self._arrivals), num_finished=len(done),
            request_rate=len(self._arrivals) / self.window_s, num_inflight=self.num_inflight,
            isl_mean=mean(isl), isl_p50=percentile(isl, 50), isl_p95=percentile(isl, 95),
            osl_mean=mean(osl), osl_p50=percentile(osl, 50), osl_p95=percentile(osl, 95),
            ttft_ms_p50=percentile(ttft, 50), ttft_ms_p90=percentile(ttft, 90), ttft_ms_p95=percentile(ttft, 95),
            ttft_ms_p99=percentile(ttft, 99), itl_ms_p50=percentile(itl, 50), itl_ms_p90=percentile(itl, 90),
            itl_ms_p95=percentile(itl, 95), itl_ms_p99=percentile(itl, 99),
            e2e_ms_p50=percentile([f.e2e_ms for f in done], 50),
            num_arrivals_total=self.num_arrivals_total, num_finished_total=self.num_finished_total,
            num_prompt_tokens_total=self.num_prompt_tokens_total, num_output_tokens_total=self.num_output_tokens_total,
            num_requested_tokens_total=self.num_requested_tokens_total,
            num_finished_requested_tokens_total=self.num_finished_requested_tokens_total,
        )


# The process's window: requests through this router (fed by router.text_generation).
WINDOW = RequestWindow()


class HandoffWindow:
    """The KV handoff times the decode workers report (``PullStats.pull_ms``), over a window."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._times: deque[tuple[float, float]] = deque()

    def add(self, seconds: float) -> None:
        self._times.append((time.monotonic(), seconds))

    def percentiles(self) -> dict[str, float | None]:
        horizon = time.monotonic() - self.window_s
        while self._times and self._times[0][0] < horizon:
            self._times.popleft()
        values = [s * 1000 for _, s in self._times]
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "count": len(values)}


# The KV handoffs of requests through this router (fed by router.request_flow).
HANDOFFS = HandoffWindow()
