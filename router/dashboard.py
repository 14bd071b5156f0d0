"""The router's live dashboard and its scrape targets.

- ``/dashboard``: one self-contained page (no CDN, no script from elsewhere; charts are SVG drawn
  here, ``router.dashboard_svg``) that polls ``/dashboard/data`` every second.
- ``/dashboard/data``: JSON of what the page shows. Every number the page shows that Prometheus
  also has is given with the exact series it equals on this router's ``/metrics``
  (``"metric": "name{labels}"``): the per-tier workers, GPUs, queue, running and KV usage (what the
  workers last published in etcd, ``WorkerPool.reported``), prefix hit ratios, SLO attainment.
- ``/metrics/targets``: Prometheus HTTP service discovery (``http_sd_configs``) of the cluster's
  processes: this router, every registered worker and every running planner, labelled ``role``,
  ``worker``, ``model``.

:class:`Dashboard` samples once a second (``sample_s``) into a 10-minute history: the window's
TTFT/ITL percentiles (``router.request_window``), attainment, request and token rates, the KV
handoff times the decode workers report, per-tier load; and reads the planner's decision from
etcd (``keys.planner_decision_key``, a ``PlannerDecision``), keeping a timeline of the distinct
decisions seen and exporting the ``tandem_router_planner_*`` gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import REGISTRY

from router import dashboard_svg, metrics
from router.request_flow import RequestFlow
from router.request_window import HANDOFFS, WINDOW, RequestWindow
from runtime import keys
from runtime import metric_catalog as mc
from runtime.discovery import list_planners, scrape_targets
from runtime.etcd import ControlPlane
from runtime.pb import tandem_control_pb2 as cpb
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.router")

HISTORY = 600  # samples kept (10 minutes at 1 Hz)
PLANNER_HISTORY = 200  # planner decisions kept
RATE_SPAN_S = 10.0  # request and token rates: over this much of the history
TARGETS = ("ttft", "itl", "both")


def series_key(name: str, **labels: str) -> str:
    """A sample's key as Prometheus's text format writes it: ``name{a="x",b="y"}``."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"




