"""Launchers: what starts, drains and stops one cluster's services, and reports what runs where.

Two implementations behind :class:`Launcher`:

- :class:`deploy.local_launcher.LocalLauncher`: subprocesses on this machine, around
  :class:`deploy.local_cluster.LocalCluster` (what ``tandem serve`` runs);
- :class:`deploy.ray_launcher.RayLauncher`: every service a Ray actor, placed on GPUs,
  restarted on failure (``tandem deploy``).

The planner acts through this interface: :meth:`Launcher.scale` to a target per tier, which
starts new workers and drains the ones it removes. Draining a worker (:func:`drain_worker`,
the worker's ``Drain`` RPC) stops its admitting, deregisters it from etcd so that every router
drops it at once, and waits for its in-flight requests; only then is the process stopped.
Which workers go is decided by :func:`plan_scale`, a pure function.

The warm pool (the ``warm_pool`` setting, N; both launchers): a drained worker is parked instead
of stopped while fewer than N are (:func:`park_drained`: its process and model stay, its device
memory is given back, it serves no tier, reported PARKED); a start takes the longest-parked worker
first (:func:`wake_parked`: ``SwitchRole`` to the tier, the device back, registered; seconds, no
weights loaded) and starts a new worker only when none is parked or the parked one cannot come
back. Draining a parked worker stops it (the way to shrink the pool).
"""

from __future__ import annotations

import abc
import enum
import json
import math
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.internal_grpc import InternalGrpc
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from runtime.settings import ClusterConfig

WORKER_ROLES = ("prefill", "decode")
SERVICE_ROLES = ("router", "prefill", "decode", "planner", "etcd")
_ROLE_TO_PB = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE}


class DeployError(RuntimeError):
    """A deployment cannot be done as asked (not enough GPUs, a service that cannot start); the
    message says why and what to change."""


class ServiceState(enum.StrEnum):
    STARTING = "starting"  # placed, loading
    SERVING = "serving"
    DRAINING = "draining"
    RESTARTING = "restarting"  # died; the launcher is bringing it back
    STOPPED = "stopped"  # stopped on purpose
    PARKED = "parked"  # a drained worker kept for a fast start (the warm pool): no tier, no GPU
    DEAD = "dead"  # died and stays down


@dataclass(frozen=True)
class ServiceInfo:
    """One running service: where it runs and how it is doing."""

    name: str  # "router-0", "prefill-1", "etcd": unique in the deployment
    role: str  # one of SERVICE_ROLES
    state: ServiceState
    node: str = ""  # the node's address
    pid: int = 0  # the service process
    gpus: tuple[str, ...] = ()  # accelerator ids it holds on its node (CUDA_VISIBLE_DEVICES)
    endpoint: str = ""  # a worker's gRPC host:port, the router's HTTP URL, etcd's host:port
    worker_id: str = ""  # a worker's etcd registration id
    num_restarts: int = 0
    registered: bool | None = None  # a worker's key in etcd (None: not checked)
    num_requests: int = 0  # a worker's running + waiting requests, as last published
    actor_id: str = ""  # its Ray actor (the same across the actor's restarts); "" off Ray
    parked_since: float = 0.0  # a parked worker: when it parked (time.time()); the pool's order

    @property
    def index(self) -> int:
        """The number in the name ("decode-3" -> 3; -1 where there is none)."""
        tail = self.name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else -1


@dataclass(frozen=True)
class ScalePlan:
    """What :meth:`Launcher.scale` does: start ``start`` (one role per new worker) and drain
    ``drain`` (worker names); drain first when the new workers need the GPUs the drained free."""

    start: tuple[str, ...]
    drain: tuple[str, ...]
    drain_first: bool = False

    @property
    def empty(self) -> bool:
        return not self.start and not self.drain


@dataclass(frozen=True)
class DrainResult:
    """How a worker's drain went."""

    num_inflight: int  # requests it served when the drain began
    drained: bool  # they all finished (False: time ran out, the rest failed over when it stopped)

    def __str__(self) -> str:
        return f"{self.num_inflight} in flight, " + ("all finished" if self.drained else "drain timed out")


