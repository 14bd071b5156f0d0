"""A launcher over gRPC: the embedded cluster's scaling calls for a planner in another process.

``tandem serve``'s workers are its own subprocesses, so only that process can start more of
them. It serves :class:`LauncherServer` (``tandem.control.v1.ClusterLauncher``: start, drain,
switch, list) on a free port of its host and registers it in etcd under its lease
(``/tandem/{ns}/launchers/{id}``, a ``LauncherInfo``); ``tandem planner --etcd-endpoints ...``
finds it there (:func:`find_launcher`) and acts through :class:`RemoteLauncher`, a
:class:`deploy.launcher.Launcher` whose calls are these RPCs.

With the cluster's internal TLS (``runtime.internal_grpc``) the service takes only clients with a
certificate of the cluster's CA: nobody else can start, drain or switch its workers.

Starts run on one long-lived thread of the server (a local worker dies with the thread that
spawned it, PR_SET_PDEATHSIG), one at a time; drains and switches on the RPC's own thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent import futures

import grpc

from deploy.launcher import (
    WORKER_ROLES,
    DeployError,
    DrainResult,
    Launcher,
    ServiceInfo,
    ServiceState,
    SwitchResult,
)
from runtime import keys
from runtime.etcd import ControlPlane
from runtime.internal_grpc import InternalGrpc
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_control_pb2_grpc as cpb_grpc
from runtime.settings import ClusterConfig


def service_to_pb(s: ServiceInfo) -> cpb.ServiceStatus:
    return cpb.ServiceStatus(name=s.name, role=s.role, state=s.state.value, node=s.node, pid=s.pid,
                             endpoint=s.endpoint, worker_id=s.worker_id)


def service_from_pb(m: cpb.ServiceStatus) -> ServiceInfo:
    return ServiceInfo(name=m.name, role=m.role, state=ServiceState(m.state), node=m.node, pid=m.pid,
                       endpoint=m.endpoint, worker_id=m.worker_id)


class _Servicer(cpb_grpc.ClusterLauncherServicer):
    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.spawner = futures.ThreadPoolExecutor(1, thread_name_prefix="launcher-spawn")  # its thread lives on

    def StartServices(self, request: cpb.StartServicesRequest, context: grpc.ServicerContext
                      ) -> cpb.StartServicesResponse:
        roles, mode = list(request.roles), self.launcher.cfg.mode
        if bad := [r for r in roles if r not in WORKER_ROLES or (r == "prefill" and mode != "disaggregated")]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot start {bad} in a {self.launcher.cfg.mode} cluster")
        timeout_s = request.timeout_s or 600.0
        try:
            started = self.spawner.submit(self.launcher.start_services, roles, timeout_s).result()
        except TimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except Exception as e:
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return cpb.StartServicesResponse(services=[service_to_pb(s) for s in started])

    def DrainServices(self, request: cpb.DrainServicesRequest, context: grpc.ServicerContext
                      ) -> cpb.DrainServicesResponse:
        known = {s.name for s in self.launcher.services()}
        if unknown := [n for n in request.names if n not in known]:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no such services: {unknown}")
        timeout_s = request.timeout_s if request.HasField("timeout_s") else None
        drained = self.launcher.drain_services(list(request.names), timeout_s)
        return cpb.DrainServicesResponse(drained={name: cpb.DrainOutcome(num_inflight=r.num_inflight,
                                                                         drained=r.drained)
                                                  for name, r in drained.items()})

    def SwitchWorker(self, request: cpb.SwitchWorkerRequest, context: grpc.ServicerContext
                     ) -> cpb.SwitchWorkerResponse:
        if request.name not in {s.name for s in self.launcher.services()}:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no such worker: {request.name}")
        try:
            r = self.launcher.switch_worker(request.name, request.role, request.timeout_s or 30.0)
        except DeployError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return cpb.SwitchWorkerResponse(previous_role=r.previous_role, role=r.role, num_inflight=r.num_inflight,
                                        switch_ms=r.switch_ms)

    def ListServices(self, request: cpb.ListServicesRequest, context: grpc.ServicerContext
                     ) -> cpb.ListServicesResponse:
        return cpb.ListServicesResponse(services=[service_to_pb(s) for s in self.launcher.services()])


class LauncherServer:
    """``launcher``'s calls as a ``ClusterLauncher`` gRPC service on ``cfg.host`` (a free port),
    registered in etcd while it runs (mutual TLS when ``cfg`` has the cluster's internal
    certificates). :meth:`start`, then :meth:`stop`."""

    def __init__(self, launcher: Launcher, cfg: ClusterConfig) -> None:
        self.launcher, self.cfg = launcher, cfg
        self.launcher_id = f"launcher-{uuid.uuid4().hex[:6]}"
        self.endpoint = ""
        self._servicer = _Servicer(launcher)
        self._server: grpc.Server | None = None
        self._registered = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> LauncherServer:
        self._server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="launcher-rpc"))
        cpb_grpc.add_ClusterLauncherServicer_to_server(self._servicer, self._server)
        port = InternalGrpc.from_config(self.cfg).add_port(self._server, f"{self.cfg.host}:0")
        self._server.start()
        self.endpoint = f"{self.cfg.host}:{port}"
        self._thread = threading.Thread(target=lambda: asyncio.run(self._register()), name="launcher-etcd",
                                        daemon=True)
        self._thread.start()
        if not self._registered.wait(timeout_s) or self.error is not None:
            self.stop()
            raise RuntimeError(f"the launcher service could not register in etcd: {self.error!r}")
        return self

    async def _register(self) -> None:
        """Hold the registration under this process's lease until :meth:`stop`."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with ControlPlane.from_config(self.cfg) as plane:
                info = cpb.LauncherInfo(launcher_id=self.launcher_id, endpoint=self.endpoint, mode=self.cfg.mode,
                                        pid=os.getpid(), started_at_unix_ms=int(time.time() * 1000))
                await plane.put_message(keys.launcher_key(self.cfg.namespace, self.launcher_id), info)
                self._registered.set()
                await self._stop.wait()
        except BaseException as e:
            self.error = e
        finally:
            self._registered.set()

    def stop(self) -> None:
        """Deregister (the lease is revoked), then stop answering."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5)
        self._servicer.spawner.shutdown(wait=False, cancel_futures=True)


class RemoteLauncher(Launcher):
    """The launcher of a cluster served by another process (``tandem serve``), over its
    ``ClusterLauncher`` service. Scaling only: the cluster was started, and is stopped, there."""

    def __init__(self, endpoint: str, cfg: ClusterConfig) -> None:
        self.endpoint, self.cfg = endpoint, cfg
        self._channel = InternalGrpc.from_config(cfg).blocking_channel(endpoint)
        self._stub = cpb_grpc.ClusterLauncherStub(self._channel)

    def _call(self, method: str, request: object, timeout_s: float) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise DeployError(f"the launcher at {self.endpoint}: {method} failed: {e.code().name} {e.details()}"
                              ) from None

    def start(self, timeout_s: float = 600.0) -> RemoteLauncher:
        raise DeployError("the cluster runs already (tandem serve); a remote launcher only scales it")

    def stop(self) -> None:
        self._channel.close()

    def start_services(self, roles: Sequence[str], timeout_s: float = 600.0) -> list[ServiceInfo]:
        reply = self._call("StartServices", cpb.StartServicesRequest(roles=list(roles), timeout_s=timeout_s),
                           timeout_s + 60)
        return [service_from_pb(s) for s in reply.services]

    def drain_services(self, names: Sequence[str], timeout_s: float | None = None) -> dict[str, DrainResult]:
        request = cpb.DrainServicesRequest(names=list(names), timeout_s=timeout_s)
        wait_s = self.cfg.drain_timeout_s if timeout_s is None else timeout_s
        reply = self._call("DrainServices", request, len(names) * (wait_s + 30) + 30)
        return {name: DrainResult(r.num_inflight, r.drained) for name, r in reply.drained.items()}

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        t0 = time.perf_counter()
        r = self._call("SwitchWorker", cpb.SwitchWorkerRequest(name=name, role=role, timeout_s=timeout_s),
                       timeout_s + 10)
        return SwitchResult(r.previous_role, r.role, r.num_inflight, r.switch_ms, (time.perf_counter() - t0) * 1000)

    def services(self) -> list[ServiceInfo]:
        return [service_from_pb(s) for s in self._call("ListServices", cpb.ListServicesRequest(), 30).services]


async def read_launchers(cfg: ClusterConfig) -> list[cpb.LauncherInfo]:
    """The launchers registered in ``cfg``'s etcd namespace, oldest first."""
    async with ControlPlane.from_config(cfg) as plane:
        found = await plane.get_messages(keys.launchers_prefix(cfg.namespace), cpb.LauncherInfo)
    return sorted(found.values(), key=lambda i: i.started_at_unix_ms)


def find_launcher(cfg: ClusterConfig) -> RemoteLauncher | None:
    """The launcher of the cluster on ``cfg``'s etcd (``tandem serve``'s), with the cluster's mode
    in its config; None when none is registered (a Ray deployment: its controller launches);
    ValueError when several are (two clusters in one namespace)."""
    import dataclasses

    found = asyncio.run(read_launchers(cfg))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{len(found)} launchers registered in namespace {cfg.namespace!r}: "
                          + ", ".join(f"{i.launcher_id} (pid {i.pid})" for i in found))
    info = found[0]
    return RemoteLauncher(info.endpoint, dataclasses.replace(cfg, mode=info.mode))
