"""Routing decisions as pure functions: no I/O, unit-tested without a cluster.

A worker's load is what the routers know of it: the requests they have in flight there (this
router's own, live; its peers', as they publish them). The KV-aware cost reads only that
accounting: a worker's own report lags by up to two publish intervals and would make a worker
that has just finished look busy. The cost is DESIGN.md's "Routing cost" (after Dynamo):

    cost = prefill_load_scale * (new prefill blocks after its cached overlap + its queued prefill blocks)
           + its active decode blocks

lowest wins; ``temperature > 0`` samples softmax(-cost / temperature) instead; ties are broken
at random. A leading block the worker holds only in its host tier (``router.kv_index.Overlap``) is
not new work, but it is copied back to the device: it counts :data:`HOST_BLOCK_WEIGHT` of a
new block in the prefill term. The same function serves both tiers. For the decode tier in disaggregated mode a
worker's overlap counts only where it would prefill locally (the tokens it would still compute
are at most ``max_local_prefill_tokens``): elsewhere the whole prompt is computed anew (on the
prefill tier) and moved, so a decode worker that can finish the prompt from its own cache wins
unless it is much busier.

The two terms are different kinds of time; ``prefill_load_scale`` converts one into the other.
A prefill block is 16 tokens of forward compute, run once, that every request queued on the
worker waits for before its first token. An active decode block is 16 tokens of KV that every
step reads while its request lives: per step, a small fraction of a prefill block. In the fitted
step-time profiles (``engine/sim_profiles``, from ``bench/fit_sim.py``) one prefill block takes
as long as one active block adds to 170-220 steps (H200, Llama-3.1-8B; 0-2k cached tokens) and
to 20-80 steps (CPU, SmolLM2-135M; 0-512 cached tokens). The routing decision is about the time
to the first token, the step or two in which the prompt is computed (its decode steps come later
wherever it runs): over that horizon a prefill block weighs 10-80 active blocks on the CPU
profile and 90-220 on the H200 one. The default, :data:`PREFILL_LOAD_SCALE` = 32, sits in the
lower part of that span, toward balance. Read in requests: a request stays on the worker that
holds its prompt unless that worker carries about 32 more decoding requests of the same length
than another (each holds about as many blocks as its prompt), or has more prompt blocks queued
than the cache saves. Dynamo's 1 weighs an active block over a long decode's whole life instead:
with 2k-token prompts it hands a cached prompt to a worker with one request fewer, recomputing
128 blocks to spare one request's KV reads.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from protocol.load import EngineLoad
from router.inflight import Inflight
from router.kv_index import Overlap

POLICIES = ("kv", "round_robin", "random", "least_loaded")
PREFILL_LOAD_SCALE = 32.0  # the kv cost's weight of a prefill block against an active decode block: above
# A prompt block held in the worker's host tier, against one it must compute: the copy back over
# PCIe against the forward pass. Llama-3.1-8B in bfloat16, 16-token blocks: 2 MiB a block, 42 us at
# ~50 GB/s (pinned, PCIe Gen5) against ~0.4 ms of an H200's prefill compute (256 GFLOP): about 0.1.
# On the CPU (SmolLM2-135M) a memcpy against tens of ms of compute: far less; 0.1 errs toward the device.
HOST_BLOCK_WEIGHT = 0.1


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    num_inflight: int = 0  # requests the routers have on the worker
    num_inflight_prefill_tokens: int = 0  # prompt tokens of those not yet prefilled
    num_queued_prefill_tokens: int = 0  # the worker's own report (all routers)
    num_running: int = 0  # the worker's own report
    kv_usage: float = 0.0
    num_active_blocks: int = 0  # KV blocks of the requests in flight there: the decode load


@dataclass(frozen=True)
class Candidate:
    """One worker's cost, broken down (blocks)."""

    worker_id: str
    overlap_blocks: int  # leading prompt blocks in its prefix cache (device or host tier: an Overlap)
    new_blocks: int  # prompt blocks not served by its cache (all of them where it does not prefill)
    queued_blocks: int  # prompt blocks it still has to compute for earlier requests
    active_blocks: int
    local_prefill: bool  # it computes the prompt itself
    cost: float
    host_blocks: int = 0  # of the overlap, blocks it holds only in its host tier (counted where it prefills)


@dataclass(frozen=True)
class Decision:
    worker_id: str
    overlap_blocks: int
    local_prefill: bool  # decode tier: the worker prefills the prompt itself (no remote prefill)
    cost: float = 0.0


def blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size) if num_tokens > 0 else 0


def kv_costs(num_prompt_tokens: int, overlaps: Mapping[str, int], loads: Sequence[WorkerLoad], block_size: int,
             prefill_load_scale: float = PREFILL_LOAD_SCALE,
             max_local_prefill_tokens: int | None = None) -> list[Candidate]:
    """Every worker's cost for a prompt of ``num_prompt_tokens`` whose leading blocks each worker
    holds per ``overlaps`` (those of them held only in its host tier: ``Overlap.num_host``, each
    :data:`HOST_BLOCK_WEIGHT` of a new block). ``max_local_prefill_tokens`` (decode tier,
    disaggregated, prefill tier available): a worker that would compute more than this leaves the
    prompt to the prefill tier, and its overlap does not count (every prompt block is new work);
    -1: no worker prefills."""
    num_blocks = blocks(num_prompt_tokens, block_size)
    out = []
    for w in loads:
        held = overlaps.get(w.worker_id, 0)
        overlap = min(held, num_blocks)
        to_compute = num_prompt_tokens - overlap * block_size
        local = max_local_prefill_tokens is None or to_compute <= max_local_prefill_tokens
        new = num_blocks - overlap if local else num_blocks
        host = min(getattr(held, "num_host", 0), overlap) if local else 0
        queued = blocks(w.num_inflight_prefill_tokens, block_size)
        cost = prefill_load_scale * (new + queued + HOST_BLOCK_WEIGHT * host) + w.num_active_blocks
        out.append(Candidate(w.worker_id, Overlap(overlap, host), new, queued, w.num_active_blocks, local, cost,
                             host))
    return out


def lowest_cost(candidates: Sequence[Candidate], temperature: float = 0.0,
                rng: random.Random | None = None) -> Candidate | None:
    """The cheapest candidate (ties at random); with ``temperature > 0``, one sampled with
    probability softmax(-cost / temperature)."""
    if not candidates:
        return None
    rng = rng or random
    if temperature > 0:
        low = min(c.cost for c in candidates)
        weights = [math.exp(-(c.cost - low) / temperature) for c in candidates]
        return rng.choices(list(candidates), weights=weights)[0]
    low = min(c.cost for c in candidates)
    tied = [c for c in candidates if c.cost == low]
    return rng.choice(tied) if len(tied) > 1 else tied[0]


def least_loaded(loads: Sequence[WorkerLoad], rng: random.Random | None = None) -> str | None:
    """The worker with the fewest in-flight requests (then fewest queued prefill tokens, then the
    lowest KV usage); ties broken at random. None when there is no worker."""
    if not loads:
        return None

    def key(w: WorkerLoad) -> tuple[int, int, float]:
        return (max(w.num_inflight, w.num_running),
                max(w.num_inflight_prefill_tokens, w.num_queued_prefill_tokens), w.kv_usage)

    best = min(key(w) for w in loads)
    tied = [w.worker_id for w in loads if key(w) == best]
    return (rng or random).choice(tied) if len(tied) > 1 else tied[0]


def round_robin(loads: Sequence[WorkerLoad], turn: int) -> str | None:
    """The ``turn``-th worker, by id, cycling."""
    if not loads:
        return None
    ids = sorted(w.worker_id for w in loads)
    return ids[turn % len(ids)]


def choose(policy: str, num_prompt_tokens: int, overlaps: Mapping[str, int], loads: Sequence[WorkerLoad],
           block_size: int, *, prefill_load_scale: float = PREFILL_LOAD_SCALE, temperature: float = 0.0,
           max_local_prefill_tokens: int | None = None, turn: int = 0,
           rng: random.Random | None = None) -> Decision | None:
    """One tier's worker for a request under ``policy`` (one of :data:`POLICIES`); None when
    there is no worker. ``max_local_prefill_tokens`` as in :func:`kv_costs`; the policies that
    ignore the KV index decide local prefill from the prompt's length alone."""
    if not loads:
        return None
    if policy == "kv":
        best = lowest_cost(kv_costs(num_prompt_tokens, overlaps, loads, block_size, prefill_load_scale,
                                    max_local_prefill_tokens), temperature, rng)
        assert best is not None
        return Decision(best.worker_id, best.overlap_blocks, best.local_prefill, best.cost)
    if policy == "round_robin":
        worker = round_robin(loads, turn)
    elif policy == "random":
        worker = (rng or random).choice([w.worker_id for w in loads])
    elif policy == "least_loaded":
        worker = least_loaded(loads, rng)
    else:
        raise ValueError(f"unknown routing policy {policy!r}; expected one of {POLICIES}")
    assert worker is not None
    local = max_local_prefill_tokens is None or num_prompt_tokens <= max_local_prefill_tokens
    return Decision(worker, min(overlaps.get(worker, 0), blocks(num_prompt_tokens, block_size)), local)


