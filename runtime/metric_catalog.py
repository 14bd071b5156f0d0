"""Every Prometheus metric tandem exports, defined once, by Prometheus's naming conventions.

The processes build their metrics from these definitions (``ROUTER_TTFT.create()``), and the
Grafana dashboards and the Prometheus config in ``deploy/observability/`` are generated from the
same ones (``deploy/observability_gen.py``), so a metric renamed here cannot leave a dead panel.

Conventions (``convention_problems`` checks them; ``tests/observability/test_conventions.py``
runs it on the catalog and on what the processes really serve):

- names are ``tandem_<subsystem>_<what>[_<unit>]``, lower snake case;
- counters end in ``_total``, nothing else does;
- base units only, as the last word: ``_seconds``, ``_bytes``, ``_ratio`` (0..1); never ``ms``,
  ``kb``, ``percent``; a name that says it measures time (latency, duration, wait, time) is in
  seconds;
- labels come from a closed vocabulary of bounded sets (``LABELS``): no request id, prompt or
  user, nothing whose values grow with traffic. ``worker`` is bounded by the cluster's size;
  ``model`` by the models served (a router serves one);
- what is observed per served request (``per_request``: the router's TTFT, ITL, end-to-end time
  and token counts) is labelled ``model``, the served model's name.

Who serves what (``exporter``): ``router`` (the router's /metrics: requests, SLOs, its view of
the cluster from etcd, the planner's last decision in etcd), ``worker`` (every worker's /metrics,
with ``kv`` and the tier-specific ones), ``planner`` (the planner service's own /metrics: what it
saw, predicted and did each tick). Worker metrics carry no role or worker label: the scrape
targets do (``/metrics/targets``: ``role``, ``worker``, ``model``). The subsystem word names the
exporter for the router and the planner: ``tandem_router_*`` is the router's, ``tandem_planner_*``
the planner's, and nothing else is (two processes serving one name is a clash on a dashboard).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# Label names and what bounds them.
LABELS = {
    "api": "the client API: openai_completions, openai_chat, kserve",
    "status": "an HTTP status code, or 'disconnected'",
    "path": "where a prompt was prefilled: local or remote",
    "role": "a worker tier: prefill or decode",
    "worker": "a worker id (bounded by the cluster's size)",
    "model": "the served model's name (what the router resolved a request to, never a client's string)",
    "target": "an SLO target: ttft, itl or both",
    "transport": "a KV transport: nixl, cuda_ipc, nccl, tcp, loopback",
    "mode": "a KV handoff mode: push, pull or none",
    "reason": "a stable reason code (held-block release, transfer failure)",
    "code": "a planner reason code",
    "action": "a planner action: start, drain, switch, abandon",
}
UNITS = ("seconds", "bytes", "ratio")
EXPORTERS = ("router", "worker", "prefill", "decode", "planner")
OWNED_SUBSYSTEMS = ("router", "planner")  # tandem_<subsystem>_* names its one exporter
_NAME_RE = re.compile(r"^tandem_[a-z][a-z0-9]*(_[a-z0-9]+)+$")
_BAD_UNITS = ("ms", "msec", "millis", "milliseconds", "us", "microseconds", "ns", "minutes", "hours", "kb", "mb",
              "gb", "kib", "mib", "gib", "percent", "pct")
_TIME_WORDS = ("latency", "duration", "wait", "time")

# Latency buckets (seconds): sub-millisecond ITLs to minute-long requests, ~25-50% apart where
# SLOs sit, so that p50/p90/p99 read from them are close to the exact ones.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
FINE_BUCKETS = tuple(round(1e-4 * 1.25 ** k, 7) for k in range(60))  # 0.1 ms .. ~65 s, 25% apart
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 36, 2))  # 1 KiB .. 32 GiB, x4 apart


@dataclass(frozen=True)
class Metric:
    """One metric's definition. ``create`` makes the prometheus_client object (counters are
    handed to prometheus_client without their ``_total``, which it adds back)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    exporter: str  # "router" | "worker" (the worker tiers share it) | "prefill" | "decode" | "planner"
    labels: tuple[str, ...] = ()
    unit: str = ""  # "seconds" | "bytes" | "ratio" | "" (a count)
    buckets: tuple[float, ...] | None = None
    # Observed for each served request (or its tokens): labelled ``model``, the name of the model
    # the router resolved the request to (never the name a client sent: that is unbounded).
    per_request: bool = False

    def create(self, registry: CollectorRegistry | None = REGISTRY) -> Counter | Gauge | Histogram:
        if self.kind == "counter":
            return Counter(self.name.removesuffix("_total"), self.help, self.labels, registry=registry)
        if self.kind == "gauge":
            return Gauge(self.name, self.help, self.labels, registry=registry)
        return Histogram(self.name, self.help, self.labels, buckets=self.buckets or LATENCY_BUCKETS,
                         registry=registry)

    @property
    def series(self) -> str:
        """The series a query reads: ``_bucket`` for a histogram, the name itself otherwise."""
        return self.name + "_bucket" if self.kind == "histogram" else self.name


