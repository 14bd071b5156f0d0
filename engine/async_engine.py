"""An asyncio front for :class:`LLMEngine`: the engine loop runs in its own thread; callers
await outputs per request. Every engine call happens on the engine thread (the engine is not
thread-safe); results come back to the event loop with ``call_soon_threadsafe``.

A dead engine (an exception in ``step``) fails every open stream and makes ``dead`` true: the
worker process then exits and its launcher restarts it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from engine.llm_engine import LLMEngine
from protocol.kv_events import KVEvent
from protocol.load import EngineLoad
from protocol.outputs import RequestOutput
from protocol.sampling import SamplingParams
from runtime import trace

T = TypeVar("T")

_JOIN_POLL_S = 5e-4  # while waiting for landings, how often to look whether the device is done


class EngineDeadError(RuntimeError):
    pass


class HandoffAbortedError(RuntimeError):
    """A request admitted before its first token was known (a handle sent ahead) could not get
    its KV and first token: it was aborted here, and nothing writes into its blocks any more."""


@dataclass(frozen=True)
class Landing:
    """How a prefilled request's KV transfer ended (what ``generate_prefilled``'s fetch returns)."""

    ok: bool  # the blocks landed; False: recompute the prompt here (or, without a first token, abort)
    first_token: int | None = None  # the prefill worker's, for a request admitted without it


class AsyncEngine:
    def __init__(self, engine: LLMEngine, event_history: int = 100_000) -> None:
        self.engine = engine
        self.dead: BaseException | None = None
        # What the worker publishes, refreshed after every step; read once here (the engine thread
        # has not started) so that a worker that has not stepped yet reports its real KV capacity.
        self.load: EngineLoad = engine.load()
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Held by the engine thread except while it waits: for commands (idle) or for the device
        # in the middle of a step. ``admit`` runs its call under it: at once during such a wait.
        self._lock = threading.Lock()
        # KV events, kept for subscribers that resume from an event id.
        self.events: deque[KVEvent] = deque(maxlen=event_history)
        self._event_waiters: set[asyncio.Event] = set()
        # Block tables of prefill-only requests whose blocks the engine kept (handed off), read
        # on the engine thread with their last output: taken by :meth:`take_handed_off`.
        self._handed_off: dict[str, list[int]] = {}
        # Prefilled requests' transfers still running (they may write into the request's blocks):
        # a new request of the same id waits for its predecessor's to end (its kv_ready first).
        self._fetches: dict[str, asyncio.Task] = {}
        # Per request id, the last clean-up posted for it (an abort, a failed landing's kv_ready)
        # and not yet run by the engine thread: a new request of the same id is admitted only
        # after it ran. ``admit`` runs at once while the engine thread waits for the device, ahead
        # of queued commands, so without this a predecessor's late abort would hit its successor.
        self._cleanups: dict[str, Future[None]] = {}
        # Admissions and waits for a launched step block a thread each: their own pools, so that
        # neither waits behind the other nor behind anything else in asyncio's default pool.
        self._admit_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-admit")
        self._launched_pool = ThreadPoolExecutor(4, thread_name_prefix="engine-launched")

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._admit_pool.shutdown(wait=False, cancel_futures=True)
        self._launched_pool.shutdown(wait=False, cancel_futures=True)

    # ---- calls into the engine thread ------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread and return its result."""
        if self.dead is not None:
            raise EngineDeadError(f"engine died: {self.dead!r}")
        fut: Future[T] = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up (was cancelled) before the engine got to it
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # delivered to the caller
                fut.set_exception(e)

        self._commands.put(run)
        return await asyncio.wrap_future(fut)

    async def admit(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` as soon as the engine thread does no host work: between steps, or
        while it waits for the device in the middle of one (a decode step lasts milliseconds;
        :meth:`call` would wait for its end). Only for calls that are safe with a step launched
        and not applied: admitting a prefilled request (``add_prefilled``, ``block_table``,
        ``launched_step_waiter``).

        Two ways, whichever comes first runs it (both under the engine lock, so once): a thread
        of its own takes the lock while the engine thread waits for the device, and the engine
        thread runs it with the commands it takes between steps. A CPU step has no such wait: the
        engine thread, stepping, took the lock back at once and an admission waited until it ran
        out of work (0.3-1.5 s on a loaded decode worker)."""
        if self.dead is not None:
            raise EngineDeadError(f"engine died: {self.dead!r}")
        gave_up = threading.Event()
        fut: Future[T | None] = Future()

        def attempt() -> None:  # with the engine lock held
            if fut.running() or fut.done() or not fut.set_running_or_notify_cancel():
                return  # run the other way, or the caller went away
            if gave_up.is_set():
                fut.set_result(None)  # the caller went away first: nothing was done
                return
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # delivered to the caller
                fut.set_exception(e)

        def locked() -> None:
            with self._lock:
                if self.dead is None:
                    attempt()
                elif not (fut.running() or fut.done()) and fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineDeadError(f"engine died: {self.dead!r}"))

        self._commands.put(attempt)
        self._admit_pool.submit(locked)
        try:
            return await asyncio.wrap_future(fut)  # type: ignore[return-value]
        except asyncio.CancelledError:
            gave_up.set()  # before the caller's clean-up posts anything: the order the engine sees
            raise

    def _post_cleanup(self, request_id: str, fn: Callable[[LLMEngine], object]) -> Future[None]:
        """:meth:`post` a clean-up of request ``request_id`` (keyed by its id in the engine): a later
        request of the same id is admitted after it ran (:meth:`_after_predecessor`)."""
        done: Future[None] = Future()

        def run(e: LLMEngine) -> None:
            try:
                fn(e)
            finally:
                done.set_result(None)

        self._cleanups[request_id] = done  # the commands run in order: the last one implies the rest
        loop = self._loop
        if loop is not None:
            done.add_done_callback(lambda _: loop.call_soon_threadsafe(self._forget_cleanup, request_id, done))
        self.post(run)
        return done

    def _forget_cleanup(self, request_id: str, done: Future[None]) -> None:
        if self._cleanups.get(request_id) is done:
            del self._cleanups[request_id]

    def post(self, fn: Callable[[LLMEngine], object]) -> None:
        """Run ``fn(engine)`` on the engine thread without waiting for it (errors are logged)."""

        def run() -> None:
            try:
                fn(self.engine)
            except Exception:
                traceback.print_exc()

        self._commands.put(run)

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int = 0,
        prefill_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Closing the iterator early aborts the request."""
        await self._after_predecessor(request_id)
        stream = self._open(request_id)
        admitted = False

        def add(e: LLMEngine) -> None:
            nonlocal admitted
            e.add_request(request_id, prompt_ids, sampling, priority, prefill_only)
            admitted = True

        try:
            await self.call(add)
        except BaseException:
            self._give_up(request_id, lambda: admitted)
            raise
        async for out in self._drain(request_id, stream, sampling.n):
            yield out

    async def generate_prefilled(
        self, request_id: str, prompt_ids: list[int], first_token: int | None, sampling: SamplingParams,
        fetch: Callable[[list[int], list[int]], Awaitable[Landing]], priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request whose prompt was prefilled elsewhere. ``fetch(block_indices,
        local_block_ids)`` is awaited to fill the missing prompt blocks and returns a
        :class:`Landing`; on failure the prompt is recomputed here. The engine keeps stepping its
        other requests meanwhile; this one joins the batch at the first step after ``fetch``
        returned. ``fetch`` runs in its own task: when the caller goes away first, the blocks are
        freed once it has ended (a transfer may write into them until then).

        ``first_token`` None: the prompt is still prefilling elsewhere; ``fetch`` is awaited even
        with no block to move, and its landing brings the first token. Without one (a failed
        transfer), or with no room here, the request is aborted: :class:`HandoffAbortedError`
        before any output, once nothing writes into its blocks any more. Its stream does not
        repeat the first token either way. A caller that goes away while it waits cancels
        ``fetch`` (which must keep the blocks until no write can land in them, then return)."""
        await self._after_predecessor(request_id)
        stream = self._open(request_id)
        admitted = False
        task: asyncio.Task | None = None

        def add(e: LLMEngine) -> tuple[list[int] | None, list[int], Callable[[], None] | None]:
            nonlocal admitted
            indices = e.add_prefilled(request_id, prompt_ids, first_token, sampling, priority)
            admitted = True
            if indices is None and first_token is None:
                e.abort(request_id)  # no room, and nothing to recompute from: not even queued
                return None, [], None
            table = e.block_table(request_id)
            return indices, table, e.launched_step_waiter([table[i] for i in indices or ()])

        try:
            indices, table, launched = await self.admit(add)
            trace.mark(request_id, "d.admitted")
            if indices is None and first_token is None:
                raise HandoffAbortedError(f"request {request_id!r}: no room for a handle sent ahead")
            if indices is not None:
                task = asyncio.ensure_future(self._fetch(fetch, indices, [table[i] for i in indices], launched,
                                                         first_token is None))
                self._fetches[request_id] = task

                def ready(t: asyncio.Task) -> None:
                    if self._fetches.get(request_id) is t:
                        del self._fetches[request_id]
                    landing = t.result() if not t.cancelled() and t.exception() is None else Landing(False)
                    if first_token is None and landing.first_token is None:  # nothing to recompute from
                        self._post_cleanup(request_id, lambda e: (e.abort(request_id), e.kv_ready(request_id, False)))
                    else:
                        ok, first = landing.ok, landing.first_token
                        self._post_cleanup(request_id, lambda e: e.kv_ready(request_id, ok, first))

                task.add_done_callback(ready)
                landing = await asyncio.shield(task)
                if first_token is None and landing.first_token is None:
                    raise HandoffAbortedError(f"request {request_id!r}: the handle sent ahead did not land")
        except BaseException:
            if first_token is None and task is not None and not task.done():
                # The caller gave up a handle sent ahead (the router's deadline, or its prefill
                # worker failed over): stop waiting for the push. The fetch still keeps the blocks
                # while a write may land in them, then ends, and a reused id proceeds.
                task.cancel()
            self._give_up(request_id, lambda: admitted)
            raise
        async for out in self._drain(request_id, stream):
            yield out

    async def _fetch(self, fetch: Callable[[list[int], list[int]], Awaitable[Landing]], indices: list[int],
                     local: list[int], launched: Callable[[], None] | None, ahead: bool) -> Landing:
        # A block may have been freed by a request whose last step is still running on the
        # device: then the transfer starts once that step is done (waited for off the engine
        # thread); when the launched step touches none of the blocks, at once.
        if launched is not None:
            await asyncio.get_running_loop().run_in_executor(self._launched_pool, launched)
        return await fetch(indices, local) if indices or ahead else Landing(True)

    async def _after_predecessor(self, request_id: str) -> None:
        """Wait until an earlier request of this id has no transfer running and the engine thread
        ran its clean-up (the caller went away and comes back with the same id: the first call's
        blocks are freed first, and its abort cannot reach the second)."""
        task = self._fetches.get(request_id)
        if task is not None:
            await asyncio.wait({task})  # its done callback posts the landing's clean-up
        cleanup = self._cleanups.get(request_id)
        while cleanup is not None and not cleanup.done() and self.dead is None:
            await asyncio.wait({asyncio.wrap_future(cleanup)}, timeout=1.0)  # wakes to see a dead engine

    def take_handed_off(self, request_id: str) -> list[int]:
        """The block table of a prefill-only request whose last output (``finished``,
        ``finish_reason`` None) just came out of :meth:`generate`: the blocks the engine keeps for
        it. Take it on that output, before the stream ends (its end forgets it)."""
        return self._handed_off.pop(request_id)

    async def abort(self, request_id: str) -> None:
        if self.dead is None:
            await asyncio.wrap_future(self._post_cleanup(request_id, lambda e: e.abort(request_id)))

    async def unpin(self, request_id: str) -> bool:
        return await self.call(lambda e: e.unpin(request_id))

    async def wait_events(self, after_id: int, timeout_s: float) -> list[KVEvent]:
        """KV events with ``event_id > after_id``, waiting up to ``timeout_s`` for some."""
        ready = [ev for ev in self.events if ev.event_id > after_id]
        if ready:
            return ready
        waiter = asyncio.Event()
        self._event_waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._event_waiters.discard(waiter)
        return [ev for ev in self.events if ev.event_id > after_id]

    # ---- internals -------------------------------------------------------------------------
    def _give_up(self, request_id: str, admitted: Callable[[], bool]) -> None:
        """The caller stopped (an error, or cancelled) before draining the request's stream:
        abort the request if the engine admitted it (checked on the engine thread, after the
        admitting command ran or was skipped)."""
        self._streams.pop(request_id, None)
        if self.dead is None:
            self._post_cleanup(request_id, lambda e: e.abort(request_id) if admitted() else None)

    def _open(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    async def _drain(self, request_id: str, stream: asyncio.Queue, num_seqs: int = 1
                     ) -> AsyncIterator[RequestOutput]:
        """The request's outputs until each of its ``num_seqs`` sequences has finished."""
        num_finished = 0
        try:
            while num_finished < num_seqs:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    num_finished += 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            self._handed_off.pop(request_id, None)
            if num_finished < num_seqs and self.dead is None:
                await asyncio.shield(self.abort(request_id))

    def _run(self) -> None:
        engine = self.engine
        engine.device_wait = self._unlocked
        self._lock.acquire()
        try:
            while True:
                # Run every queued command; block for one only when there is nothing to compute.
                ran = False
                while True:
                    try:
                        cmd = self._commands.get_nowait() if engine.has_work() else self._unlocked(self._next_command)
                    except queue.Empty:
                        break
                    if cmd is None:
                        return
                    cmd()
                    ran = True
                # The load shows new work before a (long) step computes it: a prefill. Not for a
                # handoff's decode (the step is short): delivering its KV events on the event
                # loop's thread meanwhile would hold up the step's launch (the GIL).
                if ran and engine.has_work() and engine.scheduler.num_queued_prefill_tokens:
                    self._publish([])
                if engine.has_work():
                    self._await_landings()
                    self._publish(engine.step())
                else:
                    self._publish([])
        except BaseException as e:
            traceback.print_exc()
            self.dead = e
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_all, e)
        finally:
            self._lock.release()

    def _await_landings(self) -> None:
        """Before planning a step: while the device still runs the step before and a prefilled
        request's blocks are on their way, wait for commands (its ``kv_ready``, admissions) until
        ``LLMEngine.join_deadline``, so that a request whose blocks land meanwhile is computed in
        the very next step, not the one after (its first decode then comes a step sooner)."""
        engine = self.engine
        while (deadline := engine.join_deadline()) is not None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not engine.device_busy():
                return
            try:
                cmd = self._unlocked(partial(self._commands.get, timeout=min(remaining, _JOIN_POLL_S)))
            except queue.Empty:
                continue
            if cmd is None:
                self._commands.put(None)  # stop: the loop sees it next
                return
            cmd()

    def _unlocked(self, wait: Callable[[], T]) -> T:
        """``wait()`` with the engine lock released (the engine thread waits: ``admit`` may run)."""
        self._lock.release()
        try:
            return wait()
        finally:
            self._lock.acquire()

    def _next_command(self) -> Callable[[], None] | None:
        return self._commands.get(timeout=0.5)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        events = self.engine.take_kv_events()
        self.load = self.engine.load()
        # A handed-off prompt's table, read now: asked for later it would wait for a whole step.
        handed_off = {out.request_id: self.engine.block_table(out.request_id) for out in outputs
                      if out.finished and out.finish_reason is None}
        if (outputs or events) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs, events, handed_off)

    def _deliver(self, outputs: list[RequestOutput], events: list[KVEvent], handed_off: dict[str, list[int]]) -> None:
        self._handed_off.update((rid, table) for rid, table in handed_off.items() if rid in self._streams)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
        if events:
            self.events.extend(events)
            for waiter in self._event_waiters:
                waiter.set()

    def _fail_all(self, error: BaseException) -> None:
        for done in self._cleanups.values():  # the engine thread will run no more commands
            if not done.done():
                done.set_result(None)
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(f"engine died: {error!r}"))
