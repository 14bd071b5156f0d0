"""The Ray launcher: every tandem service (etcd, routers, prefill and decode workers, planner) a
detached, named Ray actor of the Ray namespace ``tandem``, named ``{namespace}.{service}``.

Placement. A worker reserves ``cfg.gpus_per_worker`` GPUs (its tensor-parallel size on cuda;
logical GPUs also work on CPU machines) in a placement group of one bundle, so all of them are
on one node and stay reserved while the actor restarts; a worker without GPUs is a plain CPU
actor. A deployment that cannot fit the cluster fails before anything starts, with the reason;
one whose GPUs are taken fails after ``placement_timeout_s``. etcd, unless the config names
endpoints, runs on the head node.

One actor, one process. A :class:`ServiceActor` runs its service as a child process
(``python -m decode_worker --config ...``, the very command the local launcher runs) rather
than the service's asyncio main in a thread of the actor, because:

- a restart is a fresh process: the engine, CUDA context, gRPC server, Prometheus registry and
  etcd lease of the dead incarnation cannot leak into the next;
- clean shutdown is the service's own: SIGTERM runs its graceful path (deregister, finish,
  close), which a thread cannot be given (signals go to the main thread);
- the child is bound to its actor both ways: it gets PR_SET_PDEATHSIG (armed from a thread
  that outlives it), so a killed actor takes its service along; and an actor whose service
  dies on its own exits, so Ray restarts it (``max_restarts = worker_restarts``) and the new
  incarnation starts a new service, which registers in etcd under a new worker id.

Draining a worker (:meth:`ServiceActor.drain`) calls its Drain RPC (stop admitting,
deregister, wait for in-flight requests), then stops the process; only then is the actor
killed and its GPUs released. The launcher keeps no state of its own: the deployment is the
set of named actors, so any process connected to the cluster can attach to it.

The warm pool (``warm_pool``, as the local launcher's; see :mod:`deploy.launcher`). A drained
worker whose pool has room parks instead (:meth:`ServiceActor.drain` with ``park``): its process
stays, its engine gives its device memory back, the actor reports PARKED with the time it parked
(the pool is the set of PARKED actors, so any launcher attached sees it). A start takes the
longest-parked actor first (:meth:`ServiceActor.unpark`: ``SwitchRole`` to the tier, same process
and actor), and creates a new actor only when none is parked or the parked one cannot come back
(then that actor is killed and its placement group removed). Ray's reservation: a live actor
cannot give back its ``num_gpus`` nor its placement group's bundle, so **a parked worker keeps its
GPUs and CPUs reserved in Ray**. That reservation is never idle while a start wants one: every
start that needs a worker takes a parked one before Ray is asked for a new bundle, and
:meth:`RayLauncher.free_gpus` and :meth:`RayLauncher.check_capacity` count the pool's GPUs as
free for this deployment's starts. To other Ray jobs and deployments they are taken: a job that
needs them waits in Ray's queue (or fails its own placement timeout) until the pool shrinks;
draining a parked worker (``drain_services([name])``) stops it and frees its GPUs, ``warm_pool:
0`` keeps none, and ``tandem deploy down`` stops the parked with the rest. A parked worker whose
service process dies does not come back (the actor stays, reports DEAD, and the next start
removes it); if Ray restarts a parked actor, the new incarnation asks the controller, which
records the pool (:meth:`deploy.controller.DeploymentController.recorded_role` answers
``parked``), and starts no service either: a pool member that died is replaced by a fresh start,
never by a worker that registers in a tier nobody asked for. (A launcher used without a
controller has no record: such a restarted actor comes back in its spec's tier.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deploy.launcher import (
    WORKER_ROLES,
    DeployError,
    DrainResult,
    Launcher,
    ServiceInfo,
    ServiceState,
    SwitchResult,
    drain_worker,
    gpu_shortfall,
    park_drained,
    stop_process,
    switch_worker,
    wait_router_serves,
    wait_routers_list,
    wake_parked,
    warm_pool_size,
)
from runtime import spawn
from runtime.etcd_server import free_port as _free_port
from runtime.internal_grpc import PLAINTEXT, InternalGrpc
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.ray_launcher")

RAY_NAMESPACE = "tandem"
HEAD_NODE = "node:__internal_head__"  # a resource only the head node has
_READY = "TANDEM_READY "
_ETCD_READ_LOCK = threading.Lock()
_ROUTER_CPUS = 1.0
# Workers serve either tier and switch in place (SwitchRole): both start as deploy.switchable_worker.
# The planner acts through the deployment's controller: deploy.planner_service (the planner package
# sits below deploy and cannot reach a launcher).
_MODULES = {"router": "router", "prefill": "deploy.switchable_worker", "decode": "deploy.switchable_worker",
            "planner": "deploy.planner_service", "etcd": "runtime.etcd_server"}
CONTROLLER = "controller"  # the deployment controller's service name (deploy.controller)
PARKED = str(ServiceState.PARKED)  # what the controller records for a parked worker actor (not a tier)


def actor_name(namespace: str, service: str) -> str:
    return f"{namespace}.{service}"


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What one actor runs: ``python -m {module} {args}``, with ``config`` (a ClusterConfig as a
    dict) written to a file and passed as ``--config``. ``host: auto`` binds the actor's node address."""

    name: str  # "decode-1": unique in the deployment
    role: str
    namespace: str
    config: dict[str, Any] | None = None
    args: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return _MODULES[self.role]


