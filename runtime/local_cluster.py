"""The embedded cluster on one machine (``tandem serve``): an etcd server, prefill and decode
workers and a router, each its own process.

Children get the resolved config as a JSON file (``--config``), so every process reads the
same settings. Each child is asked to die with its parent (PR_SET_PDEATHSIG), and ``stop()``
terminates them, kills stragglers, stops etcd and removes the temp dir: nothing is left
behind, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from runtime.etcd_server import EtcdServer
from runtime.settings import ClusterConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    ready: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)
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
        if cfg.threads == 0 and cfg.device == "cpu":  # share the cores between the workers
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            cfg = dataclasses.replace(cfg, threads=max(1, cpus // (num_prefill + num_decode)))
        self.cfg = cfg
        self.quiet = quiet
        self.etcd: EtcdServer | None = None
        self.children: list[Child] = []
        self.router: dict[str, Any] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
        self._log_dir = Path(log_dir) if log_dir else None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 300.0) -> LocalCluster:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        cfg = self.cfg
        endpoints = list(cfg.etcd_endpoints)
        if not endpoints:
            self.etcd = EtcdServer(host=cfg.host).start()
            endpoints = [self.etcd.endpoint]
            self._say(f"etcd on {self.etcd.endpoint}")
        self.cfg = cfg = dataclasses.replace(cfg, etcd_endpoints=tuple(endpoints))
        config_path = self._tmp / "cluster.json"
        config_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        workers = [("prefill", i) for i in range(self.num_prefill)] + [("decode", i) for i in range(self.num_decode)]
        for role, i in workers:
            self._spawn(f"{role}-{i}", [sys.executable, "-m", f"{role}_worker", "--config", str(config_path),
                                        "--worker-id", f"{role}-{i}-{os.getpid()}"])
        self._say(f"loading the model in {len(workers)} worker(s)...")
        self._wait([c for c in self.children], timeout_s)
        router = self._spawn("router", [sys.executable, "-m", "router", "--config", str(config_path)])
        self._wait([router], 60.0)
        self.router = router.ready or {}

    def stop(self) -> None:
        """Terminate every child (SIGTERM, then SIGKILL after 10 s), stop etcd, remove temp files.
        A second Ctrl-C while this runs does not cut the cleanup short."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._stop()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
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
        return [c for c in self.children if c.name.startswith(role)]

    # ---- internals ----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Child:
        log: IO[str] | None = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self._log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed by the reader thread)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.cfg.host.startswith("127.") or self.cfg.host == "localhost":
            env.setdefault("UCX_NET_DEVICES", "lo")  # UCX listens where the cluster does
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=_die_with_parent)
        child = Child(name, proc)
        self.children.append(child)
        threading.Thread(target=self._read, args=(child, log), daemon=True, name=f"log-{name}").start()
        return child

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
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not become ready in {timeout_s:.0f} s; last output:\n"
                                       + "\n".join(child.log_tail[-15:]))
            if child.ready is None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.wait()} before it was ready; "
                                   "last output:\n" + "\n".join(child.log_tail[-25:]))
            self._say(f"{child.name} ready" + (f" on {child.ready.get('endpoint')}" if 'endpoint' in child.ready
                                               else ""))

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"tandem: {msg}", file=sys.stderr, flush=True)
