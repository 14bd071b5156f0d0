"""The planner's settings: one frozen dataclass, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("load", "throughput", "both")
PREDICTORS = ("constant", "moving_average", "kalman", "autoreg")


@dataclass(frozen=True)
class PlannerConfig:
    mode: str = "both"  # load | throughput | both (throughput sets the floor, load scales above it)
    # One tier of workers that prefill and decode (registered as decode): only its replicas are
    # planned, against both targets; no prefill tier (min_prefill 0).
    aggregated: bool = False
    ttft_slo_ms: float = 2000.0
    itl_slo_ms: float = 50.0
    gpu_budget: int = 16  # GPUs both tiers may hold together, starting and draining workers included
    gpus_per_worker: int = 1
    min_prefill: int = 1
    min_decode: int = 1
    adjustment_interval_s: float = 30.0  # one tick; the throughput mode predicts the next interval
    grace_s: float = 30.0  # no new scaling for this long after a change was issued
    # the fast check between ticks (``Planner.react``: starts on a breach coming, nothing else), this
    # often; the adapters keep the cadence (0: none)
    fast_interval_s: float = 0.0
    start_timeout_s: float = 300.0  # a start not ready after this is abandoned (no GPU came free)
    action_timeout_s: float = 600.0  # an issued action the observations never reflect is forgotten
    # load mode
    scale_down_margin: float = 0.8  # scale down only if every replica stays under this x SLO with N-1
    scale_down_ticks: int = 2  # ... on this many ticks in a row (a noisy flat load does not flap)
    # throughput mode
    max_utilization: float = 0.8  # plan each worker at most this busy: bursts, imbalance, the router's spill rule
    scale_down_band: float = 0.9  # scale down only when the demand fits N-1 workers at this x max_utilization
    predictor: str = "kalman"
    # forecast this far ahead: a worker started now serves only after its start-up, so size for
    # the load then (0: the next interval)
    horizon_s: float = 0.0
    # a start that takes a parked worker (the launcher's warm pool, ``Observation.num_parked``)
    # serves after this instead: while one is parked, the forecast looks this plus an interval
    # ahead, if nearer than ``horizon_s`` (0: starts are never faster than ``horizon_s`` says)
    wake_s: float = 0.0
    predictor_window: int = 10  # moving average: intervals; autoreg: fits on up to 8x this history
    length_window: int = 6  # ISL and OSL: mean of the last this many intervals
    max_step_up: int = 0  # throughput mode: most replicas added per tier per tick (0: no limit)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"planner mode must be one of {MODES}, got {self.mode!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.ttft_slo_ms <= 0 or self.itl_slo_ms <= 0:
            raise ValueError("ttft_slo_ms and itl_slo_ms must be positive")
        if self.gpus_per_worker < 1:
            raise ValueError(f"gpus_per_worker must be >= 1, got {self.gpus_per_worker}")
        if self.min_prefill < 0 or self.min_decode < 1:
            raise ValueError("min_prefill must be >= 0 and min_decode >= 1 (the decode tier serves every request)")
        if self.aggregated and self.min_prefill:
            raise ValueError(f"an aggregated cluster has no prefill tier: min_prefill must be 0 ({self.min_prefill})")
        if (self.min_prefill + self.min_decode) * self.gpus_per_worker > self.gpu_budget:
            raise ValueError(f"the minimums ({self.min_prefill} prefill + {self.min_decode} decode workers of "
                             f"{self.gpus_per_worker} GPUs) exceed gpu_budget={self.gpu_budget}")
        if self.adjustment_interval_s <= 0 or self.grace_s < 0 or self.start_timeout_s <= 0:
            raise ValueError("adjustment_interval_s and start_timeout_s must be positive, grace_s >= 0")
        if not 0 < self.max_utilization <= 1 or not 0 < self.scale_down_band <= 1:
            raise ValueError("max_utilization and scale_down_band must be in (0, 1]")
        if not 0 < self.scale_down_margin <= 1:
            raise ValueError(f"scale_down_margin must be in (0, 1], got {self.scale_down_margin}")
        if self.fast_interval_s < 0:
            raise ValueError(f"fast_interval_s must be >= 0 (0: no fast check), got {self.fast_interval_s}")
        if self.horizon_s < 0 or self.wake_s < 0:
            raise ValueError(f"horizon_s and wake_s must be >= 0, got {self.horizon_s}, {self.wake_s}")
        if self.scale_down_ticks < 1 or self.predictor_window < 1 or self.length_window < 1 or self.max_step_up < 0:
            raise ValueError("scale_down_ticks, predictor_window and length_window must be >= 1, max_step_up >= 0")

    @property
    def ttft_slo_s(self) -> float:
        return self.ttft_slo_ms / 1000

    @property
    def itl_slo_s(self) -> float:
        return self.itl_slo_ms / 1000

    @property
    def horizon_intervals(self) -> int:
        """Intervals ahead the throughput mode forecasts (at least the next one)."""
        return max(1, math.ceil(self.horizon_s / self.adjustment_interval_s - 1e-9))

    def horizon_with(self, num_parked: int) -> float:
        """The forecast's horizon when ``num_parked`` workers are parked: a start takes one and
        serves after ``wake_s``; none parked, after the start-up ``horizon_s`` is sized for."""
        if num_parked <= 0 or self.wake_s <= 0:
            return self.horizon_s
        return min(self.horizon_s, self.wake_s + self.adjustment_interval_s)

    @property
    def max_workers(self) -> int:
        return self.gpu_budget // self.gpus_per_worker

    def minimum(self, role: str) -> int:
        return self.min_prefill if role == "prefill" else self.min_decode
