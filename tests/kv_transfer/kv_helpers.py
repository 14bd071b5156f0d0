"""Helpers for the KV transfer tests: a block owner in a separate process, the known block pattern."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from kv_transfer import KVLayout

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNER_SCRIPT = Path(__file__).with_name("owner_main.py")

_spec = importlib.util.spec_from_file_location("kv_owner_main", OWNER_SCRIPT)
assert _spec is not None and _spec.loader is not None
owner_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(owner_main)
block_pattern = owner_main.block_pattern
filled_kv = owner_main.filled_kv

# The owner's layout; a block is 16 KiB in bf16, so a pull streams well past socket buffers.
LAYOUT = {"num_blocks": 64, "num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}


def layout(dtype: str = "bfloat16", **changes: int) -> KVLayout:
    return KVLayout(**{**LAYOUT, **changes}, dtype=dtype)


def empty_kv(lay: KVLayout, device: str = "cpu") -> torch.Tensor:
    return torch.zeros((lay.num_blocks, *lay.block_shape), dtype=lay.torch_dtype, device=device)


@dataclass
class Owner:
    """A peer process (``owner_main.py``) and the metadata of each of its transports, by dtype."""

    proc: subprocess.Popen[str]
    metadata: dict[str, bytes]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    _seen: list[str] = field(default_factory=list)

    def send(self, *words: object) -> None:
        """One command line (see owner_main.py); lists become comma-separated ids."""
        parts = [",".join(map(str, w)) or "-" if isinstance(w, list | tuple) else str(w) for w in words]
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(parts) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, prefix: str, timeout_s: float = 30.0) -> list[str]:
        """The words of the first answer line starting with ``prefix`` (other lines stay buffered)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self._seen:
                if line.startswith(prefix):
                    self._seen.remove(line)
                    return line.split()
            try:
                self._seen.append(self.lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {prefix!r} from the peer within {timeout_s} s; got {self._seen}") from None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the owner exits on EOF
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def _pump(stream: IO[str] | None, lines: queue.Queue[str]) -> None:
    for line in stream or ():
        lines.put(line)


@contextlib.contextmanager
def spawn_owner(
    transport: str,
    dtypes: tuple[str, ...] = ("bfloat16",),
    device: str = "cpu",
    start_timeout_s: float = 30.0,
    store: str | None = None,
    stderr: IO[str] | None = None,
    env: dict[str, str] | None = None,
    **layout_changes: int,
) -> Iterator[Owner]:
    """Start ``owner_main.py`` serving ``filled_kv(layout(dtype, **layout_changes))`` per dtype; stop it
    on exit. ``store``: host:port of a TCPStore (nccl); ``stderr``: where the process's stderr goes;
    ``env``: variables to set for it."""
    env = {**os.environ, "UCX_NET_DEVICES": "lo", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    args = [sys.executable, str(OWNER_SCRIPT), "--transport", transport, "--dtypes", ",".join(dtypes)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in {**LAYOUT, **layout_changes}.items()]
    args += [f"--device={device}"] + ([f"--store={store}"] if store else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    owner = Owner(proc, {})
    lines = owner.lines
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if proc.poll() is not None:
                    raise RuntimeError(f"owner process exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"owner process not ready within {start_timeout_s} s") from None
                continue
            if line.startswith("METADATA "):
                _, dtype, hexdata = line.split()
                owner.metadata[dtype] = bytes.fromhex(hexdata)
            elif line.strip() == "READY":
                break
        yield owner
    finally:
        owner.stop()
