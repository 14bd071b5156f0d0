"""``tandem serve`` (the real command, a sim-engine cluster) stops everything and exits 0 on
SIGTERM, and on SIGINT also when its parent started it with SIGINT ignored (a non-interactive
shell's background job): no etcd, router or worker of it is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint-ignored-by-parent"])
def test_serve_stops_everything_on_a_signal(sig: signal.Signals, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--engine", "sim", "--model", "dummy:smollm2-135m",
           "--port", "0", "--grpc-port", "0", "--kv-cache-gib", "0.25", "--transport", "tcp",
           "--log-dir", str(tmp_path)]
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sig == signal.SIGINT else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ignore_sigint, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started: set[int] = set()
    try:
        lines = []
        for line in proc.stdout:  # until the banner: everything is up
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert proc.poll() is None, "".join(lines)
        started = _children(proc.pid)
        assert len(started) >= 4  # etcd, router, prefill and decode workers
        proc.send_signal(sig)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, "".join(lines) + rest
        assert not [pid for pid in started if _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # what a failure left behind: ours, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
