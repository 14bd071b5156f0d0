"""The one owner of a prefill worker's held KV blocks.

A prompt prefilled for a decode worker keeps its blocks (the engine's "pinned" request) until
one of these ends the hold, each exactly once and each through :class:`HeldBlocks`:

- ``pushed``: ``PushKV`` wrote them into the decode worker's blocks (or failed to);
- ``unpinned``: the decode worker pulled them and is done, or the router gives the handle up;
- ``aborted``: ``Abort`` of the request;
- ``cancelled``: the router stopped waiting for ``Prefill`` after the prompt finished;
- ``lease``: nobody came for them within the lease (``reap``, on this process's monotonic clock:
  the only clock a hold has; the handle carries no expiry).

A push takes its hold out of the lease's reach (``take``) and releases it when the write has
ended; a release asked for meanwhile (abort, unpin) is answered at once and done by the push's
end, so no block is freed while a transfer still reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from runtime import metric_catalog as mc

RELEASES = mc.HELD_RELEASES.create()
REASONS = ("pushed", "unpinned", "aborted", "cancelled", "lease")


@dataclass
class _Hold:
    block_ids: list[int]
    expires: float  # monotonic; inf while a push owns it
    pushing: bool = False


class HeldBlocks:
    """Hold, take (for a push), release and reap a prefill worker's handed-off blocks."""

    def __init__(self, engine: AsyncEngine, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.engine = engine
        self.lease_s = lease_s
        self.clock = clock
        self._holds: dict[str, _Hold] = {}

    def __len__(self) -> int:
        return len(self._holds)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._holds

    def hold(self, request_id: str, block_ids: list[int]) -> None:
        """The engine keeps ``request_id``'s blocks after its prefill: hold them for one lease."""
        self._holds[request_id] = _Hold(list(block_ids), self.clock() + self.lease_s)

    def renew(self, request_id: str) -> bool:
        """Start a new lease for a held (not pushing) request; False when it is not held."""
        hold = self._holds.get(request_id)
        if hold is None:
            return False
        if not hold.pushing:
            hold.expires = self.clock() + self.lease_s
        return True

    def take(self, request_id: str) -> list[int] | None:
        """A push starts: its block ids, out of the lease's reach until :meth:`end_push`; None when
        the request holds nothing (released, expired, never held) or another push has it."""
        hold = self._holds.get(request_id)
        if hold is None or hold.pushing:
            return None
        hold.pushing = True
        hold.expires = float("inf")
        return hold.block_ids

    def end_push(self, request_id: str) -> None:
        """The push that ``take`` started has ended (landed or failed): free the blocks."""
        hold = self._holds.get(request_id)
        if hold is not None and hold.pushing:
            self._free(request_id, "pushed")

    def release(self, request_id: str, reason: str) -> bool:
        """End ``request_id``'s hold (``reason``: unpinned, aborted, cancelled). Whether it was held.
        The engine frees the blocks between its steps; a push in flight frees them when it ends.
        Also frees blocks the engine holds for a request that never reached :meth:`hold` (the
        caller went away between the prefill's end and the hold)."""
        if reason not in REASONS:
            raise ValueError(f"unknown release reason {reason!r}")
        hold = self._holds.get(request_id)
        if hold is not None and hold.pushing:
            return True  # the push's end frees them
        if hold is None:
            self.engine.post(lambda e: e.unpin(request_id))
            return False
        self._free(request_id, reason)
        return True

    def reap(self) -> int:
        """Release every hold whose lease has ended; how many."""
        now = self.clock()
        expired = [rid for rid, hold in self._holds.items() if hold.expires < now]
        for rid in expired:
            self._free(rid, "lease")
        return len(expired)

    async def run(self) -> None:
        """Reap forever, a few times per lease."""
        while True:
            await asyncio.sleep(min(1.0, self.lease_s / 4))
            self.reap()

    def _free(self, request_id: str, reason: str) -> None:
        del self._holds[request_id]
        RELEASES.labels(reason).inc()
        self.engine.post(lambda e: e.unpin(request_id))