class ServiceActor:
    """Owns one service process on its node; see the module docstring. Threaded (``info`` and
    ``drain`` answer while ``wait_ready`` waits)."""

    def __init__(self, spec: ServiceSpec) -> None:
        ctx = ray.get_runtime_context()
        self.spec = spec
        self.actor_id = ctx.get_actor_id()
        self.restarted = ctx.was_current_actor_reconstructed
        # A worker's tier now: a switch changes it, and a restart comes back in the tier the
        # controller recorded for this actor (the last switch), else in spec.role.
        recorded = self.restarted and _recorded_role(spec, self.actor_id)
        self.role = recorded if recorded in WORKER_ROLES else spec.role
        self.parked_since = 0.0  # parked (the warm pool): when; kept if its service dies parked
        self.node = ray.util.get_node_ip_address()
        self.gpus = tuple(str(g) for g in ray.get_gpu_ids())
        self.incarnation = uuid.uuid4().hex[:6]
        self.state = ServiceState.STARTING
        self.ready_info: dict[str, Any] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exit_code: int | None = None
        self._stopping = False
        self._ready = threading.Event()
        self._spawned = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix=f"tandem-{actor_name(spec.namespace, spec.name)}-"))
        if recorded == PARKED:
            # Ray restarted a parked actor: a pool member lost, not a worker to bring back into a tier.
            # It starts nothing and says so; the next start removes it and starts a fresh worker.
            self.state, self.parked_since = ServiceState.DEAD, time.time()
            self.tail.append(f"tandem: {spec.name} was parked when its actor died; it does not start again")
            print(self.tail[-1], flush=True)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._ready.set()
            return
        self._argv = self._command()
        # The supervisor thread spawns the child and lives until it exits: PDEATHSIG is tied to it.
        threading.Thread(target=self._supervise, name=f"supervise-{spec.name}", daemon=True).start()
        self._spawned.wait(60)

    # ---- remote methods ---------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """The service's TANDEM_READY info once it serves; raises if it exits or times out first."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self.spec.name} did not become ready in {timeout_s:.0f} s; last output:\n"
                               + "\n".join(list(self.tail)[-15:]))
        if self.ready_info is None:
            raise RuntimeError(f"{self.spec.name} exited with code {self.exit_code} before it was ready; "
                               "last output:\n" + "\n".join(list(self.tail)[-25:]))
        return self.ready_info

    def info(self) -> dict[str, Any]:
        ready = self.ready_info or {}
        return {"name": self.spec.name, "role": self.role, "state": str(self.state), "node": self.node,
                "gpus": self.gpus, "pid": self._proc.pid if self._proc else 0,
                "endpoint": ready.get("endpoint") or ready.get("http", ""), "worker_id": ready.get("worker_id", ""),
                "ready": ready, "restarted": self.restarted, "parked_since": self.parked_since}

    def log_tail(self) -> list[str]:
        return list(self.tail)

    def _internal(self) -> InternalGrpc:
        """The cluster's internal gRPC, as the service's config says (its files on this node)."""
        return InternalGrpc.from_config(ClusterConfig(**self.spec.config)) if self.spec.config else PLAINTEXT

    def switch(self, role: str, timeout_s: float = 30.0) -> SwitchResult:
        """Move the worker to the other tier in place (see :func:`deploy.launcher.switch_worker`)."""
        endpoint = (self.ready_info or {}).get("endpoint")
        if self.spec.role not in WORKER_ROLES or not endpoint:
            raise DeployError(f"{self.spec.name} is not a serving worker")
        result = switch_worker(endpoint, role, self._internal(), timeout_s)
        self.role = role
        return result

    def drain(self, wait_s: float, park: bool = False) -> DrainResult:
        """Drain a worker (see :func:`deploy.launcher.drain_worker`), then stop the process; with
        ``park``, park it instead if it drained whole and can park (state PARKED, the process stays).
        A parked worker drained is stopped."""
        endpoint = (self.ready_info or {}).get("endpoint") or ""
        alive = self._proc is not None and self._proc.poll() is None
        if self.state is ServiceState.PARKED or not alive or self.spec.role not in WORKER_ROLES or not endpoint:
            self.stop()
            return DrainResult(0, True)
        self.state = ServiceState.DRAINING
        drained = drain_worker(endpoint, wait_s, self._internal())
        if park and park_drained(endpoint, self.role, drained, self._internal()):
            self.parked_since = time.time()
            self.state = ServiceState.PARKED
            return drained
        self.stop()
        return drained

    def unpark(self, role: str, timeout_s: float = 30.0) -> SwitchResult | None:
        """Take the parked worker back into ``role`` (see :func:`deploy.launcher.wake_parked`); None
        when it cannot come back (not parked, its service gone, it refuses)."""
        endpoint = (self.ready_info or {}).get("endpoint")
        if self.state is not ServiceState.PARKED or not endpoint:
            return None
        result = wake_parked(endpoint, role, self._internal(), timeout_s)
        if result is not None:
            self.role, self.state, self.parked_since = role, ServiceState.SERVING, 0.0
        return result

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the service (its graceful shutdown), SIGKILL after ``timeout_s``."""
        self._stopping = True
        if self._proc is not None:
            self.exit_code = stop_process(self._proc, timeout_s)
        self.state = ServiceState.STOPPED
        shutil.rmtree(self._tmp, ignore_errors=True)
        return self.exit_code

    # ---- the child -------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        spec = self.spec
        argv = [sys.executable, "-m", spec.module, *(("--role", self.role) if spec.role in WORKER_ROLES else ()),
                *spec.args]
        if spec.config is not None:
            config = dict(spec.config)
            if config.get("host") == "auto":
                config["host"] = self.node
            path = self._tmp / "config.json"
            path.write_text(json.dumps(config))
            argv += ["--config", str(path)]
        if spec.role in WORKER_ROLES:
            argv += ["--worker-id", f"{spec.name}-{self.incarnation}"]
        if spec.role == "etcd":
            argv += ["--name", spec.namespace]
        return argv

    def _supervise(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TANDEM_DEPLOYMENT=self.spec.namespace)
        try:
            self._proc = spawn.popen(self._argv, die_with_parent=signal.SIGTERM, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        except OSError as e:
            self.tail.append(f"cannot start {self._argv}: {e}")
            self.state = ServiceState.DEAD
            self._ready.set()
            return
        finally:
            self._spawned.set()
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_READY):
                self.ready_info = json.loads(line[len(_READY):])
                self.state = ServiceState.SERVING
                shutil.rmtree(self._tmp, ignore_errors=True)  # its config is read: nothing stays behind a kill
                self._ready.set()
                continue
            self.tail.append(line.rstrip())
            sys.stdout.write(line)  # the actor's Ray log
            sys.stdout.flush()
        self.exit_code = self._proc.wait()
        self._ready.set()
        if self._stopping:
            return
        parked, self.state = self.state is ServiceState.PARKED, ServiceState.DEAD
        if parked:  # a pool member lost: the actor stays (no restart), the next start replaces it
            print(f"tandem: {self.spec.name} exited with code {self.exit_code} while parked", flush=True)
            return
        if self.ready_info is not None or self.restarted:
            # It died on its own: so does the actor, and Ray restarts it (up to max_restarts). A first
            # start that fails stays dead, for wait_ready to report the reason instead of a restart loop.
            print(f"tandem: {self.spec.name} exited with code {self.exit_code}; restarting the actor", flush=True)
            shutil.rmtree(self._tmp, ignore_errors=True)
            os._exit(1)


def _recorded_role(spec: ServiceSpec, actor_id: str) -> str | None:
    """The tier the deployment's controller recorded for this worker actor (its last switch or
    wake), ``parked`` (:data:`PARKED`) for a parked one, or None."""
    if spec.role not in WORKER_ROLES:
        return None
    try:
        controller = ray.get_actor(actor_name(spec.namespace, CONTROLLER), namespace=RAY_NAMESPACE)
        return ray.get(controller.recorded_role.remote(spec.name, actor_id), timeout=30)
    except Exception as e:  # no controller (a launcher used directly): the spec's tier
        print(f"tandem: {spec.name}: no recorded tier ({e!r}); starting as {spec.role}", flush=True)
        return None


_ServiceActor = ray.remote(ServiceActor)


# ---- the launcher ---------------------------------------------------------------------------------
def _gcs_actor(handle: Any) -> dict[str, Any]:
    """The GCS's record of an actor: State (ALIVE, RESTARTING, PENDING_CREATION, DEAD...),
    NumRestarts, Address.IPAddress."""
    try:
        from ray._private import state

        return state.actors(handle._actor_id.hex()) or {}
    except Exception:  # an internal API: report what we can without it
        return {}


def _node_resources() -> dict[str, dict[str, float]]:
    """Per live node (by address; a second node on one address gets a suffix): its resources."""
    out: dict[str, dict[str, float]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        key = node["NodeManagerAddress"]
        while key in out:
            key += "'"
        out[key] = dict(node.get("Resources", {}))
    return out


class RayLauncher(Launcher):
    """A deployment on the Ray cluster this process is connected to (``ray.init`` first)."""

    def __init__(self, cfg: ClusterConfig, warm_pool: int | None = None) -> None:
        """``warm_pool`` (None: the config's): at most this many drained workers are parked, not
        stopped; see the module docstring."""
        if not ray.is_initialized():
            raise RuntimeError("connect to the Ray cluster first (ray.init)")
        self.cfg = cfg
        self.ns = cfg.namespace
        self.warm_pool = warm_pool_size(cfg, warm_pool)
        self.wake_ms: list[float] = []  # per start a parked worker served (by this launcher): the worker's ms

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout_s: float = 600.0) -> RayLauncher:
        """Start what is missing of the deployment the config describes (so it is idempotent:
        after a controller restart it adopts what runs)."""
        cfg = self.cfg
        num_prefill = cfg.num_prefill if cfg.mode == "disaggregated" else 0
        want = {"router": cfg.num_routers, "prefill": num_prefill, "decode": cfg.num_decode,
                "planner": int(cfg.planner)}
        have = collections.Counter(s.role for s in self._live() if s.state is not ServiceState.PARKED)
        roles = [role for role, n in want.items() for _ in range(n - have[role])]
        self.check_capacity(roles)
        try:
            self._ensure_etcd(timeout_s)
            # The planner last, once the workers serve: its first tick sees the deployment.
            t0 = time.monotonic()
            self.start_services([r for r in roles if r != "planner"], timeout_s, cleanup_all=True)
            if "planner" in roles:
                self.start_services(["planner"], max(60.0, timeout_s - (time.monotonic() - t0)), cleanup_all=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every actor of the deployment (their services get SIGTERM) and remove its placement groups."""
        handles = self._handles()
        refs = [h.stop.remote() for name, h in handles.items() if name != "etcd"]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=20)
        if "etcd" in handles:  # last: the others deregister on their way out
            with contextlib.suppress(Exception):
                ray.get(handles["etcd"].stop.remote(), timeout=20)
        for name, handle in handles.items():
            self._release(name, handle)
        self._remove_placement_groups()

    def start_services(self, roles: Sequence[str], timeout_s: float = 600.0, *,
                       cleanup_all: bool = False) -> list[ServiceInfo]:
        """Start one service per role, all at once; wait until they serve and every router lists
        every worker. A worker is a parked one taken back where the pool has one (:meth:`_wake`),
        else a new actor. On failure the ones started here are stopped (or, with ``cleanup_all``,
        the caller cleans up) and a DeployError says why."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        roles = list(roles)
        woken = self._wake([r for r in roles if r in WORKER_ROLES])
        for role in woken.values():
            roles.remove(role)
        specs = self._specs(roles)
        started: dict[str, Any] = {}
        try:
            groups = self._reserve([s for s in specs if s.role in WORKER_ROLES])
            if groups:
                log.info("%s: placed %d worker(s) in %.1f s", self.ns, len(groups), time.monotonic() - t0)
            for spec in specs:
                started[spec.name] = self._create(spec, groups.get(spec.name))
            self._wait_ready(started, deadline)
            log.info("%s: %s serving after %.1f s", self.ns, ", ".join(started), time.monotonic() - t0)
            serving = collections.Counter(s.role for s in self.services(with_etcd=False)
                                          if s.state is ServiceState.SERVING)
            wait_routers_list(self.router_urls(), deadline - time.monotonic(),
                              at_least={role: serving[role] for role in WORKER_ROLES})
            if serving["decode"] and (self.cfg.mode == "aggregated" or serving["prefill"]):
                for url in self.router_urls():  # the model is listed (its tokenizer loaded): no 503 window
                    wait_router_serves(url, deadline - time.monotonic())
        except BaseException:
            if not cleanup_all:
                for name, handle in started.items():
                    self._release(name, handle)
                for spec in specs:
                    self._remove_placement_group(spec.name)
            raise
        return [s for s in self.services() if s.name in started or s.name in woken]

    def _wake(self, roles: Sequence[str], timeout_s: float = 30.0) -> dict[str, str]:
        """Serve what starts of ``roles`` the warm pool can: each from the longest-parked worker
        (:meth:`ServiceActor.unpark`); one that cannot come back is killed, and its placement group
        removed, as are pool members that died. The woken workers' names -> their new tier."""
        if not roles:
            return {}
        handles = self._handles()
        pool = [s for s in self.services(with_etcd=False) if s.role in WORKER_ROLES and s.parked_since]
        for s in pool:
            if s.state is not ServiceState.PARKED and s.name in handles:  # died parked: its GPUs back to Ray
                log.info("%s: %s died parked (%s); removing it", self.ns, s.name, s.state)
                self._release(s.name, handles[s.name])
        parked = sorted((s for s in pool if s.state is ServiceState.PARKED), key=lambda s: (s.parked_since, s.name))
        woken: dict[str, str] = {}
        for role in roles:
            while parked:
                s = parked.pop(0)
                result, handle = None, handles.get(s.name)
                with contextlib.suppress(Exception):  # the actor is gone: as a worker that cannot come back
                    result = ray.get(handle.unpark.remote(role, timeout_s), timeout=timeout_s + 30)
                if result is not None:
                    log.info("%s: %s back from the warm pool as %s in %.0f ms", self.ns, s.name, role,
                             result.switch_ms)
                    self.wake_ms.append(result.switch_ms)
                    woken[s.name] = role
                    break
                log.warning("%s: parked %s cannot come back; a new worker instead", self.ns, s.name)
                if handle is not None:
                    self._release(s.name, handle)
            else:
                break
        return woken

    def drain_services(self, names: Sequence[str], timeout_s: float | None = None, *,
                       park: bool = True) -> dict[str, DrainResult]:
        """Drain the named workers (at once) and stop them, or, while the warm pool has room, park
        them (the first names first; ``park=False``: none); a parked worker named here is stopped."""
        wait_s = self.cfg.drain_timeout_s if timeout_s is None else timeout_s
        handles = self._handles()
        live = self._live()
        remaining = collections.Counter(s.role for s in live if s.role in WORKER_ROLES and s.name not in names
                                        and s.state is not ServiceState.PARKED)
        room = self.warm_pool - sum(s.state is ServiceState.PARKED and s.name not in names for s in live) if park else 0
        parkable = {s.name for s in live if s.role in WORKER_ROLES and s.state is not ServiceState.PARKED}
        to_park = [name for name in names if name in parkable][:max(room, 0)]
        refs = {handles[name].drain.remote(wait_s, name in to_park): name for name in names if name in handles}
        result = {name: DrainResult(0, False) for name in names}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s + 30)
        for ref in done:
            with contextlib.suppress(Exception):  # an actor that died meanwhile drained nothing
                result[refs[ref]] = ray.get(ref)
        parked = {s.name for s in self.services(with_etcd=False) if s.state is ServiceState.PARKED and to_park}
        for name in names:
            if name in handles and name not in parked:
                self._release(name, handles[name])
        if any(name.partition("-")[0] in WORKER_ROLES for name in names):
            wait_routers_list(self.router_urls(), 30.0, at_most={role: remaining[role] for role in WORKER_ROLES})
        return result

    def down(self) -> dict[str, DrainResult]:
        """Drain every worker, then stop the routers, the planner and etcd; nothing is left."""
        workers = [s.name for s in self._live() if s.role in WORKER_ROLES and s.state is not ServiceState.PARKED]
        drained = self.drain_services(workers, park=False) if workers else {}
        self.stop()  # the parked too
        return drained

    # ---- queries ----------------------------------------------------------------------------------
    def services(self, with_etcd: bool = True) -> list[ServiceInfo]:
        """Every service of the deployment; ``with_etcd`` adds each worker's registration and load."""
        handles = self._handles()
        refs = {name: h.info.remote() for name, h in handles.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=3.0)
        registered = _registrations(self.cfg, self.etcd_endpoints(handles)) if with_etcd else None
        out = []
        for name, handle in handles.items():
            gcs = _gcs_actor(handle)
            info: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                info = ray.get(refs[name], timeout=0.01)
            gcs_state = gcs.get("State", "")
            if gcs_state == "ALIVE" and info:
                state = ServiceState(info["state"])
            elif gcs_state == "DEAD":
                state = ServiceState.DEAD
            elif gcs.get("NumRestarts", 0) or gcs_state == "RESTARTING":
                state = ServiceState.RESTARTING
            else:
                state = ServiceState.STARTING
            worker_id = info.get("worker_id", "")
            role = info.get("role") or (name.rpartition("-")[0] if "-" in name else name)
            out.append(ServiceInfo(
                name=name, role=role, state=state, node=info.get("node") or gcs.get("Address", {}).get("IPAddress", ""),
                pid=info.get("pid", 0), gpus=tuple(info.get("gpus", ())), endpoint=info.get("endpoint", ""),
                worker_id=worker_id, num_restarts=int(gcs.get("NumRestarts", 0)), actor_id=handle._actor_id.hex(),
                registered=(worker_id in registered) if role in WORKER_ROLES and registered is not None else None,
                num_requests=(registered or {}).get(worker_id, 0), parked_since=float(info.get("parked_since", 0.0))))
        return sorted(out, key=lambda s: (list(_MODULES).index(s.role), s.index))

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        handle = self._handles().get(name)
        if handle is None:
            raise DeployError(f"no service {name!r} in namespace {self.ns!r}")
        result = ray.get(handle.switch.remote(role, timeout_s), timeout=timeout_s + 10)
        remaining = collections.Counter(s.role for s in self._live() if s.role in WORKER_ROLES
                                        and s.state is not ServiceState.PARKED)
        wait_routers_list(self.router_urls(), 30.0, at_least={r: remaining[r] for r in WORKER_ROLES})
        return result

    def router_urls(self) -> list[str]:
        return [s.endpoint for s in self.services(with_etcd=False) if s.role == "router" and s.endpoint]

    def etcd_endpoints(self, handles: dict[str, Any] | None = None) -> tuple[str, ...]:
        if self.cfg.etcd_endpoints:
            return self.cfg.etcd_endpoints
        etcd = (handles if handles is not None else self._handles()).get("etcd")
        if etcd is None:
            return ()
        with contextlib.suppress(Exception):
            return (ray.get(etcd.wait_ready.remote(30.0), timeout=35)["endpoint"],)
        return ()

    def free_gpus(self) -> float:
        """GPUs free for this deployment's new workers: Ray's free ones and the warm pool's (a start
        takes a parked worker, whose reservation it holds, before it asks Ray for one)."""
        pool = [s for s in self.services(with_etcd=False) if s.role in WORKER_ROLES and s.parked_since
                and s.state in (ServiceState.PARKED, ServiceState.DEAD)]
        return float(ray.available_resources().get("GPU", 0.0)) + len(pool) * max(self.cfg.gpus_per_worker, 0.0)

    def check_capacity(self, roles: Sequence[str], released: Sequence[str] = ()) -> None:
        """Fail at once, saying why, when the cluster cannot hold these new services at all (GPUs
        that other jobs hold are found later: placement waits ``placement_timeout_s`` for them).
        The first new workers are parked ones taken back: they need nothing more."""
        nodes = _node_resources()
        live = [s for s in self._live() if s.name not in released]
        woken = {s.name for s in sorted((s for s in live if s.state is ServiceState.PARKED),
                                        key=lambda s: s.parked_since)[:sum(1 for r in roles if r in WORKER_ROLES)]}
        roles = list(roles)
        for _ in woken:
            roles.remove(next(r for r in roles if r in WORKER_ROLES))
        num_workers = sum(1 for r in roles if r in WORKER_ROLES)
        free = {node: res.get("GPU", 0.0) for node, res in nodes.items()}
        staying = [s for s in live if s.name not in woken]
        for s in staying:  # what our other running workers hold is not free for new ones
            if s.role in WORKER_ROLES:
                for node in free:
                    if node.rstrip("'") == s.node and free[node] >= self.cfg.gpus_per_worker:
                        free[node] -= self.cfg.gpus_per_worker
                        break
        why = gpu_shortfall(self.cfg.gpus_per_worker, num_workers, free)
        if why:
            raise DeployError(f"not enough GPUs for namespace {self.ns!r}: {why}. Ask for fewer workers or GPUs per "
                              "worker (num_prefill, num_decode, tensor_parallel_size, num_gpus_per_worker), or add "
                              "GPU nodes.")
        need_cpus = sum(self._cpus(r) for r in roles)
        have_cpus = sum(res.get("CPU", 0.0) for res in nodes.values())
        held_cpus = sum(self._cpus(s.role) for s in staying)
        if need_cpus > have_cpus - held_cpus + 1e-9:
            raise DeployError(f"not enough CPUs for namespace {self.ns!r}: the new services need {need_cpus:g} CPUs, "
                              f"the cluster has {have_cpus:g} and this deployment holds {held_cpus:g} of them; lower "
                              "num_cpus_per_worker or add nodes.")

    # ---- internals --------------------------------------------------------------------------------
    def _handles(self) -> dict[str, Any]:
        """The deployment's actors by service name."""
        prefix = actor_name(self.ns, "")
        out = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != RAY_NAMESPACE or not entry["name"].startswith(prefix):
                continue
            service = entry["name"][len(prefix):]
            if service.partition("-")[0] not in _MODULES:
                continue  # the controller, or someone else's
            with contextlib.suppress(ValueError):
                out[service] = ray.get_actor(entry["name"], namespace=RAY_NAMESPACE)
        return out

    def _live(self) -> list[ServiceInfo]:
        return [s for s in self.services(with_etcd=False) if s.state not in (ServiceState.STOPPED, ServiceState.DEAD)]

    def _specs(self, roles: Sequence[str]) -> list[ServiceSpec]:
        """Names (the next free index per role) and child configs of new services."""
        taken = set(self._handles())
        next_index = collections.Counter()
        cfg = self.cfg
        endpoints = self.etcd_endpoints()
        specs = []
        for role in roles:
            while f"{role}-{next_index[role]}" in taken:
                next_index[role] += 1
            name = f"{role}-{next_index[role]}"
            taken.add(name)
            overrides: dict[str, Any] = {"etcd_endpoints": endpoints, "metrics_port": 0}
            if role == "router":  # replica i on port + i: replicas may share a node
                i = next_index[role]
                overrides |= {"port": cfg.port + i if cfg.port else 0, "grpc_port": cfg.grpc_port + i if cfg.grpc_port
                              else 0}
            if role == "planner":  # it reaches the controller through Ray
                overrides["ray_address"] = ray.get_runtime_context().gcs_address
            if role in WORKER_ROLES and cfg.threads == 0 and cfg.device == "cpu":
                overrides["threads"] = max(1, int(cfg.num_cpus_per_worker))  # the cores Ray gave it
            config = dataclasses.asdict(dataclasses.replace(cfg, **overrides))
            specs.append(ServiceSpec(name, role, self.ns, config))
        return specs

    def _cpus(self, role: str) -> float:
        return self.cfg.num_cpus_per_worker if role in WORKER_ROLES else _ROUTER_CPUS if role == "router" else 0.0

    def _runtime_env(self) -> dict[str, Any]:
        env = self.cfg.worker_env_vars
        if self.cfg.host.startswith("127.") or self.cfg.host == "localhost":
            env.setdefault("UCX_NET_DEVICES", "lo")  # UCX listens where the cluster does
        return {"env_vars": env} if env else {}

    def _reserve(self, specs: Sequence[ServiceSpec]) -> dict[str, Any]:
        """A one-bundle placement group per worker: its GPUs (if any) and CPUs on one node, kept
        while it restarts. Waits for all at most ``placement_timeout_s``: a worker that Ray cannot
        place fails here, not after a silent wait."""
        gpus, cpus = self.cfg.gpus_per_worker, self.cfg.num_cpus_per_worker
        bundle = {k: v for k, v in (("GPU", gpus), ("CPU", cpus)) if v > 0}
        if not bundle:
            return {}
        groups = {s.name: ray.util.placement_group([bundle], strategy="STRICT_PACK",
                                                   name=actor_name(self.ns, s.name), lifetime="detached")
                  for s in specs}
        _, pending = ray.wait([g.ready() for g in groups.values()], num_returns=len(groups),
                              timeout=self.cfg.placement_timeout_s)
        if pending:
            free = ray.available_resources()
            for name in groups:
                self._remove_placement_group(name)
            raise DeployError(f"Ray could not place {len(pending)} of {len(groups)} new workers (each {bundle}) in "
                              f"{self.cfg.placement_timeout_s:g} s: free now are {free.get('GPU', 0):g} GPUs and "
                              f"{free.get('CPU', 0):g} CPUs (this or other deployments and jobs hold the rest); "
                              "free some or ask for less.")
        return groups

    def _create(self, spec: ServiceSpec, group: Any | None) -> Any:
        options: dict[str, Any] = dict(name=actor_name(self.ns, spec.name), namespace=RAY_NAMESPACE,
                                       lifetime="detached", max_restarts=self.cfg.worker_restarts, max_task_retries=0,
                                       max_concurrency=4, num_cpus=self._cpus(spec.role), num_gpus=0,
                                       runtime_env=self._runtime_env() or None)
        if group is not None:
            options |= dict(num_gpus=max(self.cfg.gpus_per_worker, 0.0), scheduling_strategy=
                            PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0))
        if spec.role == "etcd":
            options |= dict(resources={HEAD_NODE: 0.001})
        return _ServiceActor.options(**options).remote(spec)

    def _wait_ready(self, started: dict[str, Any], deadline: float) -> None:
        """Until every new actor's service serves; one that exits fails at once, with its last output."""
        refs = {h.wait_ready.remote(max(1.0, deadline - time.monotonic())): name for name, h in started.items()}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # the actor's own error carries the service's output
                    cause = getattr(e, "cause", None) or e
                    raise DeployError(f"{refs[ref]} failed to start: {cause}") from None
            if pending and time.monotonic() > deadline:
                late = {refs[r]: _gcs_actor(started[refs[r]]).get("State", "?") for r in pending}
                raise DeployError(f"not ready in time: {', '.join(f'{n} (actor {st})' for n, st in late.items())}")

    def _ensure_etcd(self, timeout_s: float) -> None:
        if self.cfg.etcd_endpoints or "etcd" in self._handles():
            return
        head = next((n for n, res in _node_resources().items() if HEAD_NODE in res), self.cfg.host).rstrip("'")
        host = head if self.cfg.host == "auto" else self.cfg.host
        # A fixed port, so that a restarted etcd actor comes back where the services look for it:
        # a free one where this process runs on the head node, etcd's usual one otherwise.
        try:
            port = _free_port(host)
        except OSError:
            port = 2379
        # With the config, etcd serves as the services connect: TLS and a user if the etcd_* settings say so.
        spec = ServiceSpec("etcd", "etcd", self.ns, dataclasses.asdict(self.cfg), ("--host", host, "--port", str(port)))
        t0 = time.monotonic()
        handle = self._create(spec, None)
        self._wait_ready({"etcd": handle}, t0 + min(timeout_s, 120.0))
        log.info("%s: etcd serving on %s:%d after %.1f s", self.ns, host, port, time.monotonic() - t0)

    def _release(self, name: str, handle: Any) -> None:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
        self._remove_placement_group(name)

    def _remove_placement_group(self, name: str) -> None:
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(ray.util.get_placement_group(actor_name(self.ns, name)))

    def _remove_placement_groups(self) -> None:
        prefix = actor_name(self.ns, "")
        for group in ray.util.placement_group_table().values():
            if group.get("name", "").startswith(prefix) and group.get("state") != "REMOVED":
                with contextlib.suppress(Exception):
                    ray.util.remove_placement_group(ray.util.get_placement_group(group["name"]))


def _registrations(cfg: ClusterConfig, endpoints: tuple[str, ...]) -> dict[str, int] | None:
    """Registered workers (both tiers) -> their running + waiting requests, from etcd; None if
    etcd cannot be read."""
    if not endpoints:
        return None

    async def read() -> dict[str, int]:
        from runtime import keys
        from runtime.discovery import list_workers
        from runtime.etcd import ControlPlane
        from runtime.pb import tandem_worker_pb2 as pb

        plane = ControlPlane.from_config(dataclasses.replace(cfg, etcd_endpoints=endpoints))
        await asyncio.wait_for(plane.connect(), 5.0)
        try:
            out: dict[str, int] = {}
            for role in WORKER_ROLES:
                loads = await plane.get_messages(keys.metrics_prefix(plane.namespace, role), pb.Load)
                for worker_id in await list_workers(plane, role):
                    load = loads.get(worker_id)
                    out[worker_id] = (load.num_running + load.num_waiting + load.num_pulling) if load else 0
            return out
        finally:
            await plane.close()

    try:
        with _ETCD_READ_LOCK:  # one event loop (and gRPC aio client) at a time in this process
            return asyncio.run(read())
    except Exception:
        return None
