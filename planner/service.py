"""The planner service: the pure core (:class:`planner.core.Planner`) on a live cluster.

Every ``adjustment_interval_s`` it builds an observation from what its etcd watches hold
(:class:`planner.view.ClusterView`: the workers' registrations and step summaries, the routers'
request windows) and the launcher's transitions and parked workers, runs one tick of the core, and
then (and every ``fast_interval_s`` between ticks, the core's fast check on the same watches'
state, when it starts something):

- writes the decision to ``/tandem/{ns}/planner/decision`` (every tick) and, when it changes
  something, to ``/tandem/{ns}/planner/history/{seq}`` (the last :data:`HISTORY` kept);
- sets its Prometheus gauges (desired vs ready replicas per tier, predicted vs observed latency
  and request rate, the last decision's reasons);
- hands the actions to an :class:`Actuator` (``deploy/planner_actuator.py``: the local launcher,
  ``tandem serve``'s launcher service from another process, or the Ray controller), unless it is
  a dry run.

It registers itself under its lease (``/tandem/{ns}/planner/instances/{id}``, a ``PlannerInfo``
with its metrics URL: Prometheus discovers it from there). It watches prefixes
(``runtime.watch.PrefixView``); it polls nothing. The planner imports no
launcher: the actuator is given to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry

from planner.config import PlannerConfig
from planner.core import Planner
from planner.decision import Action, ActionKind, Decision
from planner.observations import ROLES, Observation, Traffic
from planner.profile import Profile
from planner.view import ClusterView, Transition
from runtime import keys
from runtime import metric_catalog as mc
from runtime.etcd import ControlPlane
from runtime.pb import tandem_control_pb2 as cpb
from runtime.settings import ClusterConfig
from runtime.watch import PrefixView

log = logging.getLogger("tandem.planner")

HISTORY = 200  # decisions kept under planner/history/
KIND_TO_PB = {ActionKind.START: cpb.PlannerAction.KIND_START, ActionKind.DRAIN: cpb.PlannerAction.KIND_DRAIN,
              ActionKind.SWITCH: cpb.PlannerAction.KIND_SWITCH, ActionKind.ABANDON: cpb.PlannerAction.KIND_ABANDON}


class Actuator(Protocol):
    """What carries the planner's actions out (``deploy/planner_actuator.py``)."""

    def transitions(self) -> Mapping[str, Transition]:
        """Workers it is starting (not registered yet) or draining, by worker id (or a placeholder id)."""

    def num_gpus_free(self) -> int | None:
        """Worker slots it could start now (None: only the budget limits)."""

    def num_parked(self) -> int:
        """Workers the launcher keeps parked (its warm pool): a start takes one first (optional: an
        actuator without it is taken to have none)."""

    def act(self, actions: tuple[Action, ...]) -> None:
        """Carry the actions out without blocking the caller (starts take seconds to minutes)."""


def planner_config(cfg: ClusterConfig, num_workers: int) -> PlannerConfig:
    """The core's config from the cluster's settings; ``num_workers``: those started (the budget's default)."""
    interval = cfg.adjustment_interval_s
    budget = cfg.gpu_budget or num_workers
    min_prefill = cfg.min_prefill if cfg.mode == "disaggregated" else 0
    return PlannerConfig(
        mode=cfg.planner_mode, aggregated=cfg.mode == "aggregated", ttft_slo_ms=cfg.ttft_slo_ms,
        itl_slo_ms=cfg.itl_slo_ms,
        gpu_budget=max(budget, min_prefill + cfg.min_decode), min_prefill=min_prefill, min_decode=cfg.min_decode,
        adjustment_interval_s=interval, grace_s=2 * interval, start_timeout_s=max(120.0, 6 * interval),
        action_timeout_s=max(300.0, 12 * interval), scale_down_ticks=3,
        fast_interval_s=cfg.planner_fast_interval_s if cfg.planner_fast_interval_s < interval else 0.0,
        horizon_s=cfg.planner_startup_s + interval if cfg.planner_startup_s > 0 else 0.0, wake_s=cfg.planner_wake_s)


def decision_to_pb(d: Decision, planner_id: str, obs: Observation, seq: int, dry_run: bool) -> cpb.PlannerDecision:
    rate = Traffic.merge(obs.windows).request_rate
    return cpb.PlannerDecision(
        planner_id=planner_id, decided_at_unix_ms=int(time.time() * 1000), mode=d.mode,
        num_prefill=d.num_prefill, num_decode=d.num_decode,
        actions=[cpb.PlannerAction(kind=KIND_TO_PB[a.kind], role=a.role, worker_id=a.worker_id) for a in d.actions],
        reasons=[cpb.PlannerReason(code=r.code, role=r.role, values={k: float(v) for k, v in r.values.items()})
                 for r in d.reasons],
        num_prefill_ready=len(obs.tier("prefill")), num_decode_ready=len(obs.tier("decode")),
        request_rate=0.0 if math.isnan(rate) else rate, dry_run=dry_run, seq=seq)


