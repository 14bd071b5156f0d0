"""A Ray head node on this machine, for ``tandem deploy ray`` without ``--address`` and for tests.

It is ``ray start --head --block`` in its own session: that process owns every Ray process of
the node (GCS, raylet, workers...) and stops them all when it gets SIGTERM, so the node is
stopped by its pid alone, never by ``ray stop`` (which stops every Ray node of the user on the
machine, other people's included). Every port is chosen free, the temp dir is its own, and on
a loopback host every listener binds that address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.etcd_server import free_port

_STARTED = "Ray runtime started"


@dataclass(frozen=True)
class RayHead:
    pid: int  # the `ray start --block` process
    address: str  # GCS host:port, for ray.init(address=...) and `ray start --address` on other nodes
    temp_dir: str  # Ray's session files and logs (head.log: the node's own output)

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with contextlib.suppress(OSError):  # a zombie (our own child, not yet reaped) is not alive
            return Path(f"/proc/{self.pid}/stat").read_text().split(") ")[1][0] != "Z"
        return True


def ray_env(host: str) -> dict[str, str]:
    """The environment Ray processes and drivers need to stay on ``host`` when it is loopback."""
    env = dict(os.environ)
    if host.startswith("127.") or host == "localhost":
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's own listeners on loopback too
    return env


def start_head(host: str = "127.0.0.1", num_cpus: float | None = None, num_gpus: float | None = None,
               timeout_s: float = 90.0) -> RayHead:
    """Start a Ray head node; return once it accepts drivers. ``num_gpus`` may declare logical
    GPUs (on a CPU machine, for tests); None lets Ray count the real ones."""
    # Unix socket paths are short (108 bytes): a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    port = free_port(host)
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", host,
            "--port", str(port), "--ray-client-server-port", str(free_port(host)),
            "--dashboard-port", str(free_port(host)), "--dashboard-agent-listen-port", str(free_port(host)),
            "--metrics-export-port", str(free_port(host)), "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", temp_dir]
    if num_cpus is not None:
        argv += ["--num-cpus", f"{num_cpus:g}"]
    if num_gpus is not None:
        argv += ["--num-gpus", f"{num_gpus:g}"]
    log = Path(temp_dir) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ray_env(host), start_new_session=True)
    head = RayHead(proc.pid, f"{host}:{port}", temp_dir)
    deadline = time.monotonic() + timeout_s
    while _STARTED not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            stop_head(head)
            raise RuntimeError(f"the Ray head did not start (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.2)
    return head


def stop_head(head: RayHead, timeout_s: float = 60.0) -> None:
    """SIGTERM the head's `ray start` process (it stops every Ray process of the node), SIGKILL
    its session's leftovers after ``timeout_s``; remove its temp dir."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while head.alive and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(head.pid, os.WNOHANG)  # our own child: reap it
        time.sleep(0.2)
    for pid in session_pids(head):  # whatever did not stop with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(head.pid, os.WNOHANG)
    subprocess.run(["rm", "-rf", head.temp_dir], check=False)


def session_pids(head: RayHead) -> list[int]:
    """Processes still running that belong to the head: itself and any whose command line
    names its temp dir or GCS address (raylet, GCS, monitor...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if state != "Z" and (int(entry.name) == head.pid or head.temp_dir in cmdline or head.address in cmdline):
            pids.append(int(entry.name))
    return pids
