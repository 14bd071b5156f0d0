"""The hung-worker watchdog: a worker call that stays silent is checked, not trusted.

A worker that dies is seen at once (its calls fail); one that hangs (stopped, wedged, its host
gone without a reset) would keep a request waiting for ever. So every worker call the router
makes is watched: when no message has come for ``silence_s``, the worker is asked for its
``Health`` (bounded by the probe timeout). A worker that answers is only busy (a long prefill, a
deep queue) and the call goes on waiting; one that does not is hung: the call is cancelled and
:class:`WorkerHungError` raised, which the request flow handles as a failed worker (retry
elsewhere before the first token, a clean error after it, the worker skipped).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from router.errors import WorkerFailedError

T = TypeVar("T")
Probe = Callable[[], Awaitable[bool]]


class WorkerHungError(WorkerFailedError):
    """A worker stopped answering a call and its Health probe."""


async def watched_call(call: Awaitable[T], probe: Probe, silence_s: float, what: str) -> T:
    """Await a unary call (a ``grpc.aio`` call: awaitable and cancellable); every ``silence_s``
    without an answer the worker is probed, and a failed probe cancels the call and raises."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=silence_s)
            if done:
                return task.result()
            if not await probe():
                raise WorkerHungError(f"{what}: no answer for {silence_s:.1f} s and no Health answer")
    finally:
        if not task.done():
            if hasattr(call, "cancel"):
                call.cancel()  # type: ignore[union-attr]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def watched_stream(stream: Any, probe: Probe, silence_s: float, what: str) -> AsyncIterator[Any]:
    """The messages of a server-streaming call, probing the worker whenever the stream is silent
    for ``silence_s`` (a stream stays open however long its worker takes, if it answers Health)."""
    messages = stream.__aiter__()
    while True:
        step = asyncio.ensure_future(anext(messages))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=silence_s)
                if done:
                    break
                if not await probe():
                    raise WorkerHungError(f"{what}: silent for {silence_s:.1f} s and no Health answer")
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        try:
            yield step.result()
        except StopAsyncIteration:
            return