class PlannerGauges:
    """The planner's Prometheus metrics (``tandem_planner_*`` of ``runtime.metric_catalog``), in
    their own registry: the planner's metrics port serves it (several planners in one test process
    do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.desired = mc.PLANNER_DESIRED.create(r)
        self.ready = mc.PLANNER_READY.create(r)
        self.predicted_latency = mc.PLANNER_PREDICTED_LATENCY.create(r)
        self.observed_latency = mc.PLANNER_OBSERVED_LATENCY.create(r)
        self.observed_rate = mc.PLANNER_OBSERVED_RATE.create(r)
        self.predicted_rate = mc.PLANNER_PREDICTED_RATE.create(r)
        self.reason = mc.PLANNER_REASON.create(r)
        self.decided_at = mc.PLANNER_DECISION_TIME.create(r)
        self.actions = mc.PLANNER_ACTIONS.create(r)

    def update(self, d: Decision, obs: Observation, core: Planner) -> None:
        traffic = Traffic.merge(obs.windows)
        observed = {"prefill": traffic.ttft_ms_p95 / 1000, "decode": traffic.itl_ms_p95 / 1000}
        predicted = {"prefill": math.nan, "decode": math.nan}
        for r in d.reasons:
            if r.role == "prefill" and "ttft_s" in r.values:
                predicted["prefill"] = r.values["ttft_s"]
            if r.role == "decode" and "itl_s" in r.values:
                predicted["decode"] = r.values["itl_s"]
        for role in ROLES:
            self.desired.labels(role).set(d.replicas(role))
            self.ready.labels(role).set(len(obs.tier(role)))
            self.observed_latency.labels(role).set(observed[role])
            self.predicted_latency.labels(role).set(predicted[role])
        self.observed_rate.set(traffic.request_rate)
        self.predicted_rate.set(core.throughput.forecast().rate if core.throughput is not None else math.nan)
        self.reason.clear()
        for r in d.reasons:
            self.reason.labels(r.role or "all", r.code).set(1)
        self.decided_at.set(time.time())
        for a in d.actions:
            self.actions.labels(a.kind.value, a.role).inc()


class PlannerService:
    def __init__(self, cfg: ClusterConfig, config: PlannerConfig, actuator: Actuator | None = None, *,
                 dry_run: bool = False, profile: Profile | None = None, planner_id: str = "",
                 gauges: PlannerGauges | None = None) -> None:
        if actuator is None and not dry_run:
            raise ValueError("a planner that acts needs an actuator (or dry_run=True)")
        if profile is None and config.mode != "load":
            profile = Profile.load(cfg.planner_profile) if cfg.planner_profile else None
        self.cfg, self.config = cfg, config
        self.core = Planner(config, profile)
        self.actuator = actuator
        self.dry_run = dry_run
        self.planner_id = planner_id or f"planner-{uuid.uuid4().hex[:6]}"
        self.view = ClusterView(cfg.planner_window_s or 3 * config.adjustment_interval_s)
        self.gauges = gauges or PlannerGauges()
        self.seq = 0
        self.last: Decision | None = None
        self.first_seen: dict[str, float] = {}
        self._history: list[int] = []
        self._plane: ControlPlane | None = None
        self._views: list[PrefixView] = []
        self.metrics_url = ""  # where its gauges are served (set by whoever serves them), in its registration

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; etcd errors skip a tick, never end the loop."""
        cfg, ns = self.cfg, self.cfg.namespace
        self._plane = plane = await ControlPlane.from_config(cfg).connect()
        view = self.view
        now = time.monotonic
        registered = {r: PrefixView(plane, keys.workers_prefix(ns, r), cpb.WorkerInfo) for r in ROLES}
        steps = PrefixView(plane, keys.metrics_prefix(ns, keys.WORKER_STEPS), cpb.WorkerStepStats,
                           on_put=view.steps_put, on_delete=view.steps_deleted)
        routers = PrefixView(plane, keys.metrics_prefix(ns, keys.ROUTER_STATS), cpb.RouterWindowStats,
                             on_put=lambda rid, msg: view.router_put(rid, msg, now()),
                             on_delete=view.router_deleted)
        self._views = [*registered.values(), steps, routers]
        try:
            for v in self._views:
                await v.start()
            for rid, msg in routers.items.items():
                view.router_put(rid, msg, now())
            for wid, msg in steps.items.items():
                view.steps_put(wid, msg)
            await self._read_history()
            await plane.put_message(keys.planner_key(ns, self.planner_id), cpb.PlannerInfo(
                planner_id=self.planner_id, metrics_url=self.metrics_url, mode=self.config.mode, dry_run=self.dry_run,
                pid=os.getpid(), started_at_unix_ms=int(time.time() * 1000)))  # lease-bound: gone when it stops
            log.info("planner %s: %s mode, every %.1f s, budget %d%s", self.planner_id, self.config.mode,
                     self.config.adjustment_interval_s, self.config.gpu_budget, " (dry run)" if self.dry_run else "")
            interval, fast = self.config.adjustment_interval_s, self.config.fast_interval_s
            next_tick = now()
            while not stop.is_set():
                is_tick = now() >= next_tick
                if is_tick:
                    next_tick = now() + interval
                try:
                    if is_tick:
                        await self.tick({r: registered[r].items for r in ROLES})
                    else:
                        await self.react({r: registered[r].items for r in ROLES})
                except Exception:
                    log.exception("planner %s failed", "tick" if is_tick else "fast check")
                wait = next_tick - now() if fast <= 0 else min(next_tick - now(), fast)
                try:
                    async with asyncio.timeout(max(0.0, wait)):
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            for v in self._views:
                await v.stop()
            await plane.close()

    def _observe(self, registered: Mapping[str, Mapping[str, object]], fast: bool = False) -> Observation:
        now = time.monotonic()
        for role in ROLES:
            for wid in registered.get(role, {}):
                self.first_seen.setdefault(wid, now)
        transitions = self.actuator.transitions() if self.actuator is not None else {}
        free = self.actuator.num_gpus_free() if self.actuator is not None else None
        obs = self.view.observe(now, registered, transitions, free, self.first_seen, consume=not fast)
        parked = getattr(self.actuator, "num_parked", None)  # read only where it would change the horizon
        if parked is None or self.config.wake_s <= 0 or self.config.horizon_s <= 0:
            return obs
        return dataclasses.replace(obs, num_parked=parked())

    async def react(self, registered: Mapping[str, Mapping[str, object]]) -> Decision:
        """The fast check between ticks (``Planner.react``): acted on and published like a tick's
        decision only when it starts something (the last tick's decision stays the current one)."""
        obs = self._observe(registered, fast=True)
        decision = self.core.react(obs)
        if not decision.actions:
            return decision
        return await self._carry_out(decision, obs)

    async def tick(self, registered: Mapping[str, Mapping[str, object]]) -> Decision:
        obs = self._observe(registered)
        return await self._carry_out(self.core.tick(obs), obs)

    async def _carry_out(self, decision: Decision, obs: Observation) -> Decision:
        self.seq += 1
        self.last = decision
        msg = decision_to_pb(decision, self.planner_id, obs, self.seq, self.dry_run)
        self.gauges.update(decision, obs, self.core)
        if decision.actions:
            log.info("planner: %d prefill + %d decode; %s; %s", decision.num_prefill, decision.num_decode,
                     ", ".join(f"{a.kind.value} {a.role} {a.worker_id}".strip() for a in decision.actions),
                     "; ".join(str(r) for r in decision.reasons))
        if self.dry_run:
            self.core.pending.clear()  # nothing is carried out: nothing to wait for
        elif decision.actions and self.actuator is not None:
            self.actuator.act(decision.actions)
        await self._publish(msg, bool(decision.actions))
        return decision

    async def _publish(self, msg: cpb.PlannerDecision, changes: bool) -> None:
        plane, ns = self._plane, self.cfg.namespace
        if plane is None:
            return
        await plane.put_message(keys.planner_decision_key(ns), msg, lease=False)
        if not changes:
            return
        seq = (self._history[-1] + 1) if self._history else 0
        await plane.put_message(keys.planner_history_key(ns, seq), msg, lease=False)
        self._history.append(seq)
        while len(self._history) > HISTORY:
            await plane.delete(keys.planner_history_key(ns, self._history.pop(0)))

    async def _read_history(self) -> None:
        assert self._plane is not None
        prefix = keys.planner_history_prefix(self.cfg.namespace)
        self._history = sorted(int(k[len(prefix):]) for k in await self._plane.get_prefix(prefix)
                               if k[len(prefix):].isdigit())