def follows_prefill(blocks_left: int, local: Candidate, remote: Candidate) -> bool:
    """A request whose prefix is on its way to its decode worker D from a prefill worker P (still
    computed there, or moving): follow it to P now (prefill the rest there and hand the prompt
    off) rather than wait for it to land on D and prefill the rest on D (``local``; ``remote``:
    P's candidate, its overlap counting the prefix). The prefill work each way puts before the
    request's first token is compared, in blocks: waiting, the prefix's blocks still to compute
    (``blocks_left``), then D's queued prompt blocks and the request's new ones; following, P's
    queued prompt blocks (the prefix's among them) and the request's new ones there. The transfer
    is not counted (as in the routing cost); ties wait (no transfer, nothing computed twice)."""
    return remote.queued_blocks + remote.new_blocks < blocks_left + local.queued_blocks + local.new_blocks


def suffix_goes_remote(local: Candidate, remote: Candidate, decoding: bool) -> bool:
    """A prompt its decode worker D would finish itself (``local``: the uncached suffix within
    ``max_local_prefill_tokens``): prefill it on the prefill worker P instead (``remote``, its
    overlap counting what P holds), when D has requests decoding and P gets to it no later: P's
    queued prompt blocks and the prompt's new blocks there at most D's. Computed on D, the suffix
    rides in a step every decoding request waits for (two CPU cores, the shared-prefix load: a
    64-token suffix beside three decodes took 135-170 ms against 48 ms for the decodes alone); on P
    it runs beside D's decodes, and only the suffix's blocks move (D takes the prefix from its own
    cache). Ties go to P: the same work, none of it in D's steps. D idle: nothing waits, no move."""
    return decoding and remote.queued_blocks + remote.new_blocks <= local.queued_blocks + local.new_blocks


def spill_breaks_itl(num_tokens_to_compute: int, max_local_prefill_tokens: int, decoding: bool) -> bool:
    """Whether spilling a prompt onto decode worker D (the prefill tier saturated: :func:`prefill_saturated`)
    would break the ITL of D's decoding requests: D has requests decoding and would compute more of the prompt
    than ``max_local_prefill_tokens`` (what D prefills in any case). The prompt's chunks then ride in steps every
    decoding request waits for (H200 profile: a 2048-token chunk at a 25k-token context takes several times the
    50 ms ITL target), so one spilled prompt costs many requests their ITL where queueing it on the prefill tier
    costs at most its own TTFT (Mooncake replay, planner-load at 200 GB: 46 long prompts spilled onto the one
    decode worker in 960-1020 s, 162 ITL misses there). An idle D breaks nothing (as in :func:`suffix_goes_remote`)."""
    return decoding and num_tokens_to_compute > max_local_prefill_tokens


# Past this many times the saturation point (every prefill worker this many times the router's queue limit behind)
# the spill rule gives way and a prompt spills onto any decode worker, as without it: see :func:`spill_plan`.
SPILL_GIVES_WAY = 4


def spill_plan(loads: Sequence[WorkerLoad], tokens_to_compute: Mapping[str, int], max_local_prefill_tokens: int,
               prefill_loads: Sequence[WorkerLoad], queue_limit_tokens: int) -> tuple[list[WorkerLoad], int | None]:
    """Where a prompt goes when the prefill tier is saturated (:func:`prefill_saturated` over ``prefill_loads`` and
    ``queue_limit_tokens``) and the router spills only onto decode workers it does not slow
    (``spill_only_to_idle_decode``): the decode workers to choose among and the ``max_local_prefill_tokens`` to
    choose them with (as in :func:`choose`). The spill targets are the workers where :func:`spill_breaks_itl` is
    false (``tokens_to_compute``: what each would compute of the prompt, its cached prefix off; a worker decodes
    when the routers have a request in flight there, ``num_inflight``: bound to it from the routing decision on).
    Some: the cheapest of them prefills the prompt itself (None: any length). None: every worker, as when the tier
    is not saturated: the prompt queues on the prefill tier unless a decode worker finishes it within
    ``max_local_prefill_tokens``. Past :data:`SPILL_GIVES_WAY` times the saturation point every worker, any length
    (the spill as without the rule): a prompt queued that far behind misses its TTFT whatever comes, the backlog
    only grows, and the stalls the spills put on the decode tier are what make the planner start decode workers
    for the handoffs to come (the replay's burst, 8 -> 80 requests/s: queued there, planner-load+pool14 0.9719 ->
    0.6896, the planner gives the prefill tier the whole budget, 15P+1D, and the one decode worker drowns).
    The real router (``router.request_flow``) and the replay (``bench/planner_sim.py``) both decide here."""
    if prefill_saturated(prefill_loads, SPILL_GIVES_WAY * queue_limit_tokens):
        return list(loads), None
    targets = [w for w in loads if not spill_breaks_itl(tokens_to_compute[w.worker_id], max_local_prefill_tokens,
                                                        w.num_inflight > 0)]
    return (targets, None) if targets else (list(loads), max_local_prefill_tokens)


