"""Starting a child process from a process that runs gRPC (``tandem serve``, a launcher, a test).

Never with ``preexec_fn``: it makes CPython create the child with ``fork()`` instead of
``vfork()``, and ``fork()`` runs gRPC's post-fork handler in the child, which restarts gRPC's
poller thread there; the child's ``close_fds`` then closes that poller's epoll fd before ``exec``
and the poller aborts the child (``ev_epoll1_linux.cc ... epoll_wait error: Bad file descriptor``,
SIGABRT) or it crashes (SIGSEGV) before it ran a line of its program (grpc/grpc#43055, grpcio
>= 1.80). That was the rare "worker abort at start-up": a 1-in-200 start from a process with idle
gRPC, ~1 in 10 while it had calls in flight (``bench/start_abort.py``). ``vfork()`` runs no fork
handlers.

A child that must die with its parent (PR_SET_PDEATHSIG, on Linux) arms the signal itself: it
starts as a small trampoline (``python -I -S -c``) that arms it, checks that its parent is still
the process that spawned it (else it was orphaned before arming: it takes the signal at once),
then ``exec``s the real argv. The signal survives ``exec`` and the pid stays the child's. As with
``preexec_fn``, the signal fires when the *thread* that spawned the child exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    "sig, parent, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, sig)\n"
    "if os.getppid() != parent:\n"
    "    os.kill(os.getpid(), sig)\n"
    "os.execvp(argv[0], argv)\n"
)


def popen(argv: Sequence[str], *, die_with_parent: signal.Signals | None = None, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kwargs)`` without ``fork()``; with ``die_with_parent``, the child
    gets that signal when the spawning thread exits (Linux; elsewhere it is not armed)."""
    if "preexec_fn" in kwargs:
        raise ValueError("no preexec_fn: it forks this process, and a forked gRPC process can abort the child")
    argv = list(argv)
    if die_with_parent is not None and sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(int(die_with_parent)), str(os.getpid()), *argv]
    return subprocess.Popen(argv, **kwargs)
