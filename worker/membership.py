"""A worker's presence in etcd: its registration under its tier (``workers/{role}/{id}``), its
load key (``metrics/{role}/{id}``) and its step summary (``metrics/steps/{id}``, one key whatever
the tier). Everything is bound to the worker's lease; :meth:`Membership.move` re-registers it in
the other tier (``worker.roles``' switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from runtime import keys
from runtime.convert import load_to_pb
from runtime.discovery import WorkerInfo, deregister, register
from runtime.etcd import ControlPlane, Publisher
from worker.step_stats import StepWindow


class Membership:
    """Registration, load key and step summary of one worker; ``move`` re-registers in another tier."""

    def __init__(self, plane: ControlPlane, info: WorkerInfo, load: Callable[[], Any], interval_s: float) -> None:
        self.plane, self.info, self._load, self.interval_s = plane, info, load, interval_s
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()

    async def join(self) -> None:
        """Register under the tier (the routers route to it from now on) and publish its load there."""
        info = self.info
        await register(self.plane, info)
        self._publisher = self.plane.start_publisher(
            keys.worker_load_key(self.plane.namespace, info.role, info.worker_id),
            lambda: load_to_pb(self._load()), self.interval_s)

    async def deregister(self) -> None:
        """Leave the tier's registrations (a drain: the routers drop it; the load key stays)."""
        await deregister(self.plane, self.info.role, self.info.worker_id)

    async def move(self, role: str) -> None:
        async with self._lock:
            old = self.info
            if old.role == role:
                return
            await self.deregister()
            if self._publisher is not None:
                await self._publisher.stop()
            with contextlib.suppress(Exception):
                await self.plane.delete(keys.worker_load_key(self.plane.namespace, old.role, old.worker_id))
            self.info = dataclasses.replace(old, role=role)
            await self.join()

    def publish_steps(self, window: StepWindow) -> Publisher:
        return self.plane.start_publisher(keys.worker_steps_key(self.plane.namespace, self.info.worker_id),
                                          window.sample, self.interval_s)
