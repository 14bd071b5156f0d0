"""Throughput mode: forecast the next interval's request rate, ISL and OSL, and size each tier
from the profile's per-replica capacity at the TTFT/ITL targets (DistServe/Dynamo style):

    prefill = ceil(rate * ISL * (1 - prefix hit rate) / prefill capacity at that ISL and the TTFT target)
    decode  = ceil(rate * OSL / decode capacity at context ISL + OSL/2 and the ITL target)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.decision import Reason
from planner.observations import Traffic, WorkerStep
from planner.predictors import MovingAverage, make_predictor
from planner.profile import Profile


@dataclass(frozen=True)
class Forecast:
    rate: float  # requests per second
    isl: float  # mean prompt tokens
    osl: float  # mean output tokens
    hit_rate: float  # fraction of prompt tokens served from the prefix cache


class ThroughputModel:
    def __init__(self, config: PlannerConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        kind, window = config.predictor, config.predictor_window
        self.rate = make_predictor(kind, window)
        self.isl = make_predictor(kind, window)
        self.osl = make_predictor(kind, window)
        self.hit_rate = MovingAverage(window)

    def observe(self, traffic: Traffic, workers: list[WorkerStep]) -> None:
        """One interval's merged router windows and the prefill tier's cache counters."""
        self.rate.observe(traffic.request_rate)
        self.isl.observe(traffic.isl_mean)
        self.osl.observe(traffic.osl_mean)
        prompt = sum(w.num_prompt_tokens for w in workers if w.role == "prefill")
        cached = sum(w.num_cached_tokens for w in workers if w.role == "prefill")
        if prompt > 0:
            self.hit_rate.observe(min(1.0, cached / prompt))

    def forecast(self) -> Forecast:
        hit = self.hit_rate.predict()
        return Forecast(self.rate.predict(), self.isl.predict(), self.osl.predict(), 0.0 if math.isnan(hit) else hit)

    def targets(self) -> tuple[int, int, Reason] | None:
        """Replicas per tier for the forecast; None while the forecast has a NaN in it."""
        f = self.forecast()
        cfg = self.config
        if math.isnan(f.rate):
            return None
        if f.rate <= 0:
            return cfg.min_prefill, cfg.min_decode, Reason("forecast-idle", "", {"rate": 0.0})
        if math.isnan(f.isl) or math.isnan(f.osl):
            return None
        new_isl = max(1.0, f.isl * (1 - f.hit_rate))
        prefill_capacity = self.profile.prefill_capacity(new_isl, cfg.ttft_slo_s)
        decode_capacity = self.profile.decode_capacity(f.isl + f.osl / 2, cfg.itl_slo_s)
        prefill = math.ceil(f.rate * new_isl / prefill_capacity - 1e-9)
        decode = math.ceil(f.rate * f.osl / decode_capacity - 1e-9)
        values = {"rate": f.rate, "isl": f.isl, "osl": f.osl, "hit_rate": f.hit_rate,
                  "prefill_capacity_tokens_per_s": prefill_capacity,
                  "decode_capacity_tokens_per_s": decode_capacity, "prefill": prefill, "decode": decode}
        return max(prefill, cfg.min_prefill), max(decode, cfg.min_decode), Reason("forecast", "", values)
