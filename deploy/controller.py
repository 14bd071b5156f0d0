"""The deployment controller: a detached Ray actor named ``{namespace}.controller`` (Ray namespace
``tandem``) on the head node, holding the deployment's config and running its
:class:`RayLauncher` (its warm pool from the config's ``warm_pool``). ``tandem deploy
status|scale|pool|down`` and the planner reach it by name from any later process; it serialises changes
(one scale or down at a time) and answers status meanwhile. Its one state besides the config is
what each worker actor is: the tier it was switched or woken into, or parked
(:meth:`DeploymentController.recorded_role`: a restarted worker actor asks it, and comes back in
that tier, or, parked, starts nothing); the rest is the deployment's named actors, so a restarted
controller adopts what runs and reads the tiers and the pool back from the live actors.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from deploy.launcher import WORKER_ROLES, DrainResult, ScaleResult, ServiceInfo, ServiceState, SwitchResult
from deploy.ray_launcher import CONTROLLER, HEAD_NODE, PARKED, RAY_NAMESPACE, RayLauncher, actor_name
from runtime.settings import ClusterConfig


@dataclass(frozen=True)
class DeploymentStatus:
    namespace: str
    ray_address: str
    etcd_endpoints: tuple[str, ...]
    services: tuple[ServiceInfo, ...]
    num_gpus: float  # in the Ray cluster
    num_free_gpus: float
    timings_s: dict[str, float] = field(default_factory=dict)  # of the last deploy / scale / down
    warm_pool: int = 0  # at most this many drained workers park (the config's, or the last resize)

    def tier(self, role: str) -> list[ServiceInfo]:
        return [s for s in self.services if s.role == role]

    def serving(self, role: str) -> list[ServiceInfo]:
        return [s for s in self.tier(role) if s.state is ServiceState.SERVING]

    @property
    def router_urls(self) -> list[str]:
        return [s.endpoint for s in self.serving("router")]


class DeploymentController:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.launcher = RayLauncher(cfg)
        self._lock = threading.Lock()
        self._timings: dict[str, float] = {}
        # worker name -> (its actor id, the tier a switch or a wake put it in, or PARKED). Keyed by
        # the actor too: a name is reused by a later start once its worker is gone, and the new one
        # starts afresh.
        self._switched: dict[str, tuple[str, str]] = {}
        with contextlib.suppress(Exception):  # a restarted controller: the live actors know their tiers
            self._remember()

    def deploy(self, timeout_s: float = 600.0) -> DeploymentStatus:
        with self._lock, self._timed("deploy"):
            self.launcher.start(timeout_s)
        return self.status()

    def scale(self, num_prefill: int, num_decode: int, timeout_s: float = 600.0) -> ScaleResult:
        with self._lock, self._timed("scale"), self._remembering():
            return self.launcher.scale(num_prefill, num_decode, timeout_s)

    # The planner's actuator acts through these (deploy.planner_actuator.ControllerLauncher).
    def start_services(self, roles: list[str], timeout_s: float = 600.0) -> list[ServiceInfo]:
        with self._lock, self._timed("start"), self._remembering():
            self.launcher.check_capacity(roles)
            return self.launcher.start_services(roles, timeout_s)

    def drain_services(self, names: list[str], timeout_s: float | None = None) -> dict[str, DrainResult]:
        with self._lock, self._timed("drain"), self._remembering():
            return self.launcher.drain_services(names, timeout_s)

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        """Not behind the lock: a switch takes milliseconds and must not wait for a start. The new
        tier is recorded for the worker's actor, which comes back in it if Ray restarts it."""
        with self._timed("switch"):
            result = self.launcher.switch_worker(name, role, timeout_s)
        actor_id = next((s.actor_id for s in self.launcher.services(with_etcd=False) if s.name == name), "")
        self._switched[name] = (actor_id, result.role)
        return result

    def resize_warm_pool(self, size: int) -> list[str]:
        """Park at most ``size`` drained workers from now on (the planner's drains too: it acts through
        this launcher); stop the parked beyond it. A restarted controller goes back to the config's."""
        with self._lock, self._timed("pool"), self._remembering():
            return self.launcher.resize_warm_pool(size)

    def recorded_role(self, name: str, actor_id: str) -> str | None:
        """The tier worker ``name`` (the actor ``actor_id``) was last switched or woken into, ``parked``
        (:data:`deploy.ray_launcher.PARKED`) if it was parked; None if neither."""
        actor, role = self._switched.get(name, ("", ""))
        return role if actor == actor_id and role else None

    def services(self) -> list[ServiceInfo]:
        return self.launcher.services()

    def down(self) -> dict[str, DrainResult]:
        """Drain every worker, then stop everything; the caller kills this actor afterwards."""
        with self._lock, self._timed("down"):
            return self.launcher.down()

    def status(self) -> DeploymentStatus:
        services = self.launcher.services()
        resources, free = ray.cluster_resources(), ray.available_resources()
        return DeploymentStatus(self.cfg.namespace, ray.get_runtime_context().gcs_address,
                                self.launcher.etcd_endpoints(), tuple(services), resources.get("GPU", 0.0),
                                free.get("GPU", 0.0), dict(self._timings), self.launcher.warm_pool)

    def config(self) -> ClusterConfig:
        return self.cfg

    def _remember(self) -> None:
        """Record what each live worker actor is now: parked, or serving a tier (a wake may have put
        it in another tier than its name's). Actors in between (restarting, draining) keep theirs."""
        for s in self.launcher.services(with_etcd=False):
            if s.role not in WORKER_ROLES:
                continue
            if s.state is ServiceState.PARKED:
                self._switched[s.name] = (s.actor_id, PARKED)
            elif s.state is ServiceState.SERVING and (s.name in self._switched or
                                                      s.role != s.name.rpartition("-")[0]):
                self._switched[s.name] = (s.actor_id, s.role)

    @contextlib.contextmanager
    def _remembering(self):
        """Around a change: afterwards, even when it failed, :meth:`_remember`."""
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self._remember()

    @contextlib.contextmanager
    def _timed(self, what: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._timings[what] = round(time.monotonic() - t0, 2)


def controller_name(namespace: str) -> str:
    return actor_name(namespace, CONTROLLER)


def create_controller(cfg: ClusterConfig) -> Any:
    """Start the deployment's controller; DeployError-free: raises ValueError if one runs already."""
    if find_controller(cfg.namespace) is not None:
        raise ValueError(f"namespace {cfg.namespace!r} is already deployed on this Ray cluster: "
                         "`tandem deploy down` it first, or pick another namespace")
    actor = ray.remote(DeploymentController).options(
        name=controller_name(cfg.namespace), namespace=RAY_NAMESPACE, lifetime="detached", num_cpus=0,
        max_concurrency=8, max_restarts=3, resources={HEAD_NODE: 0.001})
    return actor.remote(cfg)


def find_controller(namespace: str) -> Any | None:
    try:
        return ray.get_actor(controller_name(namespace), namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def deployed_namespaces() -> list[str]:
    suffix = ".controller"
    return sorted(a["name"][:-len(suffix)] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == RAY_NAMESPACE and a["name"].endswith(suffix))
