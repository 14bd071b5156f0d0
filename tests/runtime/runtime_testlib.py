"""Helpers for the runtime tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_TIMEOUT_S = 60.0


def run(coro: Coroutine[Any, Any, T], timeout_s: float = TEST_TIMEOUT_S) -> T:
    """Run a coroutine to completion on a fresh event loop, bounded by `timeout_s`."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


def child_env() -> dict[str, str]:
    """Env for a child Python that must import this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