def prefill_saturated(loads: Sequence[WorkerLoad], queue_limit_tokens: int) -> bool:
    """The prefill tier is saturated when every worker has more than ``queue_limit_tokens``
    prompt tokens queued: a remote prefill would wait longer than a local one."""
    return not loads or all(
        max(w.num_inflight_prefill_tokens, w.num_queued_prefill_tokens) > queue_limit_tokens for w in loads)


def loads_of(worker_ids: Sequence[str], inflight: Mapping[str, Inflight], reported: Mapping[str, EngineLoad],
             block_size: int = 16) -> list[WorkerLoad]:
    """Combine the routers' in-flight accounting per worker with the workers' published loads."""
    out = []
    for wid in worker_ids:
        entry = inflight.get(wid) or Inflight()
        rep = reported.get(wid) or EngineLoad()
        out.append(WorkerLoad(wid, entry.num_requests, entry.num_prefill_tokens, rep.num_queued_prefill_tokens,
                              rep.num_running, rep.kv_usage, blocks(entry.num_kv_tokens, block_size)))
    return out


# ---- first-token pacing (``first_token_hold``) ------------------------------------------------------
# A handed-off request's first token is the prefill worker's: the router has it when P answers. Its
# second is the decode worker's first, after D got the prompt's KV and ran a step. Sent at once, the
# first token opens a gap of (transfer + step) before the second; where that gap alone exceeds the
# ITL target, a short answer's p99 inter-token latency misses it whatever D does next. Held until
# D's first token, the two go out together (vLLM's P/D connector does this by construction: there
# the decode side emits the first token once it has loaded the KV): the wait moves into the TTFT,
# which has its own, larger target. The router holds only what keeps the TTFT within it.
HOLD_MODES = ("auto", "on", "off")


@dataclass
class HandoffGap:
    """What a router learns of the gap between a handed-off request's first token (P's answer, in
    its hands) and its second (D's first message): the transfer of the prompt tokens D lacks, at a
    rate learned from the transfers D reports (``PullStats``: tokens moved, seconds), plus the rest
    (D's step, the calls), learned as the gap seen less the transfer. Both exponentially weighted:
    each observation counts ``decay`` times the one before. That is the gap's mean (``predict``);
    its spread (``high``) is learned from the last ``window`` residuals (the gap seen less the gap
    predicted just before it): the ``quantile`` residual over the mean. The gap is a wait for D's
    next step boundary plus a step, so it is spread over up to a step around its mean, and a mean
    a little under the ITL target (H200 mix shift: 42-50 ms against 50) misses the target on many
    handoffs; an order statistic of the residuals follows that spread. The default is the largest
    residual of the window: a gap over the target that is not held costs a short answer its p99
    ITL (under 101 gaps, its largest gap is its p99), a hold costs no target (it ends at the TTFT
    left at the latest, and :func:`first_token_hold_s` holds only when the gap's *mean* fits in
    that), so the estimate errs toward holding. A few outliers (a handoff that waited for a decode
    seat for seconds) then raise it for a window, and the hold only holds more (H200 mix shift,
    planner-both: 31 ITL misses with the 0.99 quantile, 7 with the largest; 8P+8D: 18 -> 13).
    ``quantile`` < 1 leaves the top ``1 - quantile`` of the window out."""

    decay: float = 0.9
    quantile: float = 1.0  # the high estimate: this quantile of the recent residuals over the mean (1: the largest)
    window: int = 256  # residuals kept
    num_tokens: float = 0.0  # weighted sums over the observations
    transfer_s: float = 0.0
    rest_s: float = 0.0
    weight: float = 0.0
    _residuals: deque[float] = field(default_factory=deque, repr=False)  # the last ``window``, in arrival order
    _sorted: list[float] = field(default_factory=list, repr=False)  # the same, sorted

    def observe(self, num_tokens: int, transfer_s: float, gap_s: float) -> None:
        predicted = self.predict(num_tokens)
        if predicted is not None:
            self._residual(gap_s - predicted)
        d = self.decay
        self.num_tokens = d * self.num_tokens + num_tokens
        self.transfer_s = d * self.transfer_s + transfer_s
        self.rest_s = d * self.rest_s + max(0.0, gap_s - transfer_s)
        self.weight = d * self.weight + 1.0

    def _residual(self, r: float) -> None:
        if len(self._residuals) >= self.window:
            del self._sorted[bisect.bisect_left(self._sorted, self._residuals.popleft())]
        self._residuals.append(r)
        bisect.insort(self._sorted, r)

    def predict(self, num_tokens: int) -> float | None:
        """The gap's mean for a handoff of ``num_tokens`` tokens; None before any observation."""
        if self.weight <= 0:
            return None
        per_token_s = self.transfer_s / self.num_tokens if self.num_tokens > 0 else 0.0
        return num_tokens * per_token_s + self.rest_s / self.weight

    def high(self, num_tokens: int) -> float | None:
        """The gap's high estimate for a handoff of ``num_tokens`` tokens: the mean plus the
        ``quantile`` residual (the largest while fewer than ``1 / (1 - quantile)`` are known; never
        under the mean); None before any observation."""
        mean = self.predict(num_tokens)
        if mean is None or not self._sorted:
            return mean
        return mean + max(0.0, self._sorted[min(len(self._sorted) - 1, int(self.quantile * len(self._sorted)))])