CATALOG: dict[str, Metric] = {}

# No ``*_created`` series beside every counter and histogram: they are not in the catalog, double
# what Prometheus stores, and Prometheus 2 ignores them in the text format.
disable_created_metrics()


def _define(name: str, kind: str, help: str, exporter: str, labels: Iterable[str] = (), unit: str = "",
            buckets: tuple[float, ...] | None = None, per_request: bool = False) -> Metric:
    if name in CATALOG:
        raise ValueError(f"metric {name} is defined twice")
    metric = CATALOG[name] = Metric(name, kind, help, exporter, tuple(labels), unit, buckets, per_request)
    return metric


def get(name: str) -> Metric:
    """The definition of ``name`` (what the dashboards' generator calls: a typo fails there)."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"no metric {name!r} in runtime/metric_catalog.py") from None


# ---- router: requests ---------------------------------------------------------------------------
ROUTER_REQUESTS = _define("tandem_router_requests_total", "counter", "Requests finished, by API and outcome",
                          "router", ("api", "status"))
ROUTER_INFLIGHT = _define("tandem_router_inflight_requests", "gauge", "Requests being served", "router")
ROUTER_TTFT = _define("tandem_router_time_to_first_token_seconds", "histogram", "Arrival to first token",
                      "router", ("model",), "seconds", LATENCY_BUCKETS, per_request=True)
ROUTER_ITL = _define("tandem_router_inter_token_latency_seconds", "histogram", "Time between streamed tokens",
                     "router", ("model",), "seconds", ITL_BUCKETS, per_request=True)
ROUTER_E2E = _define("tandem_router_request_duration_seconds", "histogram", "Arrival to last token", "router",
                     ("model",), "seconds", LATENCY_BUCKETS, per_request=True)
ROUTER_PROMPT_TOKENS = _define("tandem_router_prompt_tokens_total", "counter", "Prompt tokens of served requests",
                               "router", ("model",), per_request=True)
ROUTER_COMPLETION_TOKENS = _define("tandem_router_completion_tokens_total", "counter",
                                   "Generated tokens of served requests", "router", ("model",), per_request=True)
ROUTER_ROUTE_DECISIONS = _define("tandem_router_route_decisions_total", "counter", "Where prompts were prefilled",
                                 "router", ("path",))
ROUTER_SLO_ATTAINMENT = _define(
    "tandem_router_slo_attainment_ratio", "gauge",
    "Of the requests finished over the router's window (RouterWindowStats.window_s), the fraction that met the "
    "target: ttft (time to first token), itl (mean inter-token latency), both", "router", ("target",), "ratio")
ROUTER_SLO_TARGET = _define("tandem_router_slo_target_seconds", "gauge", "The SLO targets (ttft_slo_ms, itl_slo_ms)",
                            "router", ("target",), "seconds")
ROUTER_WINDOW_REQUESTS = _define("tandem_router_window_finished_requests", "gauge",
                                 "Requests finished over the router's window (the attainment's denominator)",
                                 "router")
# ---- router: its view of the cluster (workers' registrations and published loads in etcd) ------
ROUTER_WORKERS = _define("tandem_router_workers", "gauge",
                         "Workers registered in etcd (a dead one leaves within the lease TTL)", "router", ("role",))
ROUTER_GPUS = _define("tandem_router_gpus", "gauge",
                      "GPUs the registered workers of a tier hold (their WorkerInfo.num_gpus: "
                      "ClusterConfig.gpus_per_worker, 0 on cpu unless set)", "router", ("role",))
ROUTER_WORKER_FAILURES = _define("tandem_router_worker_failures_total", "counter", "Worker calls that failed",
                                 "router", ("role",))
ROUTER_WORKER_KV_USAGE = _define("tandem_router_worker_kv_usage_ratio", "gauge",
                                 "A worker's KV cache in use, as it last published it", "router",
                                 ("role", "worker"), "ratio")
ROUTER_WORKER_WAITING = _define("tandem_router_worker_waiting_requests", "gauge",
                                "A worker's queued requests (waiting plus waiting for their KV), as last published",
                                "router", ("role", "worker"))
ROUTER_WORKER_RUNNING = _define("tandem_router_worker_running_requests", "gauge",
                                "A worker's running requests, as last published", "router", ("role", "worker"))
ROUTER_PEER_INFLIGHT = _define("tandem_router_peer_inflight_requests", "gauge",
                                "Requests the other router replicas last published as in flight on a tier's workers "
                                "(etcd, lease-bound: a dead replica's are forgotten within its lease TTL)", "router",
                                ("role",))
ROUTER_PREFIX_HIT = _define("tandem_router_prefix_hit_ratio", "gauge",
                            "Fraction of a worker's prompt tokens served from its prefix cache since it started "
                            "(from its published load)", "router", ("role", "worker"), "ratio")
# ---- router: KV-aware routing -----------------------------------------------------------------------
ROUTER_DECISION_SECONDS = _define(
    "tandem_router_decision_seconds", "histogram",
    "Routing decision time: prompt hashing, KV index lookups and worker choice (no I/O)", "router", unit="seconds",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2))
ROUTER_KV_OVERLAP_BLOCKS = _define(
    "tandem_router_kv_overlap_blocks", "histogram",
    "Per request: leading prompt blocks the chosen worker holds (per the KV index)", "router", ("role",),
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
ROUTER_KV_INDEXED_BLOCKS = _define("tandem_router_kv_indexed_blocks", "gauge", "(worker, block) pairs in the KV index",
                                   "router", ("role",))
ROUTER_KV_AHEAD_GIVEN_UP = _define("tandem_router_kv_ahead_given_up_total", "counter",
                                   "Calls with a handle sent ahead that sent nothing within kv_pull_timeout_s (+ a "
                                   "grace) of the prefill's answer: cancelled, the decode worker called again whole",
                                   "router")
ROUTER_FIRST_TOKENS_HELD = _define(
    "tandem_router_first_tokens_held_total", "counter",
    "Handed-off requests whose first token the router held for the decode worker's first (first_token_hold), by "
    "how it went out: with_decode (with the decode worker's first), deadline (alone, at the TTFT target)", "router",
    ("reason",))
# ---- router: the planner's last decision, read from etcd (every router, planner running or not) -----
ROUTER_PLANNER_DESIRED = _define("tandem_router_planner_desired_workers", "gauge",
                                 "The replicas the planner's last decision in etcd wants per tier (PlannerDecision)",
                                 "router", ("role",))
ROUTER_PLANNER_DECISION_TIME = _define("tandem_router_planner_decision_timestamp_seconds", "gauge",
                                       "When the planner's last decision in etcd was taken (unix time)", "router",
                                       unit="seconds")
ROUTER_PLANNER_REASON = _define("tandem_router_planner_decision_reason", "gauge",
                                "1 for each reason of the planner's last decision in etcd (its stable code and tier)",
                                "router", ("role", "code"))
ROUTER_PLANNER_PREDICTED_RATE = _define("tandem_router_planner_predicted_request_rate", "gauge",
                                        "Requests per second the planner's last decision in etcd forecast "
                                        "(throughput mode)", "router")
ROUTER_PLANNER_DECISIONS = _define("tandem_router_planner_decisions_total", "counter",
                                   "Planner decisions this router has seen in etcd", "router")
# ---- planner: the planner service's own /metrics (planner/service.py, every tick) -----------------------
PLANNER_DESIRED = _define("tandem_planner_desired_workers", "gauge", "Workers per tier the last decision wants",
                          "planner", ("role",))
PLANNER_READY = _define("tandem_planner_ready_workers", "gauge",
                        "Workers per tier the last tick saw registered and serving", "planner", ("role",))
PLANNER_PREDICTED_LATENCY = _define(
    "tandem_planner_predicted_latency_seconds", "gauge",
    "The load mode's prediction for the next interval: TTFT (prefill) or ITL (decode); NaN without a fit",
    "planner", ("role",), "seconds")
PLANNER_OBSERVED_LATENCY = _define("tandem_planner_observed_latency_seconds", "gauge",
                                   "The routers' p95 over the planner's window: TTFT (prefill) or ITL (decode)",
                                   "planner", ("role",), "seconds")
PLANNER_OBSERVED_RATE = _define("tandem_planner_observed_request_rate", "gauge",
                                "Requests per second arriving at the routers over the planner's window", "planner")
PLANNER_PREDICTED_RATE = _define("tandem_planner_predicted_request_rate", "gauge",
                                 "Requests per second forecast for the next interval (throughput and both modes)",
                                 "planner")
PLANNER_REASON = _define("tandem_planner_last_decision_reason", "gauge",
                         "1 for each reason of the last decision (its stable code and tier; 'all' for none)",
                         "planner", ("role", "code"))
PLANNER_DECISION_TIME = _define("tandem_planner_last_decision_timestamp_seconds", "gauge",
                                "When the planner last decided (unix time)", "planner", unit="seconds")
PLANNER_ACTIONS = _define("tandem_planner_actions_total", "counter", "Actions the planner issued (none in a dry run)",
                          "planner", ("action", "role"))
# ---- workers (both tiers) ---------------------------------------------------------------------------
WORKER_WAITING = _define("tandem_worker_num_waiting", "gauge", "Requests queued, not yet scheduled", "worker")
WORKER_RUNNING = _define("tandem_worker_num_running", "gauge", "Requests running", "worker")
WORKER_PULLING = _define("tandem_worker_num_pulling", "gauge", "Requests waiting for their prompt's KV", "worker")
WORKER_QUEUED_PREFILL = _define("tandem_worker_num_queued_prefill_tokens", "gauge", "Prompt tokens still to compute",
                                "worker")
WORKER_FREE_BLOCKS = _define("tandem_worker_num_free_blocks", "gauge", "Free KV blocks (evictable cached included)",
                             "worker")
WORKER_PINNED_BLOCKS = _define("tandem_worker_num_pinned_blocks", "gauge", "KV blocks held for KV handles", "worker")
WORKER_KV_USAGE = _define("tandem_worker_kv_usage_ratio", "gauge", "Fraction of the KV blocks in use", "worker",
                          unit="ratio")
WORKER_PROMPT_TOKENS = _define("tandem_worker_prompt_tokens_total", "counter", "Prompt tokens admitted", "worker")
WORKER_CACHED_TOKENS = _define("tandem_worker_cached_prompt_tokens_total", "counter",
                               "Admitted prompt tokens served from the prefix cache", "worker")
WORKER_STEPS = _define("tandem_worker_engine_steps_total", "counter", "Engine steps", "worker")
WORKER_QUEUE_WAIT = _define("tandem_worker_queue_wait_seconds", "histogram",
                            "A request's wait in the worker's queue: arrival in the engine to its first scheduled step",
                            "worker", unit="seconds", buckets=LATENCY_BUCKETS)
WORKER_PREFILL = _define("tandem_worker_prefill_seconds", "histogram",
                         "A prompt's prefill: its first scheduled step to its first token (prompts prefilled here)",
                         "worker", unit="seconds", buckets=LATENCY_BUCKETS)
WORKER_ROLE_SWITCH = _define("tandem_worker_role_switch_seconds", "histogram",
                             "A tier switch: drained in one role to registered in the other", "worker",
                             unit="seconds", buckets=LATENCY_BUCKETS)
# ---- the host KV tier (engine.kv_host_tier): served by every worker, 0 where it is off -----------------
WORKER_HOST_KV_BLOCKS = _define("tandem_worker_host_kv_blocks", "gauge", "Host KV tier capacity in blocks (0: off)",
                                "worker")
WORKER_HOST_KV_USED = _define("tandem_worker_host_kv_used_blocks", "gauge", "Blocks the host KV tier holds", "worker")
WORKER_HOST_KV_LOADED = _define("tandem_worker_host_kv_loaded_blocks_total", "counter",
                                "Blocks copied back from the host KV tier into the device cache (prefix hits)",
                                "worker")
WORKER_HOST_KV_OFFLOADED = _define("tandem_worker_host_kv_offloaded_blocks_total", "counter",
                                   "Evicted device blocks copied into the host KV tier", "worker")
WORKER_HOST_KV_LOADED_BYTES = _define("tandem_worker_host_kv_loaded_bytes_total", "counter",
                                      "Bytes copied from the host KV tier into the device cache", "worker",
                                      unit="bytes")
WORKER_HOST_KV_OFFLOADED_BYTES = _define("tandem_worker_host_kv_offloaded_bytes_total", "counter",
                                         "Bytes copied from the device cache into the host KV tier", "worker",
                                         unit="bytes")
# ---- KV plane: kv_transfer (the side that starts a transfer counts it) -------------------------------
KV_TRANSFER_BYTES = _define("tandem_kv_transfer_bytes_total", "counter",
                            "KV cache bytes moved to or from peers (counted by the initiating side)", "worker",
                            ("transport",), "bytes")
KV_TRANSFER_BLOCKS = _define("tandem_kv_transfer_blocks_total", "counter",
                             "KV cache blocks moved to or from peers (counted by the initiating side)", "worker",
                             ("transport",))
KV_TRANSFER_DURATION = _define(
    "tandem_kv_transfer_duration_seconds", "histogram",
    "Wall time of one successful pull or push (one request's blocks), from request to completion", "worker",
    ("transport",), "seconds",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
KV_TRANSFER_REQUEST_BYTES = _define("tandem_kv_transfer_request_bytes", "histogram",
                                    "Bytes of one successful transfer (one request's blocks)", "worker",
                                    ("transport",), "bytes", BYTES_BUCKETS)
KV_TRANSFER_FAILURES = _define("tandem_kv_transfer_failures_total", "counter",
                               "Transfers that raised TransferError; reason is timeout, peer, layout or closed",
                               "worker", ("transport", "reason"))
KV_TRANSFER_CONNECTS = _define(
    "tandem_kv_transfer_connects_total", "counter",
    "Per-peer set-ups: a NIXL remote agent loaded, a CUDA IPC handle mapped, an NCCL pair group built", "worker",
    ("transport",))
# ---- KV handoff: the decode worker's view of each request, the prefill worker's holds -----------------
HANDOFF_FALLBACKS = _define("tandem_kv_pull_fallbacks_total", "counter",
                            "Requests whose KV transfer failed or was refused, recomputed locally", "decode")
HANDOFF_AHEAD_LANDED = _define("tandem_kv_handoff_ahead_total", "counter",
                               "Handles sent ahead (while the prompt prefilled) whose blocks landed", "decode")
HANDOFF_BLOCKS = _define("tandem_kv_handoff_blocks_total", "counter", "Prompt blocks received from prefill workers",
                         "decode", ("mode",))
HANDOFF_SECONDS = _define("tandem_kv_handoff_seconds", "histogram",
                          "A request's KV handoff on the decode worker: transfer started to blocks landed "
                          "(a handle sent ahead: the prefill worker's write)", "decode",
                          ("mode",), "seconds", FINE_BUCKETS)
HELD_RELEASES = _define("tandem_kv_held_releases_total", "counter", "KV holds ended on a prefill worker, by why",
                        "prefill", ("reason",))


def convention_problems(metrics: Iterable[Metric]) -> list[str]:
    """What breaks the conventions above, one sentence per problem (empty: none)."""
    problems: list[str] = []
    seen: set[str] = set()
    for m in metrics:
        n = m.name
        words = n.split("_")
        if n in seen:
            problems.append(f"{n}: defined twice")
        seen.add(n)
        if not _NAME_RE.match(n):
            problems.append(f"{n}: not tandem_<subsystem>_<what> in lower snake case")
        if m.kind not in ("counter", "gauge", "histogram"):
            problems.append(f"{n}: unknown kind {m.kind!r}")
        if (m.kind == "counter") != n.endswith("_total"):
            problems.append(f"{n}: counters, and only counters, end in _total")
        if m.kind == "histogram" and n.endswith(("_bucket", "_sum", "_count")):
            problems.append(f"{n}: a histogram's name must not end in _bucket/_sum/_count")
        if m.unit and m.unit not in UNITS:
            problems.append(f"{n}: unit {m.unit!r} is not a base unit {UNITS}")
        last = words[-2] if m.kind == "counter" and len(words) > 2 else words[-1]
        if m.unit and last != m.unit:
            problems.append(f"{n}: its unit {m.unit!r} must be the name's last word (before _total)")
        if not m.unit and last in UNITS:
            problems.append(f"{n}: the name ends in a unit but the definition declares none")
        if any(w in _BAD_UNITS for w in words):
            problems.append(f"{n}: use base units (_seconds, _bytes, _ratio), not {set(words) & set(_BAD_UNITS)}")
        if any(w in _TIME_WORDS for w in words) and m.unit != "seconds":
            problems.append(f"{n}: measures time, so it is in seconds (_seconds)")
        for label in m.labels:
            if label not in LABELS:
                problems.append(f"{n}: label {label!r} is not in the bounded vocabulary {sorted(LABELS)}")
        if m.per_request and "model" not in m.labels:
            problems.append(f"{n}: observed per served request, so it is labelled model")
        if len(set(m.labels)) != len(m.labels):
            problems.append(f"{n}: a label repeats")
        if not m.help.strip():
            problems.append(f"{n}: no help text")
        if m.exporter not in EXPORTERS:
            problems.append(f"{n}: unknown exporter {m.exporter!r}")
        for owner in OWNED_SUBSYSTEMS:
            if (words[1:2] == [owner]) != (m.exporter == owner):
                problems.append(f"{n}: tandem_{owner}_* is served by the {owner} and only by it "
                                f"(exporter {m.exporter!r})")
    return problems
