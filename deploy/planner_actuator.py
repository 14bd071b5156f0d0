"""The planner's hands: its actions carried out through a :class:`deploy.launcher.Launcher`, and
the planner run next to a cluster.

- START: ``launcher.start_services([role])`` on the actuator's one long-lived spawner thread (a
  local worker is asked to die with the thread that spawned it); the new worker shows as
  STARTING under a placeholder id until it registers.
- DRAIN: ``launcher.drain_services([name])``: the worker deregisters, finishes its in-flight
  requests (up to ``drain_timeout_s``), then stops; DRAINING until it is gone.
- SWITCH: ``launcher.switch_worker(name, role)``: ``SwitchRole`` on the worker, same process.
- ABANDON: a start that never became ready is forgotten here (the launcher's own timeout ends it).

Every action happens off the planner's event loop; the planner sees its progress through
:meth:`LaunchActuator.transitions` and etcd. Failures are logged and the state cleared: the next
ticks see the cluster as it is and decide again.

:class:`PlannerRunner` runs a :class:`planner.service.PlannerService` on its own thread and event
loop: what ``tandem serve`` starts next to its cluster, and ``tandem planner`` in the foreground.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from deploy.launcher import (
    WORKER_ROLES,
    DeployError,
    DrainResult,
    Launcher,
    ServiceInfo,
    ServiceState,
    SwitchResult,
)
from planner.decision import Action, ActionKind
from planner.observations import WorkerState
from planner.service import PlannerGauges, PlannerService, planner_config
from planner.view import Transition
from runtime.metrics import MetricsServer, serve_metrics
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.planner")


class _DaemonPool:
    """``num`` daemon threads running submitted calls in order. Not a ThreadPoolExecutor: the
    interpreter joins those at exit, so a planner stopped while a start is in flight would wait
    for it (up to the launcher's start timeout); the launcher finishes that call either way."""

    def __init__(self, num: int, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(num)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self._calls.put(lambda: fn(*args))

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call()


class LaunchActuator:
    def __init__(self, launcher: Launcher, budget: int) -> None:
        self.launcher = launcher
        self.budget = budget
        self._lock = threading.Lock()
        self._starting: dict[str, Transition] = {}
        self._draining: dict[str, Transition] = {}
        self._ids = itertools.count()
        self._spawner = _DaemonPool(1, "planner-spawn")  # its thread lives on
        self._pool = _DaemonPool(4, "planner-act")
        self.switches: list[SwitchResult] = []

    def close(self) -> None:
        self._pool.close()
        self._spawner.close()

    # ---- the planner's Actuator protocol -------------------------------------------------------------
    def transitions(self) -> Mapping[str, Transition]:
        with self._lock:
            return {**self._starting, **self._draining}

    def num_gpus_free(self) -> int | None:
        return None  # the budget is the limit (the launcher says so at start when it is not)

    def num_parked(self) -> int:
        """Workers the launcher keeps parked (its warm pool, ``ServiceState.PARKED``): a start takes one."""
        try:
            return sum(1 for s in self.launcher.services() if s.state is ServiceState.PARKED)
        except Exception as e:  # a remote launcher out of reach: the start-up's horizon, as with no pool
            log.warning("planner: counting parked workers failed: %s", e)
            return 0

    def act(self, actions: tuple[Action, ...]) -> None:
        services = {s.worker_id: s for s in self.launcher.services() if s.worker_id}
        for a in actions:
            if a.kind is ActionKind.START:
                tid = f"starting-{a.role}-{next(self._ids)}"
                with self._lock:
                    self._starting[tid] = Transition(tid, a.role, WorkerState.STARTING, time.monotonic())
                self._spawner.submit(self._start, tid, a.role)
            elif a.kind is ActionKind.ABANDON:
                with self._lock:
                    self._starting.pop(a.worker_id, None)
            elif (service := services.get(a.worker_id)) is None:
                log.warning("planner: %s %s: no such worker running", a.kind.value, a.worker_id)
            elif a.kind is ActionKind.DRAIN:
                with self._lock:
                    self._draining[a.worker_id] = Transition(a.worker_id, a.role, WorkerState.DRAINING,
                                                             time.monotonic())
                self._pool.submit(self._drain, service)
            elif a.kind is ActionKind.SWITCH:
                self._pool.submit(self._switch, service, a.role)

    # ---- on the threads --------------------------------------------------------------------------------
    def _start(self, tid: str, role: str) -> None:
        try:
            live = [s for s in self.launcher.services() if s.role in WORKER_ROLES
                    and s.state in (ServiceState.STARTING, ServiceState.SERVING, ServiceState.DRAINING)]
            if len(live) >= self.budget:
                raise DeployError(f"{len(live)} workers hold the budget of {self.budget}")
            started = self.launcher.start_services([role])
            log.info("planner: started %s", ", ".join(s.name for s in started))
        except Exception as e:
            log.warning("planner: starting a %s worker failed: %s", role, e)
        finally:
            with self._lock:
                self._starting.pop(tid, None)

    def _drain(self, service: ServiceInfo) -> None:
        try:
            result = self.launcher.drain_services([service.name])[service.name]
            log.info("planner: drained %s (%s)", service.name, result)
        except Exception as e:
            log.warning("planner: draining %s failed: %s", service.name, e)
        finally:
            with self._lock:
                self._draining.pop(service.worker_id, None)

    def _switch(self, service: ServiceInfo, role: str) -> None:
        try:
            result = self.launcher.switch_worker(service.name, role)
            self.switches.append(result)
            log.info("planner: switched %s %s -> %s in %.1f ms (%d in flight)", service.name, result.previous_role,
                     role, result.call_ms, result.num_inflight)
        except Exception as e:
            log.warning("planner: switching %s to %s failed: %s", service.name, role, e)


class ControllerLauncher(Launcher):
    """A Ray deployment's controller actor (``deploy.controller``) as a launcher, for the planner:
    each call is a remote call, serialised by the controller with ``tandem deploy`` commands."""

    def __init__(self, controller: object, cfg: ClusterConfig) -> None:
        self.controller, self.cfg = controller, cfg

    def _call(self, method: str, *args: object, timeout_s: float = 900.0) -> object:
        import ray

        return ray.get(getattr(self.controller, method).remote(*args), timeout=timeout_s)

    def start(self, timeout_s: float = 600.0) -> ControllerLauncher:
        raise DeployError("deploy with `tandem deploy ray`; the planner only scales")

    def stop(self) -> None:
        raise DeployError("take it down with `tandem deploy down`")

    def start_services(self, roles: Sequence[str], timeout_s: float = 600.0) -> list[ServiceInfo]:
        return self._call("start_services", list(roles), timeout_s)

    def drain_services(self, names: Sequence[str], timeout_s: float | None = None) -> dict[str, DrainResult]:
        return self._call("drain_services", list(names), timeout_s)

    def switch_worker(self, name: str, role: str, timeout_s: float = 30.0) -> SwitchResult:
        return self._call("switch_worker", name, role, timeout_s, timeout_s=timeout_s + 60)

    def services(self) -> list[ServiceInfo]:
        return self._call("services", timeout_s=60)


class PlannerRunner:
    """A planner service on its own thread and event loop, acting through ``launcher``
    (None with ``dry_run``: decisions are only written)."""

    def __init__(self, cfg: ClusterConfig, launcher: Launcher | None, *, dry_run: bool = False,
                 num_workers: int | None = None) -> None:
        if num_workers is None:
            num_workers = sum(len(launcher.workers(r)) for r in WORKER_ROLES) if launcher else 2
        self.config = planner_config(cfg, num_workers)
        self.actuator = LaunchActuator(launcher, self.config.max_workers) if launcher and not dry_run else None
        self.gauges = PlannerGauges()
        self.service = PlannerService(cfg, self.config, self.actuator, dry_run=dry_run, gauges=self.gauges)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.metrics: MetricsServer | None = None
        self._metrics_at = (cfg.host, cfg.metrics_port)

    @property
    def metrics_url(self) -> str:
        return self.metrics.url if self.metrics is not None else ""

    def _serve_metrics(self) -> None:
        host, port = self._metrics_at
        self.metrics = serve_metrics(self.gauges.registry, port=port, host=host)
        self.service.metrics_url = self.metrics.url

    def start(self) -> PlannerRunner:
        """On a thread of its own, its gauges on a metrics port (``metrics_port``; 0: any free one)."""
        self._serve_metrics()
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)
        self._thread.start()
        self._started.wait(30)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.actuator is not None:
            self.actuator.close()
        if self.metrics is not None:
            self.metrics.stop()

    def run_forever(self) -> None:
        """In the foreground (``tandem planner``), until SIGINT or SIGTERM. The first signal sets
        the service's stop event: the tick in progress ends, the loop stops at its next wait and
        the registration goes (a cancellation thrown into whatever the tick awaits could be lost
        there, and the planner kept acting). A second signal interrupts at once."""
        self._serve_metrics()

        def on_signal(signum: int, frame: object) -> None:
            if self._loop is None or self._stop is None or self._stop.is_set():
                raise KeyboardInterrupt
            self._loop.call_soon_threadsafe(self._stop.set)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.actuator is not None:
                self.actuator.close()
            self.metrics.stop()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self.service.run(self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:
            self.error = e
            if not isinstance(e, KeyboardInterrupt):
                log.exception("planner stopped")
        finally:
            self._started.set()
