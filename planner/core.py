"""The planner's decision core: :meth:`Planner.tick` takes an :class:`Observation` and returns a
:class:`Decision`. No I/O, no clock: times come in the observation, effects go out as data.

Order of a tick:

1. starts that never became ready within ``start_timeout_s`` are abandoned (a worker that
   cannot get a GPU does not hold the planner); actions issued earlier are matched with what
   the observation shows (a drained worker that vanished counts as done);
2. the estimators learn from the tick (regressions, forecasts) whatever is decided;
3. zero traffic (every router window has no arrival and no ready worker has work): straight to
   the minimums, all at once, grace period or not (drains above them; starts below them, as
   the GPUs allow: a cluster with no worker yet);
4. otherwise no decision without router windows; while a change is in progress, or within the
   grace period of the last change, only starts for a tier whose load's need (load mode) or
   forecast's need (throughput mode; both: the larger) exceeds its workers, starting ones and
   issued starts included (``load-up-meanwhile``, ``forecast-up-meanwhile``);
5. targets per tier from the mode (throughput: the forecast; load: up to the need, down by one;
   both: the forecast is a
   floor and the load scales above it), clamped to the minimums and the GPU budget; an
   aggregated cluster (``PlannerConfig.aggregated``) has one tier, registered as decode, judged
   on both targets, and no prefill tier;
6. the targets become actions: switches from a tier with surplus first (fast, no cold start),
   then starts while GPUs are free, then drains; the least-loaded workers go first.

Between ticks, :meth:`Planner.react` is the fast check (every ``PlannerConfig.fast_interval_s``,
Dynamo's load-mode cadence): starts only, for a tier whose workers' own observations show an SLO
breach (the load mode's verdict on the workers' counters, not on the routers' arrivals: a new
prompt's predicted TTFT over the target behind the tier's queue, or the tier saturated; every
decode seat or 90% of the KV taken, or the predicted ITL over the target: ``BREACHES``). It
sizes the tier to the load's need (the latest arrival rate included), counts the tier's starting
workers and the starts issued and not seen yet (repeated fast starts do not overshoot), keeps to
the budget, and ignores the grace period and changes in progress (a breach after a scale-down
does not wait them out). It learns nothing and never drains or switches; its starts open a grace
period like any change. It acts on a breach two checks in a row saw (one catching a queue of
long prompts at its peak is not one). Load and both modes only: in throughput mode the tick sizes from the
forecast alone and drains what the load model's breach started (a flap).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.decision import Action, ActionKind, Decision, Reason
from planner.load import LoadModel, TierLoad
from planner.observations import ROLES, Observation, Traffic, WorkerState, WorkerStep, other_role
from planner.profile import Profile
from planner.throughput import ThroughputModel

TRANSITIONS = (WorkerState.STARTING, WorkerState.DRAINING, WorkerState.SWITCHING)
# The load mode's verdicts the fast check acts on: the target missed or the tier saturated, as the
# workers show it (prefill: a new prompt's TTFT behind the queue, or busy past 0.9; decode: the ITL,
# seats or KV). Not ``itl-rising`` (a rate near the capacity: the tick's business).
BREACHES = ("ttft-over-slo", "itl-over-slo")


@dataclass
class _Pending:
    action: Action
    issued_s: float
    baseline: int = 0  # START: the tier's worker count (any state) when issued


def after(counts: dict[str, int], actions: list[Action]) -> dict[str, int]:
    """Replicas per tier once ``actions`` are carried out."""
    out = dict(counts)
    for a in actions:
        if a.kind is ActionKind.START:
            out[a.role] += 1
        elif a.kind is ActionKind.SWITCH:
            out[a.role] += 1
            out[other_role(a.role)] -= 1
        elif a.kind is ActionKind.DRAIN:
            out[a.role] -= 1
    return out


def load_order(w: WorkerStep) -> tuple[int, int, str]:
    """Which worker leaves a tier first: the one with the least to finish."""
    return (w.num_running + w.num_waiting, w.num_active_kv_tokens + w.num_queued_prefill_tokens, w.worker_id)


class Planner:
    def __init__(self, config: PlannerConfig, profile: Profile | None = None) -> None:
        if config.mode != "load" and profile is None:
            raise ValueError(f"planner mode {config.mode!r} needs a profile (the throughput mode sizes from it)")
        self.config = config
        self.profile = profile
        self.load = LoadModel(config, profile)
        self.throughput = ThroughputModel(config, profile) if profile is not None else None
        self.last_change_s = -math.inf
        self.pending: list[_Pending] = []
        self.abandoned: dict[str, float] = {}  # worker id -> when
        self.traffic = Traffic()  # the last tick's routers' windows, merged (the fast check sizes with it)
        self.breached: dict[str, float] = {}  # tier -> when the fast check last saw it breach (the check before)

    # ---- the tick --------------------------------------------------------------------------------
    def tick(self, obs: Observation) -> Decision:
        cfg = self.config
        actions = self._abandon_stuck(obs)
        reasons = [Reason("abandoned-start", a.role, {"waited_s": cfg.start_timeout_s}) for a in actions]
        reasons += self._resolve_pending(obs)
        workers = [w for w in obs.workers if w.worker_id not in self.abandoned]
        counts = {r: sum(1 for w in workers if w.role == r and w.state in (WorkerState.READY, WorkerState.STARTING))
                  for r in ROLES}
        ready = [w for w in workers if w.state is WorkerState.READY]
        traffic = Traffic.merge(obs.windows)
        if obs.windows and not math.isnan(traffic.request_rate):
            self.traffic = traffic
        self.load.observe(ready)
        if self.throughput is not None:
            self.throughput.horizon_s = cfg.horizon_with(obs.num_parked)
            self.throughput.observe(traffic, ready)

        def hold(*why: Reason) -> Decision:
            return Decision(obs.now_s, cfg.mode, counts["prefill"], counts["decode"], tuple(actions),
                            tuple(reasons) + why)

        if traffic.request_rate == 0 and not any(w.has_work for w in ready):  # NaN (no valid window) is not zero
            return self._to_minimums(obs, workers, counts, actions, reasons)
        if not obs.windows or math.isnan(traffic.request_rate):
            return hold(Reason("no-data"))
        busy = [w for w in workers if w.state in TRANSITIONS and obs.now_s - w.since_s < cfg.action_timeout_s]
        waiting = None
        if self.pending or busy:
            waiting = Reason("in-progress", "", {"pending": len(self.pending), "transitions": len(busy)})
        elif obs.now_s - self.last_change_s < cfg.grace_s:
            waiting = Reason("grace", "", {"since_change_s": obs.now_s - self.last_change_s})
        if waiting is not None:
            ups, why = self._load_ups(obs, workers, counts, ready, traffic)
            if not ups:
                return hold(waiting)
            self._issued(obs, workers, ups)
            actions += ups
            done = after(counts, ups)
            return Decision(obs.now_s, cfg.mode, done["prefill"], done["decode"], tuple(actions),
                            (*reasons, waiting, *why))
        wanted = self._targets(counts, ready, traffic)
        if wanted is None:
            return hold(Reason("no-data", "", {"rate": traffic.request_rate}))
        (p, d), why = wanted
        reasons += why
        new_actions, short = self._realize(obs, workers, counts, {"prefill": p, "decode": d})
        reasons += short
        actions += new_actions
        self._issued(obs, workers, new_actions)
        done = after(counts, new_actions)
        return Decision(obs.now_s, cfg.mode, done["prefill"], done["decode"], tuple(actions), tuple(reasons))

    # ---- the fast check ------------------------------------------------------------------------
    def react(self, obs: Observation) -> Decision:
        """The fast check between ticks (module docstring): starts for a tier whose workers show
        an SLO breach coming, nothing else. ``obs.windows`` may hold the routers' latest short
        windows (their arrival rate sizes the start when higher than the last tick's); lengths
        come from the last tick's windows where these have none."""
        cfg = self.config
        workers = [w for w in obs.workers if w.worker_id not in self.abandoned]
        counts = {r: sum(1 for w in workers if w.role == r and w.state in (WorkerState.READY, WorkerState.STARTING))
                  for r in ROLES}
        # one tier: the tick's; throughput mode: its tick sizes from the forecast alone and drains what
        # the load model started (burst, no pool: 14 reversals in 90 intervals); no tick with windows
        # yet. Nothing is touched then (not even the issued actions' bookkeeping).
        if cfg.aggregated or cfg.mode == "throughput" or math.isnan(self.traffic.request_rate):
            return Decision(obs.now_s, cfg.mode, counts["prefill"], counts["decode"])
        reasons = self._resolve_pending(obs)
        ready = [w for w in workers if w.state is WorkerState.READY]
        now_traffic = Traffic.merge(obs.windows)
        last = self.traffic
        isl = self._new_isl(now_traffic if now_traffic.isl_mean > 0 else last)
        osl = now_traffic.osl_mean if now_traffic.osl_mean > 0 else last.osl_mean
        rate = last.request_rate  # measured, not a forecast: the breach is now
        if now_traffic.request_rate > rate:
            rate = now_traffic.request_rate
        issued = self._issued_starts(workers)
        free_slots = self._free_slots(obs, workers) - sum(issued.values())
        actions = []
        for r in ROLES:
            tier = [w for w in ready if w.role == r]
            verdict = self.load.judge(r, tier, isl, 0.0, osl)  # the workers' own counters: a breach, not a forecast
            if verdict.delta <= 0 or verdict.reason.code not in BREACHES:
                self.breached.pop(r, None)
                continue
            # seen on two checks in a row: a queue of long prompts that one check catches at its peak is
            # not a breach (mix_shift: starts drained again, 2 -> 8 reversals); a step in the load stays
            before, self.breached[r] = self.breached.get(r), obs.now_s
            if before is None or obs.now_s - before > 2 * max(cfg.fast_interval_s, 1e-9):
                reasons.append(Reason("fast-breach-once", r, verdict.reason.values))
                continue
            if r == "prefill":
                need = self.load.prefill_need(tier, isl, rate)
            else:
                need = self.load.decode_need(tier, rate * osl if math.isfinite(osl) else 0.0)
            short = max(len(tier) + verdict.delta, need) - counts[r] - issued[r]
            starts = max(0, min(short, free_slots))
            values = {**verdict.reason.values, "need": float(max(len(tier) + verdict.delta, need)),
                      "starting": float(counts[r] - len(tier) + issued[r]), "starts": float(starts)}
            if starts:
                free_slots -= starts
                actions += [Action(ActionKind.START, r) for _ in range(starts)]
                reasons += [Reason("fast-up", r, values), verdict.reason]  # the breach seen: the verdict's code
            elif short > 0:
                reasons += [Reason("fast-no-gpu", r, values), verdict.reason]
        self._issued(obs, workers, actions)
        done = after(counts, actions)
        return Decision(obs.now_s, cfg.mode, done["prefill"], done["decode"], tuple(actions), tuple(reasons))

    def _issued_starts(self, workers: list[WorkerStep]) -> dict[str, int]:
        """Starts issued per tier that the workers do not show yet."""
        return {r: sum(1 for p in self.pending if p.action.kind is ActionKind.START and p.action.role == r
                       and sum(1 for w in workers if w.role == r) <= p.baseline) for r in ROLES}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _abandon_stuck(self, obs: Observation) -> list[Action]:
        for wid, at in list(self.abandoned.items()):
            if obs.worker(wid) is None or obs.now_s - at > self.config.action_timeout_s:
                del self.abandoned[wid]
        out = []
        for w in obs.workers:
            if (w.state is WorkerState.STARTING and w.worker_id not in self.abandoned
                    and obs.now_s - w.since_s >= self.config.start_timeout_s):
                self.abandoned[w.worker_id] = obs.now_s
                out.append(Action(ActionKind.ABANDON, w.role, w.worker_id))
        return out

    def _resolve_pending(self, obs: Observation) -> list[Reason]:
        """Drop the issued actions the observation now reflects (or that are too old to wait for)."""
        reasons, keep = [], []
        for p in self.pending:
            a = p.action
            w = obs.worker(a.worker_id) if a.worker_id else None
            if a.kind is ActionKind.START:
                done = sum(1 for x in obs.workers if x.role == a.role) > p.baseline
            elif a.kind is ActionKind.DRAIN:
                done = w is None or w.state is WorkerState.DRAINING
            else:  # SWITCH: under way, done, or the worker vanished
                done = w is None or w.state is WorkerState.SWITCHING or w.role == a.role
            if done:
                continue
            if obs.now_s - p.issued_s > self.config.action_timeout_s:
                reasons.append(Reason("action-lost", a.role, {"age_s": obs.now_s - p.issued_s}))
                continue
            keep.append(p)
        self.pending = keep
        return reasons

    def _issued(self, obs: Observation, workers: list[WorkerStep], actions: list[Action]) -> None:
        if not actions:
            return
        self.last_change_s = obs.now_s
        started = {r: 0 for r in ROLES}
        for a in actions:
            baseline = sum(1 for w in workers if w.role == a.role) + started.get(a.role, 0)
            if a.kind is ActionKind.START:
                started[a.role] += 1
            self.pending.append(_Pending(a, obs.now_s, baseline))

    def _load_ups(self, obs: Observation, workers: list[WorkerStep], counts: dict[str, int],
                  ready: list[WorkerStep], traffic: Traffic) -> tuple[list[Action], list[Reason]]:
        """While a change is in progress or in its grace period: a tier still gets the workers its
        load (load mode, ``load-up-meanwhile``) or its forecast and backlog (throughput mode,
        ``forecast-up-meanwhile``; both modes: the larger) need beyond its workers, starting ones
        and issued starts included (a step in the load is not forecast, a forecast trails a ramp;
        waiting out a start-up per worker lets a tier miss for minutes and its backlog grow).
        Starts only, as the GPUs allow: no switch or drain until the change is done."""
        cfg = self.config
        if cfg.aggregated:
            return [], []
        isl = self._new_isl(traffic)
        issued = self._issued_starts(workers)
        free_slots = self._free_slots(obs, workers) - sum(issued.values())
        forecast = self.throughput.wanted() if self.throughput is not None and cfg.mode != "load" else None
        actions, reasons = [], []
        for r in ROLES:
            short, why = 0, None
            if cfg.mode != "throughput":
                tier = [w for w in ready if w.role == r]
                verdict = self.load.judge(r, tier, isl, self._lead_rate(traffic), traffic.osl_mean)
                if verdict.delta > 0:
                    short = len(tier) + verdict.delta - counts[r] - issued[r]
                    why = dataclasses.replace(verdict.reason, code="load-up-meanwhile")
            if forecast is not None:
                want = forecast[0][r] if not cfg.max_step_up else min(forecast[0][r], counts[r] + cfg.max_step_up)
                if want - counts[r] - issued[r] > short:
                    short = want - counts[r] - issued[r]
                    why = dataclasses.replace(forecast[1], code="forecast-up-meanwhile", role=r)
            starts = max(0, min(short, free_slots))
            if starts:
                free_slots -= starts
                actions += [Action(ActionKind.START, r) for _ in range(starts)]
                reasons.append(why)
        return actions, reasons

    def _lead_rate(self, traffic: Traffic) -> float:
        """The arrival rate the load mode sizes its ups for: the routers' now, or the forecast's
        ``horizon_s`` ahead if higher (on a ramp, a worker started now serves only after its
        start-up, or its wake from the warm pool; the load then is what it must meet). Downs do not read it."""
        rate = traffic.request_rate
        if self.throughput is None:
            return rate
        ahead = self.throughput.rate.predict(self.throughput.horizon_intervals)
        return max(rate, ahead) if math.isfinite(ahead) else rate

    def _new_isl(self, traffic: Traffic) -> float:
        """New prompt tokens of a typical request: the mean ISL less the prefix cache's share."""
        hit = self.throughput.forecast().hit_rate if self.throughput is not None else 0.0
        return traffic.isl_mean * (1 - hit)

    # ---- targets ---------------------------------------------------------------------------------
    def _targets(self, counts: dict[str, int], ready: list[WorkerStep], traffic: Traffic
                 ) -> tuple[tuple[int, int], list[Reason]] | None:
        cfg, reasons = self.config, []
        floor = {r: cfg.minimum(r) for r in ROLES}
        if cfg.mode != "load":
            assert self.throughput is not None
            sized = self.throughput.targets(counts)
            if sized is None:
                return None
            floor = {"prefill": sized[0], "decode": sized[1]}
            reasons.append(sized[2])
            if cfg.max_step_up:
                floor = {r: min(floor[r], counts[r] + cfg.max_step_up) for r in ROLES}
        want = dict(floor)
        verdicts: dict[str, TierLoad] = {}
        if cfg.mode != "throughput":
            isl = self._new_isl(traffic)
            if cfg.aggregated:  # one tier, judged on both targets
                verdicts["decode"], why = self.load.assess_aggregated([w for w in ready if w.role == "decode"], isl)
                reasons += why
                want["decode"] = max(floor["decode"], counts["decode"] + verdicts["decode"].delta)
            for r in () if cfg.aggregated else ROLES:
                verdicts[r] = self.load.assess(r, [w for w in ready if w.role == r], isl, self._lead_rate(traffic),
                                               traffic.osl_mean)
                reasons.append(verdicts[r].reason)
                want[r] = max(floor[r], counts[r] + verdicts[r].delta)
        # what each tier could shrink to when the other needs its GPUs: the forecast's need, without
        # the down band that keeps it from flapping when nobody else needs them
        need = dict(self.throughput.need) if cfg.mode != "load" and self.throughput is not None else dict(floor)
        if verdicts and not cfg.aggregated:  # a low tier gives down to what its load needs, not one at a time
            isl, rate = self._new_isl(traffic), self._lead_rate(traffic)
            for r in ROLES:
                if self._low(verdicts[r]):
                    tier = [w for w in ready if w.role == r]
                    need[r] = max(need[r], self.load.least(r, tier, isl, rate, traffic.osl_mean))
        if verdicts and not cfg.aggregated and traffic.ttft_ms_p95 > cfg.scale_down_margin * cfg.ttft_slo_ms:
            # Load and both modes: the routers' TTFT p95 over ``scale_down_margin`` x the target (the margin
            # every down keeps the tier under), the prefill tier keeps every worker (no drain, no switch away)
            # whatever its queues say, and the tick is not a low one (the down streak starts over: a p95 from
            # one interval's few long prompts is noisy, and two low ticks must be two in a row). Its misses are
            # not all queueing: a prompt whose prefix no worker caches any more takes seconds alone (Mooncake:
            # the prefixes come back minutes later), and a drained worker's cache is gone with it, so a drain
            # only raises the p95 the load model's N-1 prediction (the mean new prompt, the compute spread)
            # does not see. p95: the 95% target. (Mooncake, host tier 100-200 GB, both+pool14: 0.9442/0.9424
            # at the target -> 0.9512/0.9517.)
            want["prefill"] = max(want["prefill"], counts["prefill"])
            need["prefill"] = max(need["prefill"], counts["prefill"])
            self.load.reset_down_streak("prefill")
            reasons.append(Reason("ttft-p95-hold", "prefill", {"ttft_ms_p95": traffic.ttft_ms_p95,
                                                               "ttft_slo_ms": cfg.ttft_slo_ms}))
        return self._clamp(want, need, counts, verdicts, reasons), reasons

    def _clamp(self, want: dict[str, int], floor: dict[str, int], counts: dict[str, int],
               verdicts: dict[str, TierLoad], reasons: list[Reason]) -> tuple[int, int]:
        """``want`` within the budget; ``floor``: the least each tier needs (forecast or minimum).
        When one tier grows and the load mode judges the other low, the other gives the workers
        its load does not need first, budget full or not: a switch serves in seconds, a start
        after its start-up. (A tier merely able to spare one keeps it while GPUs are free; the
        throughput mode alone, whose lengths lag a shift of the mix, only switches for the budget.)"""
        cfg = self.config
        want = {r: max(want[r], cfg.minimum(r)) for r in ROLES}
        room = cfg.max_workers
        growing = [r for r in ROLES if want[r] > counts[r]]
        if want["prefill"] + want["decode"] <= room:
            if len(growing) == 1 and other_role(growing[0]) in verdicts and self._low(verdicts[other_role(growing[0])]):
                x, y = growing[0], other_role(growing[0])
                give = min(want[x] - counts[x], want[y] - self._lowest(y, want, floor, counts, verdicts))
                if give > 0:
                    want[y] -= give
                    reasons.append(Reason("switch-first", x, {"switches": float(give)}))
            return want["prefill"], want["decode"]
        values = {f"want_{r}": float(want[r]) for r in ROLES} | {"max_workers": float(room)}
        if cfg.aggregated:  # one tier: the budget is its ceiling
            reasons.append(Reason("budget-clamp", "decode", values))
            return 0, room
        if len(growing) == 1 and floor["prefill"] + floor["decode"] <= room:
            # One tier needs GPUs the other holds: the other gives what its load allows, a switch.
            x = growing[0]
            y = other_role(x)
            want[y] = max(self._lowest(y, want, floor, counts, verdicts), min(want[y], room - want[x]))
            want[x] = min(want[x], room - want[y])
            reasons.append(Reason("budget-switch", x, values))
            return want["prefill"], want["decode"]
        # Both tiers need more than the budget holds: share it in proportion to the need.
        share = round(room * want["prefill"] / (want["prefill"] + want["decode"]))
        prefill = min(max(share, cfg.min_prefill), room - cfg.min_decode)
        reasons.append(Reason("budget-clamp", "", values))
        return prefill, room - prefill

    @staticmethod
    def _low(verdict: TierLoad | None) -> bool:
        """A tier whose load would shrink it (or is waiting out the down streak to), or that the
        load mode does not judge (throughput mode: its forecast need decides)."""
        return verdict is None or verdict.delta < 0 or verdict.reason.code == "load-low-waiting"

    def _lowest(self, y: str, want: dict[str, int], floor: dict[str, int], counts: dict[str, int],
                verdicts: dict[str, TierLoad]) -> int:
        """The fewest workers tier ``y`` keeps when the other tier needs its GPUs: ``floor`` (its
        forecast need, and when its load is low its load's need, :meth:`LoadModel.least`) when its
        load is low or not assessed (low: going down, or waiting out the down streak, which only
        keeps a tier from flapping when nobody else wants its GPUs), one fewer when it can spare
        one, else all it wants."""
        verdict = verdicts.get(y)
        low = self._low(verdict) and verdict is not None
        if verdict is None or low:
            return floor[y]
        if verdict.can_spare or low:
            return max(floor[y], counts[y] - 1)
        return want[y]

    # ---- actions ---------------------------------------------------------------------------------
    def _free_gpus(self, obs: Observation, workers: list[WorkerStep]) -> int:
        """GPUs the budget (and the launcher, where it says) leaves for new workers."""
        free = self.config.gpu_budget - sum(w.num_gpus for w in workers)
        return free if obs.num_gpus_free is None else min(free, obs.num_gpus_free)

    def _free_slots(self, obs: Observation, workers: list[WorkerStep]) -> int:
        return max(0, self._free_gpus(obs, workers)) // self.config.gpus_per_worker

    def _realize(self, obs: Observation, workers: list[WorkerStep], counts: dict[str, int],
                 target: dict[str, int]) -> tuple[list[Action], list[Reason]]:
        cfg = self.config
        delta = {r: target[r] - counts[r] for r in ROLES}
        free = self._free_gpus(obs, workers)
        free_slots = max(0, free) // cfg.gpus_per_worker
        ready = {r: sorted((w for w in workers if w.role == r and w.state is WorkerState.READY), key=load_order)
                 for r in ROLES}
        actions, reasons = [], []
        for x in ROLES:
            y = other_role(x)
            if delta[x] <= 0:
                continue
            switches = min(delta[x], max(0, -delta[y]), len(ready[y]))
            for w in ready[y][:switches]:
                actions.append(Action(ActionKind.SWITCH, x, w.worker_id))
            ready[y] = ready[y][switches:]
            delta[y] += switches
            starts = min(delta[x] - switches, free_slots)
            free_slots -= starts
            actions += [Action(ActionKind.START, x) for _ in range(starts)]
            if delta[x] - switches - starts > 0:
                reasons.append(Reason("no-gpu-free", x, {"short": float(delta[x] - switches - starts),
                                                         "gpus_free": float(max(0, free))}))
        for r in ROLES:
            for w in ready[r][:max(0, -delta[r])]:
                actions.append(Action(ActionKind.DRAIN, r, w.worker_id))
        return actions, reasons

    def _to_minimums(self, obs: Observation, workers: list[WorkerStep], counts: dict[str, int],
                     actions: list[Action], reasons: list[Reason]) -> Decision:
        """No traffic: drain every idle ready worker above the tier's minimum, now; start the
        workers a tier lacks below its minimum (a cluster with none yet), as the GPUs allow."""
        cfg = self.config
        pending_ids = {p.action.worker_id for p in self.pending if p.action.kind is not ActionKind.START}
        left = after(counts, [p.action for p in self.pending if p.action.kind is not ActionKind.START])
        new_actions = []
        for r in ROLES:
            idle = sorted((w for w in workers if w.role == r and w.state is WorkerState.READY
                           and w.worker_id not in pending_ids), key=load_order)
            for w in idle[:max(0, left[r] - cfg.minimum(r))]:
                new_actions.append(Action(ActionKind.DRAIN, r, w.worker_id))
        left = after(left, new_actions)
        # issued and not seen yet, or moving into the tier: not counted in ``counts``, not missing either
        starting = {r: sum(1 for p in self.pending if p.action.kind is ActionKind.START and p.action.role == r)
                    + sum(1 for w in workers if w.role == r and w.state is WorkerState.SWITCHING) for r in ROLES}
        free_slots = self._free_slots(obs, workers) - sum(1 for p in self.pending if p.action.kind is ActionKind.START)
        short = []
        for r in ROLES:
            missing = max(0, cfg.minimum(r) - left[r] - starting[r])
            starts = min(missing, max(0, free_slots))
            free_slots -= starts
            new_actions += [Action(ActionKind.START, r) for _ in range(starts)]
            if missing:
                short.append(Reason("below-minimum", r, {"missing": float(missing), "starts": float(starts)}))
        self._issued(obs, workers, new_actions)
        desired = {r: max(left[r], cfg.minimum(r)) for r in ROLES}
        reasons = [*reasons, Reason("zero-traffic", "", {f"num_{r}": float(desired[r]) for r in ROLES}), *short]
        return Decision(obs.now_s, cfg.mode, desired["prefill"], desired["decode"], tuple(actions + new_actions),
                        tuple(reasons))