@dataclass(frozen=True)
class SwitchResult:
    """How a worker's tier switch went (``SwitchRole``)."""

    previous_role: str
    role: str
    num_inflight: int  # requests of the previous tier still finishing when it answered
    switch_ms: float  # in the worker: from the call to registered in the new tier
    call_ms: float  # here: the whole call


@dataclass(frozen=True)
class ScaleResult:
    plan: ScalePlan
    drained: dict[str, DrainResult]  # per drained worker


def plan_scale(running: Mapping[str, Sequence[ServiceInfo]], target: Mapping[str, int], *,
               gpus_per_worker: float = 0.0, free_gpus: float = math.inf) -> ScalePlan:
    """From the workers running per role to ``target`` workers per role. A tier that shrinks
    drains its least busy workers first, the newest among equals; new workers start before the
    old ones drain (capacity never dips below the smaller of before and after) unless the GPUs
    free now do not fit them."""
    start: list[str] = []
    drain: list[str] = []
    for role, want in target.items():
        if want < 0:
            raise ValueError(f"negative {role} worker count {want}")
        have = list(running.get(role, ()))
        if want > len(have):
            start += [role] * (want - len(have))
        else:
            by_cost = sorted(have, key=lambda s: (s.num_requests, -s.index))
            drain += [s.name for s in by_cost[:len(have) - want]]
    return ScalePlan(tuple(start), tuple(drain), drain_first=len(start) * gpus_per_worker > free_gpus + 1e-9)


def gpu_shortfall(gpus_per_worker: float, num_workers: int, node_gpus: Mapping[str, float]) -> str | None:
    """Why ``num_workers`` workers of ``gpus_per_worker`` GPUs each (each on one node) do not fit
    nodes with ``node_gpus`` GPUs, or None when they do."""
    if gpus_per_worker <= 0 or num_workers == 0:
        return None
    need = gpus_per_worker * num_workers
    have = sum(node_gpus.values())
    nodes = ", ".join(f"{node}: {n:g}" for node, n in sorted(node_gpus.items())) or "no nodes"
    largest = max(node_gpus.values(), default=0.0)
    if gpus_per_worker > largest:
        return (f"a worker needs {gpus_per_worker:g} GPUs on one node, and the largest node has {largest:g} "
                f"({nodes})")
    fit = sum(math.floor(n / gpus_per_worker + 1e-9) for n in node_gpus.values())
    if need > have + 1e-9 or fit < num_workers:
        return (f"{num_workers} workers x {gpus_per_worker:g} GPUs need {need:g} GPUs, and the cluster has "
                f"{have:g} ({nodes}): {fit} such workers fit")
    return None