class Dashboard:
    """What ``/dashboard/data`` serves, sampled once a second; the planner's decisions from etcd."""

    def __init__(self, cfg: ClusterConfig, flow: RequestFlow, plane: ControlPlane, model: Callable[[], str | None],
                 window: RequestWindow = WINDOW, sample_s: float = 1.0) -> None:
        self.cfg = cfg
        self.flow = flow
        self.plane = plane
        self.model = model
        self.window = window
        self.sample_s = sample_s
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=PLANNER_HISTORY)
        self._reasons: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self.num_samples = 0
        targets = {"ttft": cfg.ttft_slo_ms / 1000, "itl": cfg.itl_slo_ms / 1000}
        for target, seconds in targets.items():
            metrics.SLO_TARGET.labels(target).set(seconds)
        for target in TARGETS:
            metrics.SLO_ATTAINMENT.labels(target).set_function(lambda t=target: self._attainment_metric(t))
        metrics.WINDOW_REQUESTS.set_function(lambda: self.window.num_finished())

    # ---- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def routes(self) -> list[tuple[str, Callable]]:
        """(path, handler) pairs for the router's HTTP app."""
        return [("/dashboard", self.page), ("/dashboard/data", self.data_response), ("/metrics/targets", self.targets)]

    async def _run(self) -> None:
        while True:
            try:
                await self._read_planner()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd hiccup: keep what we have
                log.debug("planner decision read failed: %r", e)
            self.history.append(self._sample())
            self.num_samples += 1
            await asyncio.sleep(self.sample_s)

    # ---- the numbers -----------------------------------------------------------------------------
    def attainment(self) -> dict[str, float | None]:
        return self.window.attainment(self.cfg.ttft_slo_ms, self.cfg.itl_slo_ms)

    def _attainment_metric(self, target: str) -> float:
        value = self.attainment()[target]
        return float("nan") if value is None else value

    def tiers(self) -> dict[str, dict[str, Any]]:
        """Per tier: its workers and what each last published (the values of this router's
        ``tandem_router_worker_*`` gauges, set from the same ``reported`` loads)."""
        out: dict[str, dict[str, Any]] = {}
        for role, pool in self.flow.pools.items():
            members = pool.members()
            workers = []
            for wid in sorted(members):
                load = pool.reported.get(wid)
                entry: dict[str, Any] = {"worker": wid, "endpoint": members[wid].endpoint}
                if load is not None:
                    labels = {"role": role, "worker": wid}
                    entry |= {
                        "kv_usage": _number(load.kv_usage, mc.ROUTER_WORKER_KV_USAGE.name, labels),
                        "waiting": _number(load.num_waiting + load.num_pulling, mc.ROUTER_WORKER_WAITING.name, labels),
                        "running": _number(load.num_running, mc.ROUTER_WORKER_RUNNING.name, labels),
                    }
                    if load.num_prompt_tokens:
                        entry["prefix_hit_ratio"] = _number(load.num_cached_tokens / load.num_prompt_tokens,
                                                            mc.ROUTER_PREFIX_HIT.name, labels)
                workers.append(entry)
            published = [w for w in workers if "kv_usage" in w]
            out[role] = {
                "workers": _number(len(members), mc.ROUTER_WORKERS.name, {"role": role}),
                "gpus": _number(pool.num_gpus(), mc.ROUTER_GPUS.name, {"role": role}),
                "waiting": sum(w["waiting"]["value"] for w in published),
                "running": sum(w["running"]["value"] for w in published),
                "kv_usage": (sum(w["kv_usage"]["value"] for w in published) / len(published)) if published else None,
                "worker_list": workers,
            }
        return out

    def _sample(self) -> dict[str, Any]:
        snap = self.window.snapshot()
        tiers = self.tiers()
        return {
            "t": time.time(),
            "ttft_ms": {"p50": snap.ttft_ms_p50, "p90": snap.ttft_ms_p90, "p99": snap.ttft_ms_p99},
            "itl_ms": {"p50": snap.itl_ms_p50, "p90": snap.itl_ms_p90, "p99": snap.itl_ms_p99},
            "attainment": self.attainment(),
            "requests_total": _total(mc.ROUTER_REQUESTS.name),
            "completion_tokens_total": _total(mc.ROUTER_COMPLETION_TOKENS.name),
            "prefix_hit_ratio": _tier_hit_ratio(self.flow),
            "kv_handoff_ms": HANDOFFS.percentiles(),
            "tiers": {role: {k: t[k] for k in ("waiting", "running", "kv_usage")}
                      | {"workers": t["workers"]["value"], "gpus": t["gpus"]["value"]} for role, t in tiers.items()},
        }

    def rates(self) -> dict[str, float | None]:
        """Requests finished and tokens generated per second over the last RATE_SPAN_S of history."""
        samples = list(self.history)
        if len(samples) < 2:
            return {"request_rate": None, "tokens_per_s": None}
        last = samples[-1]
        first = next((s for s in samples if last["t"] - s["t"] <= RATE_SPAN_S), samples[0])
        dt = last["t"] - first["t"]
        if dt <= 0:
            first, dt = samples[-2], last["t"] - samples[-2]["t"]
        return {"request_rate": (last["requests_total"] - first["requests_total"]) / dt if dt > 0 else None,
                "tokens_per_s": (last["completion_tokens_total"] - first["completion_tokens_total"]) / dt
                if dt > 0 else None}

    def data(self) -> dict[str, Any]:
        attainment = self.attainment()
        snap = self.window.snapshot()
        history = list(self.history)
        return {
            "now_unix_ms": int(time.time() * 1000),
            "num_samples": self.num_samples,
            "model": self.model(),
            "mode": self.cfg.mode,
            "slo": {"ttft_ms": self.cfg.ttft_slo_ms, "itl_ms": self.cfg.itl_slo_ms, "window_s": self.window.window_s},
            "attainment": {t: _number(attainment[t], mc.ROUTER_SLO_ATTAINMENT.name, {"target": t}) for t in TARGETS},
            "window": {"finished": _number(self.window.num_finished(), mc.ROUTER_WINDOW_REQUESTS.name, {}),
                       "ttft_ms": {"p50": snap.ttft_ms_p50, "p90": snap.ttft_ms_p90, "p99": snap.ttft_ms_p99},
                       "itl_ms": {"p50": snap.itl_ms_p50, "p90": snap.itl_ms_p90, "p99": snap.itl_ms_p99}},
            "rates": self.rates(),
            "prefix_hit_ratio": _tier_hit_ratio(self.flow),
            "kv_handoff_ms": HANDOFFS.percentiles(),
            "tiers": self.tiers(),
            "planner": list(self.decisions),
            "charts": dashboard_svg.charts(history, self.cfg.ttft_slo_ms, self.cfg.itl_slo_ms),
        }

    # ---- the planner -------------------------------------------------------------------------------
    async def _read_planner(self) -> None:
        decision = await self.plane.get_message(keys.planner_decision_key(self.plane.namespace), cpb.PlannerDecision)
        if decision is None:
            return
        if self.decisions and self.decisions[-1]["decided_at_unix_ms"] == decision.decided_at_unix_ms \
                and self.decisions[-1]["planner_id"] == decision.planner_id:
            return
        self.decisions.append(decision_to_json(decision))
        metrics.PLANNER_DECISIONS.inc()
        metrics.PLANNER_DESIRED.labels("prefill").set(decision.num_prefill)
        metrics.PLANNER_DESIRED.labels("decode").set(decision.num_decode)
        metrics.PLANNER_DECISION_TIME.set(decision.decided_at_unix_ms / 1000)
        reasons = {(r.role, r.code) for r in decision.reasons}
        for gone in self._reasons - reasons:
            with contextlib.suppress(KeyError):
                metrics.PLANNER_REASON.remove(*gone)
        for role, code in reasons:
            metrics.PLANNER_REASON.labels(role, code).set(1)
        self._reasons = reasons
        for r in decision.reasons:
            if r.code == "forecast" and "rate" in r.values:
                metrics.PLANNER_PREDICTED_RATE.set(r.values["rate"])

    # ---- HTTP --------------------------------------------------------------------------------------
    async def page(self, request: Request) -> HTMLResponse:
        html = resources.files("router").joinpath("dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def data_response(self, request: Request) -> JSONResponse:
        return JSONResponse(self.data(), headers={"Cache-Control": "no-store"})

    async def targets(self, request: Request) -> JSONResponse:
        """Prometheus http_sd: this router (``/metrics`` on the address the scraper used), every
        registered worker (its ``metrics_url``) and every running planner (read from etcd)."""
        workers = [info for pool in self.flow.pools.values() for info in pool.workers.workers.values()]
        groups = scrape_targets(workers, [request.url.netloc], self.model() or "", await list_planners(self.plane))
        return JSONResponse(groups)


def decision_to_json(d: cpb.PlannerDecision) -> dict[str, Any]:
    kinds = {v.number: v.name.removeprefix("KIND_").lower()
             for v in cpb.PlannerAction.Kind.DESCRIPTOR.values}
    return {
        "planner_id": d.planner_id, "decided_at_unix_ms": d.decided_at_unix_ms, "mode": d.mode,
        "num_prefill": d.num_prefill, "num_decode": d.num_decode,
        "actions": [{"kind": kinds.get(a.kind, "unspecified"), "role": a.role, "worker_id": a.worker_id}
                    for a in d.actions],
        "reasons": [{"code": r.code, "role": r.role, "values": dict(sorted(r.values.items()))} for r in d.reasons],
    }


def _number(value: float | None, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A shown number with the /metrics series it equals."""
    return {"value": value, "metric": series_key(name, **labels)}


def _total(name: str) -> float:
    """A counter of this process's registry, summed over its labels."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == name.removesuffix("_total"):
            total += sum(s.value for s in family.samples if s.name == name)
    return total


def _tier_hit_ratio(flow: RequestFlow) -> dict[str, float | None]:
    """Per tier: cached over admitted prompt tokens, summed over its workers' published loads."""
    out: dict[str, float | None] = {}
    for role, pool in flow.pools.items():
        loads = [load for wid, load in pool.reported.items() if wid in pool.members()]
        prompt = sum(load.num_prompt_tokens for load in loads)
        out[role] = sum(load.num_cached_tokens for load in loads) / prompt if prompt else None
    return out
