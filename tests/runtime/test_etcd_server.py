"""The embedded etcd launcher: starts a real etcd, stops it, and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from runtime_testlib import child_env, pid_alive, wait_until

from runtime.etcd_server import EtcdServer, EtcdStartError, find_etcd_binary


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_binary_found() -> None:
    binary = find_etcd_binary()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    assert "etcd Version: 3.5" in out.stdout


def test_start_stop_leaves_nothing_behind() -> None:
    server = EtcdServer()
    with server:
        pid, data_dir, port = server.pid, server.data_dir, server.client_port
        assert pid is not None and data_dir is not None
        assert server.host == "127.0.0.1" and port > 0 and server.peer_port not in (0, port)
        assert pid_alive(pid) and data_dir.is_dir()
        with urllib.request.urlopen(f"{server.client_url}/health", timeout=2) as resp:
            assert b'"health":"true"' in resp.read()
    assert not server.is_running
    assert not pid_alive(pid)
    assert not data_dir.parent.exists()
    assert not port_open(port)
    server.stop()  # idempotent


def test_given_ports_are_used() -> None:
    from runtime.etcd_server import free_port

    client_port, peer_port = free_port(), free_port()
    with EtcdServer(client_port=client_port, peer_port=peer_port) as server:
        assert server.endpoint == f"127.0.0.1:{client_port}"
        assert port_open(client_port) and port_open(peer_port)


def test_port_taken_is_a_clear_error_and_cleans_up() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        server = EtcdServer(client_port=taken, startup_timeout_s=15)
        with pytest.raises(EtcdStartError, match="address already in use"):
            server.start()
    assert server.pid is None and server.data_dir is None


def test_binary_that_exits_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'fake etcd says no' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = EtcdServer(binary=fake, startup_timeout_s=5)
    with pytest.raises(EtcdStartError, match=r"(?s)exited with code 3.*fake etcd says no"):
        server.start()
    assert server.data_dir is None


def test_binary_that_hangs_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'stuck' >&2\nexec sleep 30\n")
    fake.chmod(0o755)
    server = EtcdServer(binary=fake, startup_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(EtcdStartError, match=r"(?s)not healthy after 1\.0s.*stuck"):
        server.start()
    assert time.monotonic() - started < 8


_CHILD = """
import sys, time
from runtime.etcd_server import EtcdServer
server = EtcdServer().start()
print(server.pid, server.data_dir, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)
time.sleep(60)
"""


def _start_child(mode: str) -> tuple[subprocess.Popen[str], int, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child's EtcdServer gives up after 20 s
    assert line, "child did not start etcd"
    pid, data_dir = line.split()
    return proc, int(pid), Path(data_dir)


@pytest.mark.parametrize("mode", ["exit", "sigterm", "sigkill"])
def test_parent_death_takes_etcd_along(mode: str) -> None:
    proc, etcd_pid, data_dir = _start_child(mode)
    try:
        assert pid_alive(etcd_pid)
        if mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif mode == "sigkill":
            proc.kill()
        proc.wait(timeout=20)
        assert wait_until(lambda: not pid_alive(etcd_pid), 10), f"etcd {etcd_pid} survived its parent"
        if mode != "sigkill":  # a SIGKILLed parent cannot clean up its temp dir
            assert not data_dir.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if pid_alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
        if mode == "sigkill":
            import shutil

            shutil.rmtree(data_dir.parent, ignore_errors=True)
