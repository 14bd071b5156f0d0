"""The control plane's key schema: every etcd key tandem reads or writes is made here.

    /tandem/{ns}/workers/{role}/{worker_id}            WorkerInfo                 lease-bound
    /tandem/{ns}/metrics/{role}/{worker_id}            tandem.worker.v1.Load      lease-bound, ~1 Hz
    /tandem/{ns}/metrics/router/{router_id}            RouterWindowStats          lease-bound, ~1 Hz
    /tandem/{ns}/metrics/router_inflight/{router_id}   RouterInflight             lease-bound, ~1 Hz
    /tandem/{ns}/metrics/steps/{worker_id}             WorkerStepStats            lease-bound, ~1 Hz
    /tandem/{ns}/planner/decision                      PlannerDecision            not lease-bound
    /tandem/{ns}/planner/history/{seq:012d}            PlannerDecision            not lease-bound, last 200
    /tandem/{ns}/planner/instances/{planner_id}        PlannerInfo                lease-bound
    /tandem/{ns}/launchers/{launcher_id}               LauncherInfo               lease-bound
    /tandem/{ns}/nccl/{pair key}/...                   torch.distributed Store    lease-bound (the writer's)

``role`` is ``prefill`` or ``decode``. The values are the protobuf messages of
``proto/tandem_control.proto`` (``Load``: ``proto/tandem_worker.proto``), serialized.
Segments (namespace, role, ids) are checked: no ``/``, not empty.
"""

from __future__ import annotations

from runtime.settings import check_name

ROOT = "/tandem"
WORKER_ROLES = ("prefill", "decode")
ROUTER_STATS = "router"  # the metrics "role" of router window stats
ROUTER_INFLIGHT = "router_inflight"  # the metrics "role" of router in-flight load
WORKER_STEPS = "steps"  # the metrics "role" of workers' step summaries (one key per worker, any tier)


def namespace_prefix(ns: str) -> str:
    return f"{ROOT}/{check_name('namespace', ns)}/"


def workers_prefix(ns: str, role: str) -> str:
    return f"{namespace_prefix(ns)}workers/{check_name('role', role)}/"


def worker_key(ns: str, role: str, worker_id: str) -> str:
    return workers_prefix(ns, role) + check_name("worker id", worker_id)


def metrics_prefix(ns: str, role: str) -> str:
    """Where one kind of publisher writes its metrics: a worker role, ``router`` or ``router_inflight``."""
    return f"{namespace_prefix(ns)}metrics/{check_name('role', role)}/"


def metrics_key(ns: str, role: str, publisher_id: str) -> str:
    return metrics_prefix(ns, role) + check_name("worker id", publisher_id)


def worker_load_key(ns: str, role: str, worker_id: str) -> str:
    if role not in WORKER_ROLES:
        raise ValueError(f"bad worker role {role!r}; expected one of {WORKER_ROLES}")
    return metrics_key(ns, role, worker_id)


def router_stats_key(ns: str, router_id: str) -> str:
    return metrics_key(ns, ROUTER_STATS, router_id)


def router_inflight_key(ns: str, router_id: str) -> str:
    return metrics_key(ns, ROUTER_INFLIGHT, router_id)


def worker_steps_key(ns: str, worker_id: str) -> str:
    return metrics_key(ns, WORKER_STEPS, worker_id)


def planner_decision_key(ns: str) -> str:
    return f"{namespace_prefix(ns)}planner/decision"


def planner_history_prefix(ns: str) -> str:
    return f"{namespace_prefix(ns)}planner/history/"


def planner_history_key(ns: str, seq: int) -> str:
    """Zero-padded: the keys sort in decision order."""
    if seq < 0:
        raise ValueError(f"bad history sequence number {seq}")
    return f"{planner_history_prefix(ns)}{seq:012d}"


def planners_prefix(ns: str) -> str:
    """Where running planners register (``PlannerInfo``: their metrics URL)."""
    return f"{namespace_prefix(ns)}planner/instances/"


def planner_key(ns: str, planner_id: str) -> str:
    return planners_prefix(ns) + check_name("planner id", planner_id)


def launchers_prefix(ns: str) -> str:
    """Where a process that starts the cluster's workers registers its ``ClusterLauncher`` service."""
    return f"{namespace_prefix(ns)}launchers/"


def launcher_key(ns: str, launcher_id: str) -> str:
    return launchers_prefix(ns) + check_name("launcher id", launcher_id)


def nccl_store_prefix(ns: str) -> str:
    """Where the NCCL KV transport's worker pairs meet (``worker.etcd_store.EtcdStore``'s keys)."""
    return f"{namespace_prefix(ns)}nccl/"


def id_under(prefix: str, key: str) -> str:
    """The last segment of ``key``, which lies under ``prefix``."""
    if not key.startswith(prefix):
        raise ValueError(f"key {key!r} is not under {prefix!r}")
    return key[len(prefix):]
