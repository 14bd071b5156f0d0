"""The cores of one machine, shared by its CPU workers (``tandem serve``'s local cluster): each
worker's engine says whether it has work, so a step that prefills takes the other workers' cores
while they have none.

Measured on two cores, disaggregated (one prefill and one decode worker, one engine thread each):
on the shared-prefix load the decode worker computes every prompt's uncached suffix itself
(64 tokens: the router leaves it local) while the prefill worker idles, and at concurrency 1 the
prefill worker prefills while the decode worker idles; either way a core stood idle through the
step that holds every request back.

Each engine keeps one byte in a file of its own, ``<directory>/<pid>.<n>``: 1 from the start of a
step until a step ends with nothing left to compute, 0 otherwise (requests waiting for their KV
do not count). A step that prefills reads the others' bytes (a directory listing and a byte each,
some microseconds, only for such steps): none set, and no more tasks runnable on the machine than
leave it the cores (``/proc/loadavg``: the router, the client, other users' processes; a thread
waiting for a core at every barrier made such a step slower than one thread), and it runs on the
engine's ``num_idle_prefill_threads``, else on ``num_prefill_threads``; a step that took the idle cores
looks again before each layer and gives them back once another worker has work. A file whose process is gone is
ignored. The thread count changes where the step runs, never what it computes (the bfloat16
kernels only: ``ModelRunner.step_threads``).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch

_SERIAL = itertools.count()  # engines of one process (tests) keep a byte each


class CpuShare:
    """This process's byte in ``directory`` and its view of the others'."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = f"{os.getpid()}.{next(_SERIAL)}"
        self.path = self.dir / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, 1)  # a zero: no work
            self._map: mmap.mmap | None = mmap.mmap(fd, 1)
        finally:
            os.close(fd)
        self._busy = False
        self._peers: dict[str, mmap.mmap] = {}
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.runnable_others: Callable[[], int] = runnable_others

    def set_busy(self, busy: bool) -> None:
        """Say whether this engine has work."""
        if busy != self._busy and self._map is not None:
            self._busy = busy
            self._map[0] = int(busy)

    def others_busy(self) -> bool:
        """Whether another live worker of the directory has work now."""
        try:
            names = set(os.listdir(self.dir))
        except OSError:
            return False
        names.discard(self.name)
        for gone in set(self._peers) - names:
            self._peers.pop(gone).close()
        busy = False
        for name in names:
            peer = self._peers.get(name) or self._open(name)
            if peer is not None and peer[0] and _alive(name):
                busy = True
        return busy

    def room_for(self, threads: int) -> bool:
        """Whether a step may run on ``threads`` threads now: no other worker has work, and the
        tasks runnable on the machine besides this thread (``runnable_others``: the router, a
        client, anyone's process) leave that many cores free."""
        return not self.others_busy() and self.runnable_others() + threads <= self.cores

    def gate(self, threads: int, take: int = 0) -> Callable[[int], None]:
        """For a step that prefills, called before each of its layers. A step on the cores of idle
        workers (``take`` 0): once another worker has work, the rest of the step runs on ``threads``
        (a step started alone would otherwise hold a core that another engine now waits for, its
        threads and theirs sharing cores at every barrier: a 1152-token prefill took 2.1 s instead
        of 1.0-1.2 s). A step that started on ``threads`` for want of room: it takes ``take``
        threads at the first layer where :meth:`room_for` says so, and gives them back as above. At
        a step's start the router and the client are often still runnable for a moment (they just
        sent the prompt), so a check at the start alone left the idle core idle: disaggregated on two
        cores, the shared-prefix load's 512-token prefixes ran on one thread while the decode
        worker had nothing to do (forcing the room: out tok/s +15%, TTFT mean -15%, same hold)."""
        state = "take" if take else "took"

        def before_layer(layer: int) -> None:
            nonlocal state
            if not layer or state == "back":
                return
            if state == "took":
                if self.others_busy():
                    torch.set_num_threads(threads)
                    state = "back"
            elif self.room_for(take):
                torch.set_num_threads(take)
                state = "took"

        return before_layer

    def _open(self, name: str) -> mmap.mmap | None:
        try:
            fd = os.open(self.dir / name, os.O_RDONLY)
        except OSError:
            return None
        try:
            peer = self._peers[name] = mmap.mmap(fd, 1, prot=mmap.PROT_READ)
        except (OSError, ValueError):  # not sized yet (its process is starting)
            return None
        finally:
            os.close(fd)
        return peer

    def close(self) -> None:
        """Take this process's byte away (an engine that stops)."""
        if self._map is not None:
            self._map.close()
            self._map = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


def _alive(name: str) -> bool:
    try:
        os.kill(int(name.split(".")[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def runnable_others() -> int:
    """Tasks runnable on the machine now besides the caller (``/proc/loadavg``'s fourth field; 0
    where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0
