"""Online least squares of step time on a step's load, for the load mode.

Samples are the workers' per-window step summaries (mean load per step, mean step time); the
last ``window`` samples are fitted by ridge regression toward a prior (the profile's
coefficients when there is one), so the fit starts from the profile and follows the live
system as samples come in. Without a prior and with fewer samples than coefficients + 2 there
is no fit (``predict`` returns NaN).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np


class StepRegression:
    def __init__(self, num_features: int, prior: Sequence[float] | None = None, prior_weight: float = 4.0,
                 window: int = 256) -> None:
        self.num_features = num_features  # an intercept is added in front
        self.samples: deque[tuple[tuple[float, ...], float]] = deque(maxlen=window)
        self.prior = None if prior is None else np.asarray(prior, dtype=float)
        if self.prior is not None and len(self.prior) != num_features + 1:
            raise ValueError(f"prior needs {num_features + 1} coefficients (intercept first)")
        self.prior_weight = prior_weight
        self._coef: np.ndarray | None = None

    def observe(self, features: Sequence[float], step_s: float) -> None:
        """One sample; non-finite ones (a window without steps) are ignored."""
        if len(features) != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {len(features)}")
        if not all(math.isfinite(v) for v in (*features, step_s)) or step_s <= 0:
            return
        self.samples.append((tuple(float(v) for v in features), float(step_s)))
        self._coef = None

    @property
    def coef(self) -> np.ndarray | None:
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> np.ndarray | None:
        n = len(self.samples)
        if self.prior is None and n < self.num_features + 3:
            return None
        if n == 0:
            return self.prior
        x = np.array([(1.0, *f) for f, _ in self.samples])
        y = np.array([t for _, t in self.samples])
        # Relative error matters: weight by 1 / step time. Columns are scaled so the ridge term
        # weighs every coefficient alike whatever its units.
        w = 1.0 / y
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        xs = x / scale * w[:, None]
        ys = y * w
        prior = np.zeros(x.shape[1]) if self.prior is None else self.prior * scale
        lam = self.prior_weight if self.prior is not None else 1e-6
        a = xs.T @ xs + lam * np.eye(x.shape[1])
        b = xs.T @ ys + lam * prior
        coef = np.linalg.solve(a, b) / scale
        return np.maximum(coef, 0.0)  # time never shrinks with load

    def predict(self, features: Sequence[float]) -> float:
        coef = self.coef
        if coef is None:
            return math.nan
        return float(coef[0] + sum(c * f for c, f in zip(coef[1:], features)))
