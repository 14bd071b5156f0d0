"""Workloads for ``bench/planner.py``: a Mooncake-format JSONL trace, or a built-in shape.

A Mooncake trace line: ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids":
[...]}``; ``hash_ids`` name the prompt's 512-token blocks (equal ids: equal content, so a
prefix cache can serve them). Built-in shapes draw Poisson arrivals from a rate curve (by
thinning) and lognormal lengths; their prompts share nothing (unique hash ids).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_BLOCK_TOKENS = 512  # Mooncake's hash_ids granularity
SHAPES = ("sinusoid", "burst", "mix_shift", "flat", "stop")


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the start
    isl: int
    osl: int
    hashes: tuple[int, ...]  # one per TRACE_BLOCK_TOKENS prompt tokens


@dataclass(frozen=True)
class Workload:
    name: str
    arrivals: list[Arrival]
    duration_s: float
    stop_s: float | None = None  # when traffic stops for good (the stop shape)


def load_trace(path: str | Path, limit_s: float | None = None) -> Workload:
    arrivals = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                a = Arrival(float(row["timestamp"]) / 1000, int(row["input_length"]), max(1, int(row["output_length"])),
                            tuple(int(h) for h in row.get("hash_ids", ())))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a Mooncake trace line ({e})") from None
            if a.isl < 1:
                raise ValueError(f"{path}:{n}: input_length must be >= 1")
            if limit_s is None or a.t <= limit_s:
                arrivals.append(a)
    if not arrivals:
        raise ValueError(f"{path}: no requests")
    arrivals.sort(key=lambda a: a.t)
    t0 = arrivals[0].t
    arrivals = [Arrival(a.t - t0, a.isl, a.osl, a.hashes) for a in arrivals]
    return Workload(Path(path).stem, arrivals, arrivals[-1].t + 1.0)


def _lognormal(rng: np.random.Generator, mean: float, cv: float, size: int, lo: int, hi: int) -> np.ndarray:
    sigma = math.sqrt(math.log(1 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, size)), lo, hi).astype(int)


def _poisson(rng: np.random.Generator, rate: Callable[[float], float], peak: float, duration_s: float) -> np.ndarray:
    n = rng.poisson(peak * duration_s)
    t = np.sort(rng.uniform(0, duration_s, n))
    keep = rng.uniform(0, peak, n) < np.array([rate(x) for x in t])
    return t[keep]


def shape(name: str, duration_s: float = 3600.0, scale: float = 1.0, seed: int = 0) -> Workload:
    """A built-in load shape; ``scale`` multiplies its request rate."""
    rng = np.random.default_rng(seed)
    isl_mean, osl_mean = 2000.0, 250.0
    stop_s = None
    if name == "sinusoid":  # one trough-to-peak-to-trough cycle every 30 minutes
        def rate(t: float) -> float:
            return 4 + 86 * (1 - math.cos(2 * math.pi * t / 1800)) / 2
    elif name == "burst":  # 10x for the middle third
        def rate(t: float) -> float:
            return 80.0 if duration_s / 3 <= t < 2 * duration_s / 3 else 8.0
    elif name == "mix_shift" or name == "flat":  # long prompts/short answers, then short prompts/long answers
        def rate(t: float) -> float:
            return 40.0
    elif name == "stop":  # steady, then nothing for the last third
        stop_s = 2 * duration_s / 3

        def rate(t: float) -> float:
            return 40.0 if t < stop_s else 0.0
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")
    peak = scale * max(rate(x) for x in np.linspace(0, duration_s, 2001))
    times = _poisson(rng, lambda t: scale * rate(t), peak, duration_s)
    n = len(times)
    isl = _lognormal(rng, isl_mean, 0.8, n, 16, 32000)
    osl = _lognormal(rng, osl_mean, 0.8, n, 1, 4000)
    if name == "mix_shift":
        late = times >= duration_s / 2
        # 40 req/s x 6000 prompt tokens fills about 9 prefill workers; 40 x 1500 answer tokens about 12 decode
        isl = np.where(late, _lognormal(rng, 400, 0.5, n, 16, 32000), _lognormal(rng, 6000, 0.5, n, 16, 32000))
        osl = np.where(late, _lognormal(rng, 1500, 0.5, n, 1, 4000), _lognormal(rng, 40, 0.5, n, 1, 4000))
    arrivals, next_hash = [], 0
    for t, i, o in zip(times, isl, osl):
        blocks = -(-int(i) // TRACE_BLOCK_TOKENS)
        arrivals.append(Arrival(float(t), int(i), int(o), tuple(range(next_hash, next_hash + blocks))))
        next_hash += blocks
    return Workload(name, arrivals, duration_s, stop_s)
