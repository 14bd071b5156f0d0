"""The embedded cluster on one machine (``tandem serve``): an etcd server, prefill and decode
workers and a router, each its own process.

Children get the resolved config as a JSON file (``--config``, in a directory only this user
reads), so every process reads the same settings, the etcd TLS files and user included. Each
child is asked to die with its parent (PR_SET_PDEATHSIG), and ``stop()`` terminates them, kills
stragglers, stops etcd and removes the temp dir: nothing is left behind, also on Ctrl-C.

PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits, not the process: launch
a cluster (and add workers to it) from a thread that outlives it, e.g. the main thread.
Several clusters can load their models at once: :meth:`launch` each, then :meth:`wait_ready`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from deploy.launcher import router_health, wait_router_serves
from runtime import spawn
from runtime.etcd_server import EtcdServer
from runtime.settings import AUTO_GPU_MEMORY_FRACTION, ClusterConfig


def engine_threads(cpus: int, num_workers: int) -> int:
    """Engine (torch and kernel) threads per CPU worker: the cores shared between the workers,
    with one left to the router and the workers' gRPC and event-loop threads, which otherwise
    wait for a core behind the engines on every streamed token (on two cores, aggregated: one
    engine thread, as vLLM's CPU server does). bfloat16 results do not depend on it."""
    return max(1, (cpus - 1) // num_workers)


def prefill_threads(cpus: int, num_workers: int) -> int:
    """Engine threads of a step that prefills (``EngineConfig.num_prefill_threads``) while another
    worker has work: the cores shared between the workers, none left over. While it runs, no decode
    of that worker streams a token, so the core its decode steps leave to the token streams is idle
    but for the router (on two cores, aggregated: two threads for a prefill step, one for a decode
    step). While no other worker has work, such a step takes every core (``idle_prefill_threads``,
    through ``cpu_share_dir``: ``engine.cpu_share``)."""
    return max(1, cpus // num_workers)


def gpu_share_per_worker(num_workers: int) -> float:
    """The part of one GPU's memory each of ``num_workers`` workers on it may take (of 0.9 in all)."""
    return math.floor(AUTO_GPU_MEMORY_FRACTION / num_workers * 1000) / 1000


def child_env(cfg: ClusterConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a process the cluster spawns: ``base`` (this process's), then the config's
    ``worker_env``. On the CPU, OpenMP threads sleep at a barrier instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``, unless set): the cluster's processes share the cores, and a
    two-thread prefill step whose second core another process holds spun 4-10x longer than one
    thread takes (one thread burns its time slice at each of ~200 barriers while its partner waits
    for a core); sleeping cost 10-40% of such a step on free cores."""
    env = dict(base, PYTHONUNBUFFERED="1", **cfg.worker_env_vars)
    if cfg.host.startswith("127.") or cfg.host == "localhost":
        env.setdefault("UCX_NET_DEVICES", "lo")  # UCX listens where the cluster does
    if cfg.device == "cpu":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    argv: list[str] = field(default_factory=list)
    role: str = ""  # a worker's tier now (SwitchRole changes it; the name keeps the first), else ""
    ready: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)
    num_restarts: int = 0
    _event: threading.Event = field(default_factory=threading.Event)


class LocalCluster:
    """Start with :meth:`start` (or ``with``); URLs in :attr:`router`; :meth:`stop` cleans up."""

    def __init__(self, cfg: ClusterConfig, num_prefill: int = 1, num_decode: int = 1,
                 log_dir: str | Path | None = None, quiet: bool = False) -> None:
        if cfg.mode == "aggregated":
            num_prefill = 0
        if num_decode < 1 or num_prefill < 0:
            raise ValueError("need at least one decode worker and no negative prefill count")
        self.num_prefill, self.num_decode = num_prefill, num_decode
        if cfg.threads == 0 and cfg.device == "cpu":
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = num_prefill + num_decode
            cfg = dataclasses.replace(cfg, threads=engine_threads(cpus, workers),
                                      prefill_threads=cfg.prefill_threads or prefill_threads(cpus, workers),
                                      idle_prefill_threads=cfg.idle_prefill_threads or cpus)
        if cfg.device.startswith("cuda") and not cfg.gpu_memory_fraction and num_prefill + num_decode > 1:
            # Every worker of a local cluster runs on this one GPU: each sizes its KV cache to its share.
            cfg = dataclasses.replace(cfg, gpu_memory_fraction=gpu_share_per_worker(num_prefill + num_decode))
        self._tmp = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
        if cfg.device == "cpu" and not cfg.cpu_share_dir:
            # The workers tell each other there whether they have work (engine.cpu_share).
            cfg = dataclasses.replace(cfg, cpu_share_dir=str(self._tmp / "cpu-share"))
        self.cfg = cfg
        self.quiet = quiet
        self.etcd: EtcdServer | None = None
        self.children: list[Child] = []
        # Set when stop() begins: a worker being started (by a planner, through the launcher) then
        # fails at once instead of being waited for, or started again once its SIGTERM lands.
        self._stopping = False
        self.router: dict[str, Any] = {}
        self._config_path = self._tmp / "cluster.json"
        self._log_dir = Path(log_dir) if log_dir else None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 300.0) -> LocalCluster:
        """Launch everything and wait until the router serves and lists every worker."""
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> LocalCluster:
        """Start etcd and spawn the workers and the router, without waiting for them to load."""
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> LocalCluster:
        """Wait (at most ``timeout_s``) for every child's ``TANDEM_READY`` line, for the router to
        list every worker and to serve their model (``router["model"]``); on failure the cluster is
        stopped and the error raised."""
        try:
            deadline = time.monotonic() + timeout_s
            self._wait(list(self.children), timeout_s)
            self.router = next(c for c in self.children if c.name == "router").ready or {}
            self._wait_router_lists_workers(deadline - time.monotonic())
            self.router["model"] = wait_router_serves(self.http_url, deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, role: str, timeout_s: float = 300.0) -> Child:
        """Start one more worker of ``role`` in the running cluster; returns once the router
        lists it (and no longer lists dead workers of that role)."""
        if role not in ("prefill", "decode") or (role == "prefill" and self.cfg.mode == "aggregated"):
            raise ValueError(f"cannot add a {role!r} worker to a {self.cfg.mode} cluster")
        child = self._spawn_worker(role, sum(1 for c in self.children if c.name.startswith(f"{role}-")))
        deadline = time.monotonic() + timeout_s
        self._wait([child], timeout_s)
        self._wait_router_lists_workers(deadline - time.monotonic())
        return child

    def add_router(self, timeout_s: float = 120.0, **overrides: Any) -> Child:
        """Start another router replica on the cluster's etcd, with its own ports and the cluster's
        config but for ``overrides`` (e.g. ``kv_events=False``); returns once it serves the model.
        Its addresses are in ``child.ready`` (``http``, ``grpc``)."""
        cfg = dataclasses.replace(self.cfg, port=0, grpc_port=0, metrics_port=0, **overrides)
        name = f"router-{sum(1 for c in self.children if c.name.startswith('router'))}"
        path = self._tmp / f"{name}.json"
        path.write_text(json.dumps(dataclasses.asdict(cfg)))
        child = self._spawn(name, [sys.executable, "-m", "router", "--config", str(path)])
        deadline = time.monotonic() + timeout_s
        self._wait([child], timeout_s)
        assert child.ready is not None
        child.ready["model"] = wait_router_serves(child.ready["http"], deadline - time.monotonic())
        return child

    def stop(self) -> None:
        """Terminate every child (SIGTERM, then SIGKILL after 10 s), stop etcd, remove temp files.
        A second Ctrl-C (or SIGTERM) while this runs does not cut the cleanup short."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} \
            if in_main else {}
        try:
            self._stop()
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: a handler installed outside Python, not restorable
                    signal.signal(sig, handler)

    def terminate(self) -> None:
        """Begin stopping without waiting: start no child any more and send every running child
        SIGTERM (:meth:`stop` then waits for them). ``tandem serve`` calls it first, so its children
        exit while it stops its own planner and launcher service."""
        self._stopping = True
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)

    def _stop(self) -> None:
        self.terminate()
        deadline = time.monotonic() + 10.0
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
        for child in self.children:  # a killed process still has to be scheduled to exit (slow on a loaded box)
            try:
                child.proc.wait(60)
            except subprocess.TimeoutExpired:  # never skip the cleanup below for one stuck process
                print(f"tandem: {child.name} (pid {child.proc.pid}) is still there 60 s after SIGKILL",
                      file=sys.stderr, flush=True)
        self.children.clear()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- queries ------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return self.router["http"]

    @property
    def grpc_target(self) -> str:
        return self.router["grpc"]

    def workers(self, role: str) -> list[Child]:
        """The cluster's workers serving ``role`` (prefill or decode), dead ones included."""
        return [c for c in self.children if c.role == role]

    # ---- internals ----------------------------------------------------------------------------
    def _launch(self) -> None:
        cfg = self.cfg
        endpoints = list(cfg.etcd_endpoints)
        if not endpoints:
            # TLS and auth as the cluster's etcd settings say (their user made at its start).
            self.etcd = EtcdServer.from_config(cfg, host=cfg.host).start()
            endpoints = [self.etcd.endpoint]
            self._say(f"etcd on {self.etcd.endpoint}")
        self.cfg = cfg = dataclasses.replace(cfg, etcd_endpoints=tuple(endpoints))
        self._config_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        for i in range(self.num_prefill):
            self._spawn_worker("prefill", i)
        for i in range(self.num_decode):
            self._spawn_worker("decode", i)
        self._say(f"loading the model in {self.num_prefill + self.num_decode} worker(s)...")
        # The router needs only etcd: it loads its tokenizer while the workers load the model.
        self._spawn("router", [sys.executable, "-m", "router", "--config", str(self._config_path)])

    def _spawn_worker(self, role: str, index: int) -> Child:
        """A worker that serves either tier (``deploy.switchable_worker``), starting in ``role``."""
        child = self._spawn(f"{role}-{index}", [sys.executable, "-m", "deploy.switchable_worker", "--role", role,
                                                "--config", str(self._config_path),
                                                "--worker-id", f"{role}-{index}-{os.getpid()}"])
        child.role = role
        return child

    def _wait_router_lists_workers(self, timeout_s: float) -> None:
        """Until the router's /health counts exactly the live workers of each role (a dead one
        stays listed until etcd expires its lease)."""
        deadline = time.monotonic() + max(timeout_s, 1.0)
        while True:
            self._check_not_stopping("the router's worker list")
            want = {f"{role}_workers": sum(1 for c in self.workers(role) if c.proc.poll() is None)
                    for role in ("prefill", "decode")}
            body = router_health(self.http_url)
            if all(body.get(k) == v for k, v in want.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router does not list the cluster's live workers {want}; /health: {body}")
            time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        self._check_not_stopping(name)
        log: IO[str] | None = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self._log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed by the reader thread)
        child = Child(name, self._popen(argv), argv)
        self.children.append(child)
        threading.Thread(target=self._read, args=(child, log), daemon=True, name=f"log-{name}").start()
        return child

    def _popen(self, argv: list[str]) -> subprocess.Popen:
        env = child_env(self.cfg, os.environ)
        return spawn.popen(argv, die_with_parent=signal.SIGTERM, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)

    def _restart(self, child: Child) -> None:
        """Start a child that died while starting once more, in place (callers keep their Child)."""
        self._say(f"{child.name} exited with code {child.proc.wait()} while starting; starting it again")
        child.num_restarts += 1
        child.ready = None
        child._event = threading.Event()
        child.proc = self._popen(child.argv)
        threading.Thread(target=self._read, args=(child, None), daemon=True, name=f"log-{child.name}").start()

    def _read(self, child: Child, log: IO[str] | None) -> None:
        assert child.proc.stdout is not None
        try:
            for line in child.proc.stdout:
                if line.startswith("TANDEM_READY "):
                    child.ready = json.loads(line.split(" ", 1)[1])
                    child._event.set()
                    continue
                child.log_tail = [*child.log_tail[-40:], line.rstrip()]
                if log is not None:
                    log.write(line)
                    log.flush()
                elif not self.quiet and ("ERROR" in line or "Traceback" in line or "WARNING" in line):
                    sys.stderr.write(f"[{child.name}] {line}")
        finally:
            child._event.set()
            if log is not None:
                log.close()

    def _wait(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for child in children:
            while not child._event.wait(0.2):
                self._check_not_stopping(child.name)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not become ready in {timeout_s:.0f} s; last output:\n"
                                       + "\n".join(child.log_tail[-15:]))
            if child.ready is None and child.num_restarts == 0:
                # A start-up crash is retried once; a second one is a real failure. (The crash seen
                # before was this process forking with gRPC running: runtime/spawn.py.)
                self._check_not_stopping(child.name)
                self._restart(child)
                while not child._event.wait(0.2):
                    self._check_not_stopping(child.name)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{child.name} did not become ready in {timeout_s:.0f} s")
            if child.ready is None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.wait()} before it was ready; "
                                   "last output:\n" + "\n".join(child.log_tail[-25:]))
            self._say(f"{child.name} ready" + (f" on {child.ready.get('endpoint')}" if 'endpoint' in child.ready
                                               else ""))

    def _check_not_stopping(self, name: str) -> None:
        if self._stopping:
            raise RuntimeError(f"{name}: the cluster is stopping")

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"tandem: {msg}", file=sys.stderr, flush=True)