@dataclass
class TokenInterval:
    """What a router learns of its decode workers' time per token: the time between a stream's
    messages over the tokens they brought (a stream's first message not counted), exponentially
    weighted: each observation counts ``decay`` times the one before."""

    decay: float = 0.99
    seconds: float = 0.0
    tokens: float = 0.0

    def observe(self, seconds: float, num_tokens: int) -> None:
        self.seconds = self.decay * self.seconds + seconds
        self.tokens = self.decay * self.tokens + num_tokens

    def predict(self) -> float | None:
        """Seconds per token; None before any observation."""
        return self.seconds / self.tokens if self.tokens > 0 else None


def first_token_hold_s(mode: str, predicted_gap_s: float | None, itl_slo_s: float, ttft_headroom_s: float,
                       num_tokens: int | None = None, itl_s: float | None = None,
                       mean_gap_s: float | None = None) -> float:
    """How long the router may hold a handed-off request's first token for the decode worker's
    first (then both go out; past it the first goes out alone); 0: send it at once.

    ``predicted_gap_s``: the gap's high estimate (``HandoffGap.high``: its mean plus its learned
    spread, so a mean a little under the target whose gaps often go over it counts as over).
    ``mean_gap_s``: the gap's mean (``HandoffGap.predict``; None: ``predicted_gap_s``), what must
    fit in the headroom: a few handoffs that waited seconds for a decode seat put the high estimate
    itself over the headroom until they leave its window, and then no handoff was held (Mooncake,
    planner-load with a warm pool: 128 gaps over the target not held in one minute).
    ``ttft_headroom_s``: the TTFT target less the time the request has taken so far, the most it
    may be held. ``auto`` holds when the predicted gap exceeds the ITL target and the mean fits in
    that headroom, unless the request's answer (``num_tokens``, its max_tokens) is long enough for its
    mean inter-token latency to meet the target with the gap among its intervals, the others at
    ``itl_s`` (the decode tier's time per token as seen); ``on`` holds whenever there is headroom;
    ``off`` never."""
    if mode not in HOLD_MODES:
        raise ValueError(f"unknown first_token_hold {mode!r}; expected one of {HOLD_MODES}")
    if mode == "off" or ttft_headroom_s <= 0:
        return 0.0
    fit_s = predicted_gap_s if mean_gap_s is None else mean_gap_s
    if mode == "auto" and (predicted_gap_s is None or not itl_slo_s < predicted_gap_s or not fit_s <= ttft_headroom_s):
        return 0.0
    if mode == "auto" and num_tokens is not None and num_tokens > 2 and itl_s is not None and \
            predicted_gap_s + (num_tokens - 2) * itl_s <= (num_tokens - 1) * itl_slo_s:
        return 0.0  # the answer's mean ITL meets the target with the gap in it: nothing to hold for
    return ttft_headroom_s
