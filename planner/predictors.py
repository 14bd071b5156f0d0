"""Next-interval forecasts of one series (request rate, mean ISL, mean OSL): observe the
interval's value, predict the next one. NaN observations (an empty window) are skipped; a
predictor that has seen nothing predicts NaN. Predictions are never negative.

``autoreg`` is statsmodels' AutoReg, imported when first fitted (the planner's import stays light).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Protocol

from numpy.linalg import LinAlgError


class Predictor(Protocol):
    def observe(self, value: float) -> None: ...

    def predict(self, ahead: int = 1) -> float:
        """The value ``ahead`` intervals after the last observed one."""
        ...


class Constant:
    """The next interval looks like the last one."""

    def __init__(self) -> None:
        self.last = math.nan

    def observe(self, value: float) -> None:
        if not math.isnan(value):
            self.last = value

    def predict(self, ahead: int = 1) -> float:
        return self.last


class MovingAverage:
    def __init__(self, window: int = 10) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        if not math.isnan(value):
            self.values.append(value)

    def predict(self, ahead: int = 1) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan


class KalmanTrend:
    """Kalman filter on a local linear trend: level_{t+1} = level_t + slope_t + w, slope_{t+1} =
    slope_t + v, observed value = level + e. Noise variances are relative to the measurement
    noise (R = 1) and the state starts at the first observation, so the gains do not depend on
    the series' units. Predicts level + ahead x slope."""

    def __init__(self, q_level: float = 1.0, q_slope: float = 0.1) -> None:
        self.q = (q_level, q_slope)
        self.x: list[float] | None = None  # [level, slope]
        self.p = [[1.0, 0.0], [0.0, 1.0]]

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        if self.x is None:
            self.x = [value, 0.0]
            return
        (level, slope), p = self.x, self.p
        # predict: x = F x, P = F P F' + Q with F = [[1, 1], [0, 1]]
        level = level + slope
        p00 = p[0][0] + p[0][1] + p[1][0] + p[1][1] + self.q[0]
        p01 = p[0][1] + p[1][1]
        p11 = p[1][1] + self.q[1]
        # update with H = [1, 0], R = 1
        innovation = value - level
        k0, k1 = p00 / (p00 + 1.0), p01 / (p00 + 1.0)
        self.x = [level + k0 * innovation, slope + k1 * innovation]
        self.p = [[(1 - k0) * p00, (1 - k0) * p01], [(1 - k0) * p01, p11 - k1 * p01]]

    def predict(self, ahead: int = 1) -> float:
        if self.x is None:
            return math.nan
        return max(0.0, self.x[0] + ahead * self.x[1])


class AutoRegressive:
    """statsmodels' ``AutoReg`` (an AR(``lags``) with a constant: ARIMA(lags, 0, 0)) refitted on
    the last ``history`` observations at each predict; with fewer than ``min_points`` it
    predicts the last value. (statsmodels' ``ARIMA`` class fits by maximum likelihood in about
    0.4 s per fit on this machine; ``AutoReg`` fits by least squares in about 2 ms.) An AR(2)
    follows a periodic load; the trend is in the lags."""

    def __init__(self, lags: int = 2, history: int = 80, min_points: int = 8) -> None:
        self.lags = lags
        self.values: deque[float] = deque(maxlen=history)
        self.min_points = max(min_points, 2 * lags + 2)
        self._cached: tuple[int, float] | None = None  # (ahead, forecast) since the last observation

    def observe(self, value: float) -> None:
        if not math.isnan(value):
            self.values.append(value)
            self._cached = None

    def predict(self, ahead: int = 1) -> float:
        if not self.values:
            return math.nan
        if len(self.values) < self.min_points:
            return self.values[-1]
        if self._cached is None or self._cached[0] != ahead:
            from statsmodels.tsa.ar_model import AutoReg  # heavy: only when used

            values = list(self.values)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # statsmodels' chatter on short or flat series
                try:
                    fit = AutoReg(values, lags=self.lags, trend="c").fit()
                    forecast = float(fit.predict(start=len(values), end=len(values) + ahead - 1)[-1])
                except (ValueError, ArithmeticError, IndexError, LinAlgError):  # a degenerate series
                    forecast = values[-1]
            self._cached = (ahead, forecast if math.isfinite(forecast) else values[-1])
        return max(0.0, self._cached[1])


def make_predictor(kind: str, window: int = 10) -> Predictor:
    if kind == "constant":
        return Constant()
    if kind == "moving_average":
        return MovingAverage(window)
    if kind == "kalman":
        return KalmanTrend()
    if kind == "autoreg":
        return AutoRegressive(history=8 * window)
    raise ValueError(f"unknown predictor {kind!r}")
