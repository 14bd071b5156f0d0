"""A worker's performance profile, as the throughput mode reads it (``deploy/profiler.py``
writes it by sweeping an engine; ``planner/profiles/*.json`` ship with the package).

File format (JSON, one object)::

    {"name": "h200-llama-3.1-8b",
     "source": {...},                       # what was swept: engine, sim profile, device, date
     "max_num_batched_tokens": 2048, "max_num_seqs": 256, "kv_capacity_tokens": 819200,
     "prefill": {"isl": [...],              # prompt lengths swept
                 "latency_s": [...],         # one request alone: its chunked prefill's wall time
                 "tokens_per_s": [...]},     # a worker kept busy with prompts of that length
     "decode": {"batch": [...], "context": [...],  # running sequences, KV tokens per sequence
                "step_s": [[...], ...]},     # step wall time, step_s[i][j] at batch[i], context[j]
     "capacity": {"ttft_ms": 2000, "itl_ms": 50,  # capacity at these targets (for reading; the
                  "prefill_tokens_per_s": [...],   # planner recomputes it for its own targets;
                                                   # prefill: each worker of an 8-worker tier)
                  "decode_max_batch": [...], "decode_tokens_per_s": [...]}}

Between swept points values are interpolated linearly (bilinearly on the decode grid); beyond
the last point they are extrapolated from the last two (step times grow about linearly).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROFILE_DIR = Path(__file__).with_name("profiles")
MIN_PREFILL_UTILIZATION = 0.3  # a prefill worker is never planned idler, even where the target is out of reach
# the router prefills on a decode worker once every prefill worker has this many full steps queued
# (router/core.py: 8 x max_num_batched_tokens): the prefill tier's waits are kept under it too
SPILL_STEPS = 8
PREFILL_TTFT_QUANTILE = 0.99  # the share of prompts whose queueing the prefill tier is sized to keep in the slack
# the share kept short of the router's spill point: a spilled prompt is computed on a decode worker in chunks of
# max_num_batched_tokens beside its decodes, and each chunk's step puts every request decoding there over the ITL
# target once (a p99 ITL over an answer of < 100 tokens: a miss). On the mix shift's start (8 prefill workers at
# 6000-token prompts, 2 decode workers) nine spills in two seconds broke 43 requests' ITL: a spill costs some
# five requests, so it is kept five times rarer than a TTFT miss
PREFILL_SPILL_QUANTILE = 0.998


def interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Linear interpolation, extrapolated from the two end points on either side."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class PrefillCurve:
    isl: tuple[int, ...]
    latency_s: tuple[float, ...]
    tokens_per_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.isl or len(self.isl) != len(self.latency_s) or len(self.isl) != len(self.tokens_per_s):
            raise ValueError("prefill curve: isl, latency_s and tokens_per_s must have the same non-zero length")
        if list(self.isl) != sorted(set(self.isl)):
            raise ValueError("prefill curve: isl must be strictly increasing")


@dataclass(frozen=True)
class DecodeGrid:
    batch: tuple[int, ...]
    context: tuple[int, ...]
    step_s: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if len(self.step_s) != len(self.batch) or any(len(row) != len(self.context) for row in self.step_s):
            raise ValueError("decode grid: step_s must be len(batch) rows of len(context) values")
        for name in ("batch", "context"):
            values = list(getattr(self, name))
            if not values or values != sorted(set(values)):
                raise ValueError(f"decode grid: {name} must be strictly increasing and not empty")


@dataclass(frozen=True)
class Profile:
    name: str
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_capacity_tokens: int
    prefill: PrefillCurve
    decode: DecodeGrid
    source: dict[str, Any] = field(default_factory=dict)
    capacity: dict[str, Any] = field(default_factory=dict)

    # ---- the curves -------------------------------------------------------------------------
    def prefill_latency_s(self, isl: float) -> float:
        """Wall time of one prompt of ``isl`` new tokens on an idle worker."""
        return max(0.0, interp(isl, self.prefill.isl, self.prefill.latency_s))

    def prefill_tokens_per_s(self, isl: float) -> float:
        """Prompt tokens per second of a worker kept busy with prompts of ``isl`` tokens (past the
        longest profiled prompt: one prompt fills every step, its length over its latency)."""
        if isl > self.prefill.isl[-1]:
            return isl / max(self.prefill_latency_s(isl), 1e-9)
        return max(1e-9, interp(isl, self.prefill.isl, self.prefill.tokens_per_s))

    def decode_step_s(self, batch: float, context: float) -> float:
        """Step time with ``batch`` running sequences of ``context`` KV tokens each."""
        d = self.decode
        rows = [interp(context, d.context, row) for row in d.step_s]
        return max(0.0, interp(batch, d.batch, rows))

    # ---- capacity at the targets --------------------------------------------------------------
    def prefill_workers(self, rate: float, isl_mean: float, isl_p95: float, ttft_s: float,
                        quantile: float = PREFILL_TTFT_QUANTILE,
                        spill_quantile: float = PREFILL_SPILL_QUANTILE) -> float:
        """Prefill workers (fractional) for ``rate`` prompts per second of this length distribution
        (new tokens) to keep ``quantile`` of their TTFTs under ``ttft_s`` and ``spill_quantile`` of
        them short of the router's spill point. The router sends each prompt to the least loaded
        worker, so the tier is one queue served by N workers (M/M/c, not N separate M/M/1 queues):
        :func:`pooled_workers` of the busy load (``rate`` x :meth:`prefill_work_s`), the more of two:
        ``quantile`` of the waits within the slack the 95th percentile prompt leaves after its own
        latency, and ``spill_quantile`` within the spill point (a queue of ``SPILL_STEPS`` full steps
        on every worker sends prompts to the decode workers, whose steps then break the ITL target of
        every request decoding there: a spill costs several requests, a TTFT miss one). A target
        that prompt's latency alone misses plans each worker at 0.3."""
        load = rate * self.prefill_work_s(isl_mean, isl_p95)
        if load <= 0:
            return 0.0
        longest = isl_p95 if math.isfinite(isl_p95) and isl_p95 > isl_mean else isl_mean
        service_s = self.prefill_work_s(isl_mean, isl_p95)
        slack = ttft_s - self.prefill_latency_s(longest)
        if slack <= 0:
            return load / MIN_PREFILL_UTILIZATION
        spill_s = SPILL_STEPS * self.max_num_batched_tokens / self.prefill_tokens_per_s(isl_mean)
        return max(pooled_workers(load, service_s, min(slack, spill_s), quantile),
                   pooled_workers(load, service_s, spill_s, max(quantile, spill_quantile)))

    def prefill_capacity(self, isl: float, ttft_s: float, workers: int = 8) -> float:
        """Prompt tokens per second each worker of a ``workers``-worker tier takes at ``isl``-token
        prompts with :meth:`prefill_workers`' TTFT target met (for reading: the profile's table)."""
        lo, hi = 0.0, workers * self.prefill_tokens_per_s(isl) / max(isl, 1.0)  # prompts per second
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.prefill_workers(mid, isl, math.nan, ttft_s) <= workers else (lo, mid)
        return lo * isl / workers

    def prefill_work_s(self, isl_mean: float, isl_p95: float = math.nan) -> float:
        """Busy worker-seconds per prompt when prompt lengths are lognormal with this mean and 95th
        percentile (the mean's alone when the percentile is unknown). A prompt's cost grows faster
        than its length (attention), so a long tail costs more than its mean says."""
        sigma = lognormal_sigma(isl_mean, isl_p95)
        if sigma == 0.0:
            return max(isl_mean, 1.0) / self.prefill_tokens_per_s(isl_mean)
        mu = math.log(isl_mean) - sigma * sigma / 2
        total = 0.0
        for x, w in zip(*_HERMITE):
            length = math.exp(mu + sigma * math.sqrt(2) * x)
            total += w * max(length, 1.0) / self.prefill_tokens_per_s(length)
        return total / math.sqrt(math.pi)

    def decode_max_batch(self, context: float, itl_s: float) -> int:
        """Most sequences of ``context`` KV tokens one decode worker runs with its step under
        ``itl_s``, within ``max_num_seqs`` and its KV capacity (0: not even one)."""
        limit = min(self.max_num_seqs, int(self.kv_capacity_tokens // max(context, 1.0)))
        lo, hi = 0, limit
        while lo < hi:  # step time grows with the batch: the largest batch under the target
            mid = (lo + hi + 1) // 2
            if self.decode_step_s(mid, context) <= itl_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def decode_capacity(self, context: float, itl_s: float) -> float:
        """Output tokens per second one decode worker produces at the largest batch under the
        ITL target (one sequence's rate if even one misses it)."""
        n = max(1, self.decode_max_batch(context, itl_s))
        return n / max(self.decode_step_s(n, context), 1e-9)

    def with_capacity(self, ttft_ms: float, itl_ms: float) -> Profile:
        """A copy whose ``capacity`` table holds the capacities at these targets (for reading)."""
        isl = list(self.prefill.isl)
        context = list(self.decode.context)
        table = {"ttft_ms": ttft_ms, "itl_ms": itl_ms, "isl": isl,
                 "prefill_tokens_per_s": [round(self.prefill_capacity(i, ttft_ms / 1000), 1) for i in isl],
                 "context": context,
                 "decode_max_batch": [self.decode_max_batch(c, itl_ms / 1000) for c in context],
                 "decode_tokens_per_s": [round(self.decode_capacity(c, itl_ms / 1000), 1) for c in context]}
        return replace(self, capacity=table)

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        try:
            prefill = PrefillCurve(tuple(d["prefill"]["isl"]), tuple(d["prefill"]["latency_s"]),
                                   tuple(d["prefill"]["tokens_per_s"]))
            decode = DecodeGrid(tuple(d["decode"]["batch"]), tuple(d["decode"]["context"]),
                                tuple(tuple(row) for row in d["decode"]["step_s"]))
            return cls(name=str(d["name"]), max_num_batched_tokens=int(d["max_num_batched_tokens"]),
                       max_num_seqs=int(d["max_num_seqs"]), kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                       prefill=prefill, decode=decode, source=dict(d.get("source", {})),
                       capacity=dict(d.get("capacity", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad planner profile: missing or malformed {e}") from None

    @classmethod
    def load(cls, name_or_path: str) -> Profile:
        """A profile by name (``planner/profiles/<name>.json``) or by path."""
        path = Path(name_or_path)
        if path.suffix != ".json":
            path = PROFILE_DIR / f"{path.name}.json"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
            raise ValueError(f"no planner profile {name_or_path!r} ({e.strerror}); known: {known}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def erlang_c(servers: int, load: float) -> float:
    """The probability that an arrival waits in an M/M/c queue with ``servers`` servers and
    ``load`` (arrival rate x mean service time, in servers); 1 when ``load`` >= ``servers``."""
    if load >= servers:
        return 1.0
    b = 1.0  # Erlang B, by its recursion B(k) = a B(k-1) / (k + a B(k-1))
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


def pooled_workers(load: float, service_s: float, slack_s: float, quantile: float) -> float:
    """Servers (fractional) one M/M/c queue of ``load`` (in busy servers) with mean service
    ``service_s`` needs so that a share ``quantile`` of arrivals waits at most ``slack_s``:
    P(wait > t) = C(c, load) exp(-(c - load) t / service). The smallest integer c that meets it,
    less the part of the last server not needed (the tail interpolated in log between c - 1, or
    ``load`` itself where the tail is 1, and c), so that a band above it means a margin."""
    if load <= 0:
        return 0.0
    miss = 1.0 - quantile

    def log_tail(c: float) -> float:
        if c <= load:
            return 0.0
        return math.log(max(erlang_c(int(c), load), 1e-300)) - (c - load) * slack_s / service_s

    c = max(1, math.floor(load) + 1)
    while log_tail(c) > math.log(miss):
        c += 1
    lo = max(float(c - 1), load)
    t_lo, t_hi = log_tail(lo), log_tail(c)
    return lo + (c - lo) * (t_lo - math.log(miss)) / (t_lo - t_hi)


def lognormal_sigma(mean: float, p95: float) -> float:
    """sigma of the lognormal with this mean and 95th percentile: ln(p95 / mean) = 1.645 sigma -
    sigma^2 / 2, the smaller root; 0 where the percentile is unknown or not above the mean."""
    if not (math.isfinite(mean) and math.isfinite(p95)) or mean <= 0 or p95 <= mean:
        return 0.0
    z, r = 1.6449, math.log(p95 / mean)
    disc = z * z - 2 * r
    return z - math.sqrt(disc) if disc > 0 else z


_HERMITE = ((-2.930637420257244, -1.981656756695843, -1.157193712446780, -0.381186990207322,
             0.381186990207322, 1.157193712446780, 1.981656756695843, 2.930637420257244),
            (1.996040722113676e-04, 1.707798300741348e-02, 2.078023258148919e-01, 6.611470125582413e-01,
             6.611470125582413e-01, 2.078023258148919e-01, 1.707798300741348e-02, 1.996040722113676e-04))
# Gauss-Hermite nodes and weights (8 points): integral of exp(-x^2) f(x) = sum w f(x)


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