class Launcher(abc.ABC):
    """Starts, drains and stops one cluster's routers, workers and planner."""

    cfg: ClusterConfig
    warm_pool: int  # at most this many drained workers are parked (see :func:`warm_pool_size`)

    @abc.abstractmethod
    def start(self, timeout_s: float = 600.0) -> Launcher:
        """Start every service the config asks for; return once the routers list every worker.
        On failure everything started is stopped and the error raised."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every service at once (no drain) and release what they held. Idempotent."""

    @abc.abstractmethod
    def start_services(self, roles: Sequence[str], timeout_s: float = 600.0) -> list[ServiceInfo]:
        """Start one service per entry of ``roles``; return once they serve."""

    @abc.abstractmethod
    def drain_services(self, names: Sequence[str], timeout_s: float | None = None) -> dict[str, DrainResult]:
        """Drain (workers) then stop the named services; how each drain went."""

    @abc.abstractmethod
    def services(self) -> list[ServiceInfo]:
        """What runs where, now."""

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        """Move the worker ``name`` to the other tier in place (its process, weights and KV cache stay;
        its in-flight requests finish). Launchers whose workers cannot switch raise DeployError."""
        raise DeployError(f"this launcher cannot switch a worker's tier ({type(self).__name__})")

    def free_gpus(self) -> float:
        """GPUs free for new workers."""
        return math.inf

    def check_capacity(self, roles: Sequence[str], released: Sequence[str] = ()) -> None:
        """Raise :class:`DeployError` at once, saying why, when new services of ``roles`` cannot fit
        (once the services named in ``released`` are gone). Here: anything fits."""
        return None

    def parked(self) -> list[ServiceInfo]:
        """The warm pool: parked workers, the longest parked first (the next start takes it)."""
        return sorted((s for s in self.services() if s.state is ServiceState.PARKED),
                      key=lambda s: (s.parked_since, s.name))

    def resize_warm_pool(self, size: int) -> list[str]:
        """From now on park at most ``size`` drained workers, and stop the parked ones beyond it (the
        most recently parked: the next starts take the longest parked), which frees what they hold
        (on Ray their GPU reservations); the names of those stopped."""
        self.warm_pool = warm_pool_size(self.cfg, size)
        extra = [s.name for s in self.parked()[self.warm_pool:]]
        if extra:
            self.drain_services(extra)
        return extra

    def workers(self, role: str) -> list[ServiceInfo]:
        """The live (not stopped, not dead) workers of ``role``, oldest first."""
        live = [s for s in self.services() if s.role == role and s.state not in (ServiceState.STOPPED,
                                                                                 ServiceState.DEAD,
                                                                                 ServiceState.PARKED)]
        return sorted(live, key=lambda s: s.index)

    def scale(self, num_prefill: int, num_decode: int, timeout_s: float = 600.0) -> ScaleResult:
        """Reach ``num_prefill`` prefill and ``num_decode`` decode workers (see :func:`plan_scale`)."""
        if num_decode < 1 or num_prefill < 0:
            raise ValueError("need at least one decode worker and no negative prefill count")
        if self.cfg.mode == "aggregated" and num_prefill:
            raise ValueError("an aggregated cluster has no prefill tier: scale it with --prefill 0")
        running = {role: self.workers(role) for role in WORKER_ROLES}
        plan = plan_scale(running, {"prefill": num_prefill, "decode": num_decode},
                          gpus_per_worker=self.cfg.gpus_per_worker, free_gpus=self.free_gpus())
        self.check_capacity(plan.start, released=plan.drain)
        drained = self.drain_services(plan.drain) if plan.drain_first and plan.drain else {}
        if plan.start:
            self.start_services(plan.start, timeout_s)
        if not plan.drain_first and plan.drain:
            drained = self.drain_services(plan.drain)
        return ScaleResult(plan, drained)

    def __enter__(self) -> Launcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- helpers both launchers use ----------------------------------------------------------------
def drain_worker(endpoint: str, wait_s: float, internal: InternalGrpc) -> DrainResult:
    """Ask the worker at ``endpoint`` to drain: it stops admitting (new calls fail UNAVAILABLE and
    the router retries them elsewhere), deregisters from etcd (the routers drop it at once) and
    waits up to ``wait_s`` for its in-flight requests, pinned KV handles included. A worker that
    is gone already drains nothing: ``DrainResult(0, False)``. ``internal``: the cluster's
    internal gRPC (mutual TLS or plaintext)."""
    with internal.blocking_channel(endpoint) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        try:
            load = stub.Health(pb.HealthRequest(), timeout=10.0).load
            reply = stub.Drain(pb.DrainRequest(wait_ms=int(wait_s * 1000)), timeout=wait_s + 10.0)
        except grpc.RpcError:
            return DrainResult(0, False)
    return DrainResult(load.num_running + load.num_waiting + load.num_pulling, reply.drained)


def switch_worker(endpoint: str, role: str, internal: InternalGrpc, timeout_s: float = 30.0) -> SwitchResult:
    """Ask the worker at ``endpoint`` to serve ``role`` from now on (``SwitchRole``; a parked worker
    takes its device back first); DeployError when it cannot (a single-tier worker, draining, gone)."""
    t0 = time.perf_counter()
    with internal.blocking_channel(endpoint) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        try:
            reply = stub.SwitchRole(pb.SwitchRoleRequest(role=_ROLE_TO_PB[role]), timeout=timeout_s)
        except grpc.RpcError as e:
            raise DeployError(f"the worker at {endpoint} cannot switch to {role}: {e.code().name} {e.details()}"
                              ) from None
    names = {v: k for k, v in _ROLE_TO_PB.items()} | {pb.WORKER_ROLE_UNSPECIFIED: ""}  # "": it was parked
    return SwitchResult(names[reply.previous_role], names[reply.role], reply.num_inflight, reply.switch_ms,
                        (time.perf_counter() - t0) * 1000)


