"""The local launcher: the embedded cluster's subprocesses behind the :class:`Launcher` interface
(``tandem serve`` runs the cluster; the planner and the tests scale it through this)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from deploy.launcher import (
    WORKER_ROLES,
    DrainResult,
    Launcher,
    ServiceInfo,
    ServiceState,
    SwitchResult,
    drain_worker,
    park_drained,
    stop_process,
    switch_worker,
    wake_parked,
    warm_pool_size,
)
from deploy.local_cluster import Child, LocalCluster
from runtime.internal_grpc import InternalGrpc
from runtime.settings import ClusterConfig


class LocalLauncher(Launcher):
    """The embedded cluster (:class:`deploy.local_cluster.LocalCluster`) behind the launcher
    interface: services are subprocesses of this one, etcd is embedded unless configured."""

    def __init__(self, cfg: ClusterConfig, log_dir: str | Path | None = None, quiet: bool = False,
                 warm_pool: int | None = None) -> None:
        self.cluster = LocalCluster(cfg, num_prefill=cfg.num_prefill, num_decode=cfg.num_decode, log_dir=log_dir,
                                    quiet=quiet)
        self.cfg = self.cluster.cfg
        self._stopped: set[str] = set()
        self._init_pool(warm_pool)

    @classmethod
    def around(cls, cluster: LocalCluster, warm_pool: int | None = None) -> LocalLauncher:
        """The launcher of a cluster started elsewhere (``tandem serve``'s, for its planner)."""
        launcher = cls.__new__(cls)
        launcher.cluster, launcher.cfg, launcher._stopped = cluster, cluster.cfg, set()
        launcher._init_pool(warm_pool)
        return launcher

    def _init_pool(self, warm_pool: int | None) -> None:
        """``warm_pool`` (None: the config's ``warm_pool``): at most this many drained workers are
        parked, not stopped (a later start takes one back in seconds); 0: a drained worker stops."""
        self.warm_pool = warm_pool_size(self.cfg, warm_pool)
        self._parked: dict[str, float] = {}  # parked workers' names -> when they parked, the longest parked first
        self.wake_ms: list[float] = []  # per start a parked worker served: the worker's milliseconds

    def start(self, timeout_s: float = 600.0) -> LocalLauncher:
        self.cluster.start(timeout_s)
        self.cfg = self.cluster.cfg
        try:
            for _ in range(self.cfg.num_routers - 1):
                self.cluster.add_router(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.cluster.stop()

    def start_services(self, roles: Sequence[str], timeout_s: float = 600.0) -> list[ServiceInfo]:
        started = []
        for role in roles:
            if role in WORKER_ROLES and self._parked:
                child = self._unpark(role)
            elif role == "router":
                child = self.cluster.add_router(timeout_s)
            elif role in WORKER_ROLES:
                child = self.cluster.add_worker(role, timeout_s)
            else:
                raise ValueError(f"the local launcher cannot start a {role!r} service")
            started.append(self._info(child))
        return started

    def drain_services(self, names: Sequence[str], timeout_s: float | None = None) -> dict[str, DrainResult]:
        wait_s = self.cfg.drain_timeout_s if timeout_s is None else timeout_s
        children = {c.name: c for c in self.cluster.children}
        result = {}
        for name in names:
            child = children[name]
            drained = DrainResult(0, True)
            was_parked = self._parked.pop(name, None) is not None  # draining a parked worker stops it
            if child.ready and "endpoint" in child.ready and child.proc.poll() is None and not was_parked:
                drained = drain_worker(child.ready["endpoint"], wait_s, InternalGrpc.from_config(self.cfg))
            if not was_parked and self._park(child, drained):
                result[name] = drained
                continue
            self._stopped.add(name)
            stop_process(child.proc)
            result[name] = drained
        return result

    def _park(self, child: Child, drained: DrainResult) -> bool:
        """Park a drained worker if the pool has room (its process stays); whether it did."""
        role = child.role or child.name.split("-")[0]
        if len(self._parked) >= self.warm_pool or child.proc.poll() is not None or \
                not park_drained((child.ready or {}).get("endpoint", ""), role, drained,
                                 InternalGrpc.from_config(self.cfg)):
            return False
        self._parked[child.name] = time.time()
        return True

    def _unpark(self, role: str) -> Child:
        """A start served by the longest-parked worker: its device back, registered in ``role``."""
        name = next(iter(self._parked))
        del self._parked[name]
        child = next(c for c in self.cluster.children if c.name == name)
        result = wake_parked(child.ready["endpoint"], role, InternalGrpc.from_config(self.cfg))
        if result is None:  # it died parked, or cannot come back: a new worker instead
            self._stopped.add(name)
            stop_process(child.proc)
            return self.cluster.add_worker(role)
        self.wake_ms.append(result.switch_ms)
        child.role = role
        return child

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        child = next(c for c in self.cluster.children if c.name == name)
        result = switch_worker(self._info(child).endpoint, role, InternalGrpc.from_config(self.cfg), timeout_s)
        child.role = role
        return result

    def services(self) -> list[ServiceInfo]:
        return [self._info(child) for child in self.cluster.children]

    def _info(self, child: Child) -> ServiceInfo:
        ready = child.ready or {}
        if child.proc.poll() is not None:
            if child.name in self._stopped:
                state = ServiceState.STOPPED
            elif child.ready is None and child.num_restarts == 0:
                # crashed before it was ever ready: whoever waits for it starts it once more
                # (LocalCluster._wait); tandem serve must not stop the cluster for it
                state = ServiceState.RESTARTING
            else:
                state = ServiceState.DEAD
        elif child.name in self._parked:
            state = ServiceState.PARKED
        else:
            state = ServiceState.SERVING if child.ready else ServiceState.STARTING
        return ServiceInfo(name=child.name, role=child.role or child.name.split("-")[0], state=state,
                           node=self.cfg.host, pid=child.proc.pid,
                           endpoint=ready.get("endpoint") or ready.get("http", ""),
                           worker_id=ready.get("worker_id", ""), parked_since=self._parked.get(child.name, 0.0))
