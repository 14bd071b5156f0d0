"""The hung-worker watchdog: a worker call that stays silent is checked, not trusted.

A worker that dies is seen at once (its calls fail); one that hangs (stopped, wedged, its host
gone without a reset) would keep a request waiting for ever. So every worker call the router
makes is watched. The question is whether the *process* is hung, not whether it is slow: on a
loaded machine a live worker goes quiet for seconds at a time, and failing it then breaks
answers that would have come. So a call's worker is judged hung only when all of these hold:

- the call has been silent longer than its :meth:`Patience.silence_limit_s`: ``silence_s``
  before its first message, twice that after it (a failure can no longer be retried: the client
  has tokens), and never less than :data:`GAP_FACTOR` times the longest gap the worker has
  lately shown on any of its calls (a slow worker is judged against itself);
- nothing has been heard from the worker meanwhile (:class:`Liveness`): no message on any of its
  calls, no Health answer, no published load with new engine steps. A hung process goes silent
  everywhere at once; a slow one keeps saying something somewhere;
- a ``Health`` probe then gets no answer within ``probe_timeout_s``, and the call itself says
  nothing while the probe waits.

Anything heard re-arms the silence from that moment. A hung worker's call is cancelled and
:class:`WorkerHungError` raised, which the request flow handles as a failed worker (retry
elsewhere before the first token, a clean error after it, the worker skipped).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from router.errors import WorkerFailedError

T = TypeVar("T")
Probe = Callable[[], Awaitable[bool]]

GAP_FACTOR = 4.0  # a call may be silent this many times the worker's recent longest gap
GAP_HALF_LIFE_S = 10.0  # how fast a long gap is forgotten once the worker is quick again
STREAMED_FACTOR = 2.0  # the silence allowed once a call has had a message, in units of silence_s


class WorkerHungError(WorkerFailedError):
    """A worker stopped answering a call and its Health probe."""


@dataclass(frozen=True)
class Patience:
    """How long a silent worker call is trusted (``worker_silence_s``, ``worker_probe_timeout_s``)."""

    silence_s: float
    probe_timeout_s: float

    def silence_limit_s(self, streamed: bool, gap_s: float) -> float:
        """The silence after which a call's worker is checked: ``silence_s`` before the call's
        first message, ``STREAMED_FACTOR`` times it after, at least ``GAP_FACTOR`` x ``gap_s``
        (the worker's own recent gaps, :meth:`Liveness.gap_s`)."""
        return max(self.silence_s * (STREAMED_FACTOR if streamed else 1.0), GAP_FACTOR * gap_s)


class Liveness:
    """What the router last heard from one worker, on any channel (owned by its ``WorkerPool``;
    every watched call to the worker shares it). Times are ``time.monotonic()`` seconds."""

    def __init__(self) -> None:
        self.last_heard_s = -math.inf  # a message on any call, a Health answer, a load with new steps
        self._gap_s = 0.0  # the longest gap between its messages lately (decaying)
        self._gap_at_s = -math.inf

    def heard(self, at_s: float | None = None) -> None:
        """The worker was alive at ``at_s`` (now if None)."""
        self.last_heard_s = max(self.last_heard_s, time.monotonic() if at_s is None else at_s)

    def message(self, gap_s: float, now_s: float | None = None) -> None:
        """A message came on one of its calls, ``gap_s`` after that call's previous one."""
        now_s = time.monotonic() if now_s is None else now_s
        self.heard(now_s)
        if gap_s >= self.gap_s(now_s):
            self._gap_s, self._gap_at_s = gap_s, now_s

    def gap_s(self, now_s: float | None = None) -> float:
        """How quiet the worker lately is when alive: its longest recent gap between two
        messages of one call, halved every ``GAP_HALF_LIFE_S``."""
        if not self._gap_s:
            return 0.0
        now_s = time.monotonic() if now_s is None else now_s
        return self._gap_s * 0.5 ** (max(0.0, now_s - self._gap_at_s) / GAP_HALF_LIFE_S)


@dataclass(frozen=True)
class Watch:
    """One call's watch: its worker's probe and liveness, and the patience."""

    probe: Probe
    liveness: Liveness
    patience: Patience
    what: str  # "decode worker d-1", for the error


async def _until_done(task: asyncio.Future, watch: Watch, streamed: bool) -> None:
    """Wait for ``task`` (the call's next message or its answer); raise :class:`WorkerHungError`
    (``task`` left running, the caller cancels it) when the worker is judged hung."""
    live, patience = watch.liveness, watch.patience
    since = time.monotonic()  # the start of the silence being judged
    while True:
        wait_s = since + patience.silence_limit_s(streamed, live.gap_s()) - time.monotonic()
        if wait_s > 0:
            done, _ = await asyncio.wait({task}, timeout=wait_s)
            if done:
                return
        if live.last_heard_s > since:  # it spoke elsewhere: alive; the silence counts from then
            since = live.last_heard_s
            continue
        probe = asyncio.ensure_future(watch.probe())
        try:
            await asyncio.wait({task, probe}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not probe.done():
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
        if task.done():
            return
        if probe.result():
            live.heard()
        if live.last_heard_s > since:  # answered, or spoke elsewhere while asked
            since = live.last_heard_s
            continue
        silent_s = time.monotonic() - since
        raise WorkerHungError(f"{watch.what}: silent for {silent_s:.1f} s, nothing heard from it elsewhere, "
                              f"no Health answer in {patience.probe_timeout_s:.1f} s")


async def watched_call(call: Awaitable[T], watch: Watch) -> T:
    """Await a unary call (a ``grpc.aio`` call: awaitable and cancellable) under ``watch``; a
    hung worker's call is cancelled and :class:`WorkerHungError` raised."""
    task = asyncio.ensure_future(call)
    try:
        await _until_done(task, watch, streamed=False)
        answer = task.result()
        watch.liveness.heard()  # an answer, not a failed call (a dead channel fails too)
        return answer
    finally:
        if not task.done():
            if hasattr(call, "cancel"):
                call.cancel()  # type: ignore[union-attr]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def watched_stream(stream: Any, watch: Watch) -> AsyncIterator[Any]:
    """The messages of a server-streaming call under ``watch`` (a stream stays open however long
    its worker takes, as long as the worker is heard from)."""
    messages = stream.__aiter__()
    last_s: float | None = None  # when the previous message came
    while True:
        step = asyncio.ensure_future(anext(messages))
        try:
            await _until_done(step, watch, streamed=last_s is not None)
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        try:
            message = step.result()
        except StopAsyncIteration:
            return
        now_s = time.monotonic()
        watch.liveness.message(0.0 if last_s is None else now_s - last_s, now_s)
        last_s = now_s
        yield message