def park_worker(endpoint: str, internal: InternalGrpc, timeout_s: float = 60.0) -> float:
    """Park the drained worker at ``endpoint`` (``SwitchRole`` to no tier): it gives its device
    back and keeps its process and model. The worker's milliseconds; DeployError when it cannot
    (not drained, requests left, a single-tier worker, gone)."""
    with internal.blocking_channel(endpoint) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        try:
            reply = stub.SwitchRole(pb.SwitchRoleRequest(role=pb.WORKER_ROLE_UNSPECIFIED), timeout=timeout_s)
        except grpc.RpcError as e:
            raise DeployError(f"the worker at {endpoint} cannot park: {e.code().name} {e.details()}") from None
    return reply.switch_ms


def warm_pool_size(cfg: ClusterConfig, warm_pool: int | None) -> int:
    """The pool's size: ``warm_pool``, else the config's ``warm_pool`` setting; 0: no pool."""
    size = cfg.warm_pool if warm_pool is None else warm_pool
    if size < 0:
        raise ValueError(f"warm_pool must be >= 0, got {size}")
    return size


def park_drained(endpoint: str, role: str, drained: DrainResult, internal: InternalGrpc) -> bool:
    """Park a worker that :func:`drain_worker` drained (:func:`park_worker`); whether it parked. Only
    a worker of a tier whose in-flight requests all finished parks; one that refuses (a transport
    that registered device memory by address, gone) is for the caller to stop."""
    if role not in WORKER_ROLES or not endpoint or not drained.drained:
        return False
    try:
        park_worker(endpoint, internal)
    except DeployError:
        return False
    return True


def wake_parked(endpoint: str, role: str, internal: InternalGrpc, timeout_s: float = 30.0) -> SwitchResult | None:
    """Take a parked worker back into ``role`` (:func:`switch_worker`: its device back, registered);
    None when it cannot come back (it died parked, it refuses): the caller stops it and starts a
    new worker instead."""
    try:
        return switch_worker(endpoint, role, internal, timeout_s)
    except DeployError:
        return None


def router_health(http_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The router's ``/health`` body (``decode_workers``, ``prefill_workers``), or ``{"error": ...}``."""
    try:
        with urllib.request.urlopen(f"{http_url}/health", timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:  # 503 while it lists no decode worker
        raw = e.read()
    except OSError as e:
        return {"error": repr(e)}
    try:
        return json.loads(raw)
    except ValueError:
        return {"error": raw.decode(errors="replace")}


def wait_router_serves(http_url: str, timeout_s: float) -> str:
    """Until the router serves a model (``/health`` 200: it is ready, every tier its mode needs has
    a worker of it, and ``/v1/models`` lists it); returns the model's name. ``/health`` is public
    when the router asks for API keys (``public_paths``), ``/v1/models`` is not. TimeoutError
    after ``timeout_s``."""
    deadline = time.monotonic() + max(timeout_s, 1.0)
    while True:
        try:
            with urllib.request.urlopen(f"{http_url}/health", timeout=5) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):
            body = {}
        if body.get("status") == "ok" and body.get("model"):
            return body["model"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router at {http_url} serves no model; /health: {router_health(http_url)}")
        time.sleep(0.1)


def wait_routers_list(http_urls: Sequence[str], timeout_s: float, *, at_least: Mapping[str, int] | None = None,
                      at_most: Mapping[str, int] | None = None) -> None:
    """Until every router's /health counts, per role, at least ``at_least`` and at most
    ``at_most`` workers (``{"decode": 2}``); TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + max(timeout_s, 1.0)

    def ok(body: dict[str, Any]) -> bool:
        count = {role: body.get(f"{role}_workers") for role in WORKER_ROLES}
        if any(v is None for v in count.values()):
            return False
        return all(count[r] >= n for r, n in (at_least or {}).items()) and \
            all(count[r] <= n for r, n in (at_most or {}).items())

    for url in http_urls:
        while not ok(body := router_health(url)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router at {url} does not list the workers (at least {at_least}, at most "
                                   f"{at_most}); /health: {body}")
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM (a service shuts down gracefully), SIGKILL after ``timeout_s``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)
