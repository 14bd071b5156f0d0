"""Throughput mode: forecast the next interval's request rate, ISL and OSL, and size each tier
from the profile's per-replica capacity at the TTFT/ITL targets (DistServe/Dynamo style):

    prefill = ceil(workers of one M/M/c queue of rate x prefill work per prompt that keep 99% of
                   the prompts' waits within the TTFT target less the 95th percentile prompt's latency)
    decode  = ceil(rate * OSL / (decode capacity at context ISL + OSL/2 and the ITL target * max_utilization))

The prefill work per prompt is the profile's busy time averaged over a lognormal fitted to the
new prompt tokens' mean and p95 (a long tail costs more than its mean: attention). The router
sends each prompt to the least loaded prefill worker, so the tier is one pooled queue: its
margin is the queueing tail's (``Profile.prefill_workers``), not ``max_utilization`` per worker
(at 6000-token prompts that cap asked for 9 workers where 7 keep TTFT p99 at 1.2 s). A tier
shrinks only when its demand fits N-1 workers at ``scale_down_band`` of that capacity: a demand
near a boundary does not flap between N and N-1.

Work already waiting is demand too (the backlog a late forecast leaves: a ramp the forecast
trailed, answer lengths learned only when answers finish). The prompt tokens queued on the
prefill tier are worked off within the drain time, ``horizon_s`` (new workers serve after their
start-up), at least one interval: the router sends each prompt to the least loaded worker, so
that queue is the tier's. A decode worker with every seat taken (or its KV full) and requests
waiting for one is not: those requests stay on it, the router sends new ones elsewhere, and it
recomputes each handoff that found no seat (``engine/scheduler.py``'s ``add_prefilled``). It
serves no arrival until its queue is gone: the tier needs the forecast's workers besides it.
Sized for the arrivals alone, a tier a start-up late stayed saturated: every handoff recomputed
at the seat limit held the decode tier at the arrival rate with thousands waiting until the load
fell (the sinusoid's first peak, the mix shift's second half). In a steady state no decode worker
is saturated and the prompt queues are a few prompts: the terms are small.

Aggregated (one tier that prefills and decodes): its workers share their time between the two,
so the tier needs the sum of both needs, ``ceil(prefill need + decode need)``, under the same band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.decision import Reason
from planner.load import SATURATED
from planner.observations import Traffic, WorkerStep
from planner.predictors import MovingAverage, make_predictor
from planner.profile import Profile


@dataclass(frozen=True)
class Backlog:
    """Work the ready workers hold that the sizing for the arrivals does not cover (one tick)."""

    prompt_tokens: float = 0.0  # prompt tokens queued on the tier that computes prompts
    saturated: int = 0  # decode workers with every seat taken (or KV full) and requests waiting for one

    @classmethod
    def of(cls, workers: list[WorkerStep], profile: Profile, aggregated: bool = False) -> Backlog:
        computes = "decode" if aggregated else "prefill"
        prompt = float(sum(w.num_queued_prefill_tokens for w in workers if w.role == computes))
        saturated = sum(1 for w in workers if w.role == "decode" and w.num_waiting > 0
                        and (w.num_running >= profile.max_num_seqs or w.kv_usage > SATURATED))
        return cls(prompt, saturated)

    @property
    def empty(self) -> bool:
        return not (self.prompt_tokens or self.saturated)


@dataclass(frozen=True)
class Forecast:
    rate: float  # requests per second
    isl: float  # mean prompt tokens
    isl_p95: float  # their 95th percentile (NaN: unknown)
    osl: float  # mean output tokens
    hit_rate: float  # fraction of prompt tokens served from the prefix cache


class ThroughputModel:
    def __init__(self, config: PlannerConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        kind, window = config.predictor, config.predictor_window
        self.rate = make_predictor(kind, window)
        # Answer lengths are means over the requests that finished in one interval: few, and the
        # short ones first; they swing from interval to interval without a trend to follow.
        # Averaged. Prompt lengths are the window's arrivals' (``planner.view``): the last window's,
        # so that a shift of the mix frees the prefill tier's workers within a tick, not six.
        self.isl = MovingAverage(1)
        self.isl_p95 = MovingAverage(1)
        self.osl = MovingAverage(config.length_window)
        self.hit_rate = MovingAverage(window)
        # how far ahead new workers serve: ``horizon_s``, or nearer while the launcher has parked
        # workers (``PlannerConfig.horizon_with``; the planner sets it each tick)
        self.horizon_s = config.horizon_s
        self._low_ticks = {"prefill": 0, "decode": 0}
        self.need = {"prefill": 0, "decode": 0}  # the last forecast's replicas, before the down band
        self.backlog = Backlog()

    def observe(self, traffic: Traffic, workers: list[WorkerStep]) -> None:
        """One interval's merged router windows and the ready workers' queues and cache counters."""
        self.rate.observe(traffic.request_rate)
        self.isl.observe(traffic.isl_mean)
        self.isl_p95.observe(traffic.isl_p95)
        self.osl.observe(traffic.osl_mean)
        computes = "decode" if self.config.aggregated else "prefill"  # the tier that computes the prompts
        prompt = sum(w.num_prompt_tokens for w in workers if w.role == computes)
        cached = sum(w.num_cached_tokens for w in workers if w.role == computes)
        if prompt > 0:
            self.hit_rate.observe(min(1.0, cached / prompt))
        self.backlog = Backlog.of(workers, self.profile, self.config.aggregated)

    def forecast(self) -> Forecast:
        """The request rate ``horizon_s`` ahead, or the next interval's if larger (a worker
        that is not needed yet still serves now); lengths for the next interval (a trend in them,
        extrapolated far, overshoots after a shift of the mix)."""
        ahead = self.horizon_intervals
        hit = self.hit_rate.predict()
        rate = max(self.rate.predict(1), self.rate.predict(ahead))
        return Forecast(rate, self.isl.predict(1), self.isl_p95.predict(1), self.osl.predict(1),
                        0.0 if math.isnan(hit) else hit)

    def needs(self) -> tuple[float, float, Reason] | None:
        """Fractional workers each tier needs for the forecast and the backlog (the prompt queue
        worked off within ``drain_s``, the saturated decode workers besides); None while it has a
        NaN in it."""
        f, b = self.forecast(), self.backlog
        cfg = self.config
        if math.isnan(f.rate):
            return None
        if f.rate <= 0 and b.empty:
            return 0.0, 0.0, Reason("forecast-idle", "", {"rate": 0.0})  # the minimums
        if math.isnan(f.isl) or math.isnan(f.osl):
            return None
        new_isl, new_p95 = max(1.0, f.isl * (1 - f.hit_rate)), f.isl_p95 * (1 - f.hit_rate)
        work_s = self.profile.prefill_work_s(new_isl, new_p95)  # busy seconds per prompt
        decode_capacity = self.profile.decode_capacity(f.isl + f.osl / 2, cfg.itl_slo_s) * cfg.max_utilization
        drain_s = self.drain_s
        # the queued prompt tokens as prompts more per second, of the forecast's length
        queued_rate = b.prompt_tokens / new_isl / drain_s
        prefill = self.profile.prefill_workers(f.rate + queued_rate, new_isl, new_p95, cfg.ttft_slo_s)
        decode = f.rate * f.osl / decode_capacity + b.saturated
        values = {"rate": f.rate, "isl": f.isl, "isl_p95": f.isl_p95, "osl": f.osl, "hit_rate": f.hit_rate,
                  "prefill_work_s": work_s, "prefill_utilization": f.rate * work_s / prefill if prefill else 0.0,
                  "decode_capacity_tokens_per_s": decode_capacity, "prefill_need": prefill, "decode_need": decode,
                  "queued_prompt_tokens": b.prompt_tokens, "saturated_decode_workers": float(b.saturated),
                  "drain_s": drain_s}
        return prefill, decode, Reason("forecast", "", values)

    @property
    def horizon_intervals(self) -> int:
        """Intervals ahead the forecast looks (at least the next one)."""
        return max(1, math.ceil(self.horizon_s / self.config.adjustment_interval_s - 1e-9))

    @property
    def drain_s(self) -> float:
        """The time the backlog is sized to be worked off in: a new worker serves after its
        start-up (``horizon_s``), and the next tick comes after one interval."""
        return max(self.config.adjustment_interval_s, self.horizon_s)

    def wanted(self) -> tuple[dict[str, int], Reason] | None:
        """Replicas per tier the forecast and the backlog need now, at least the minimums (the
        ups :meth:`targets` would make, without its down band); None while it has a NaN in it."""
        needs = self.needs()
        if needs is None or self.config.aggregated:
            return None
        cfg = self.config
        return {r: max(math.ceil(n - 1e-9), cfg.minimum(r)) for r, n in zip(("prefill", "decode"), needs[:2])}, needs[2]

    def targets(self, counts: dict[str, int]) -> tuple[int, int, Reason] | None:
        """Replicas per tier: up to the need at once; down only past the band, on
        ``scale_down_ticks`` ticks in a row (to the least those ticks asked for)."""
        needs = self.needs()
        if needs is None:
            return None
        cfg = self.config
        out = [0] if cfg.aggregated else []
        tiers = (("decode", needs[0] + needs[1]),) if cfg.aggregated else zip(("prefill", "decode"), needs[:2])
        for role, need in tiers:
            n = counts[role]
            target = self.need[role] = max(math.ceil(need - 1e-9), cfg.minimum(role))
            if target <= n:
                down = max(math.ceil(need / cfg.scale_down_band - 1e-9), cfg.minimum(role))
                self._low_ticks[role] = self._low_ticks[role] + 1 if down < n else 0
                target = down if self._low_ticks[role] >= cfg.scale_down_ticks else n
            else:
                self._low_ticks[role] = 0
            out.append(target)
        return out[0], out[1], needs[2]
