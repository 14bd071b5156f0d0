"""``AsyncEngine.admit``: a prefilled request is admitted while the engine thread waits for the
device in the middle of a step (``call`` would wait for the step's end: a whole decode step
added to every handoff), with the steps launched still counted as launched; then everything
finishes and every block comes back. The device is the CPU, made to hold each step until the
test lets it run (the step's ``wait``)."""

from __future__ import annotations

import asyncio
import threading
import time

from engine_testlib import make_tiny_llm

from engine.async_engine import AsyncEngine, HandoffAbortedError, Landing
from protocol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = list(range(3, 40))  # 37 tokens: 3 blocks of 16
OTHER = list(range(100, 137))  # shares no block with PROMPT


def hold_steps(llm) -> tuple[threading.Event, threading.Event]:
    """``(gate, waiting)``: each launched step runs on the device only while ``gate`` is set;
    ``waiting`` is set when the engine thread waits for one (the engine lock released)."""
    gate, waiting = threading.Event(), threading.Event()
    launch = llm.runner.launch

    def held_launch(*args, **kwargs):
        handle = launch(*args, **kwargs)
        if handle is not None:
            wait = handle.wait

            def gated() -> None:
                waiting.set()
                gate.wait()
                wait()

            handle.wait = gated
        return handle

    llm.runner.launch = held_launch
    return gate, waiting


def test_admit_runs_while_the_engine_waits_for_the_device(tiny_llama_path: str) -> None:
    llm = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    gate, waiting = hold_steps(llm)

    def admit_r1(e):
        indices = e.add_prefilled("r1", OTHER, 7, GREEDY)
        mine = [e.block_table("r1")[i] for i in indices]
        return indices, e.launched_step_waiter(e.block_table("r0")), e.launched_step_waiter(mine)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        try:
            stream = engine.generate("r0", PROMPT, GREEDY)
            first = asyncio.ensure_future(anext(stream))
            await asyncio.to_thread(waiting.wait)  # the engine thread waits for a launched step
            admitted = asyncio.ensure_future(engine.admit(admit_r1))
            await asyncio.wait({admitted}, timeout=30)  # a liveness guard: it must not need the gate
            assert admitted.done() and not gate.is_set()
            indices, r0_waiter, r1_waiter = admitted.result()
            assert indices == [0, 1, 2]
            assert r0_waiter is not None  # r0's steps are launched (one waited for, one queued)
            assert r1_waiter is None  # r1's blocks are in none of them
        finally:
            gate.set()
        tokens = (await first).new_token_ids + [t async for out in stream for t in out.new_token_ids]
        assert len(tokens) == 4
        await engine.abort("r1")
        await engine.call(lambda e: e.kv_ready("r1", False))  # its (aborted) transfer ended: blocks freed
        bm = llm.block_manager
        assert await engine.call(lambda e: bm.num_free_blocks) == bm.num_blocks
        await engine.stop()

    asyncio.run(main())


STEP_S = 0.5  # the emulated device's time per step: long beside the CPU's planning, however loaded


def test_prefilled_request_joins_the_step_after_the_running_one(tiny_llama_path: str) -> None:
    """Asynchronous scheduling queues step N+1 behind the running step N. A prefilled request
    whose blocks land while N runs is planned into N+1 (the engine waits for the landing before
    planning, up to shortly before N is expected to end), not into N+2: its first decode comes
    a step sooner. The device is emulated: each step runs STEP_S after the one before it."""
    llm = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    launch = llm.runner.launch
    steps: list[tuple[float, float, set[str]]] = []  # (device start, device end, requests) per step

    def timed_launch(output, *args, **kwargs):
        handle = launch(output, *args, **kwargs)  # computed here, on the CPU; the device is emulated
        if handle is not None:
            start = max(time.perf_counter(), steps[-1][1] if steps else 0.0)
            end = start + STEP_S
            steps.append((start, end, {s.request.request_id for s in output.scheduled}))
            handle.wait = lambda: time.sleep(max(0.0, end - time.perf_counter()))
            handle.done = lambda: time.perf_counter() >= end
        return handle

    llm.runner.launch = timed_launch
    landed = asyncio.Event()

    async def fetch(indices: list[int], local: list[int]) -> Landing:
        await landed.wait()
        return Landing(True)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        r0 = engine.generate("r0", PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        r1 = engine.generate_prefilled("r1", OTHER, 7, GREEDY, fetch)
        try:
            await anext(r0)
            while len(steps) < 4:  # the engine has timed steps that ran back to back
                await asyncio.sleep(0.01)
            first = asyncio.ensure_future(anext(r1))
            while "r1" not in llm.scheduler.pulling:
                await asyncio.sleep(0.005)
            # Land a quarter into the step after the one running now: the step after that one
            # was planned, without waiting, as soon as the device began it.
            next_start = min(e for _, e, _ in steps if e > time.perf_counter())
            await asyncio.sleep(max(0.0, next_start + STEP_S / 4 - time.perf_counter()))
            t_land = time.perf_counter()
            landed.set()
            assert (await first).new_token_ids
            running_end = next(e for s, e, _ in steps if s <= t_land < e)
            joined = next(s for s, _, ids in steps if "r1" in ids)
            assert joined == running_end, f"joined {(joined - running_end) / STEP_S:+.1f} steps late"
        finally:
            await r0.aclose()
            await r1.aclose()
            await engine.stop()

    asyncio.run(main())


def test_load_is_published_before_a_prefill_step_not_before_a_handoff_decode(tiny_llama_path: str) -> None:
    """A new request's work shows in the published load (and its KV events) before the step
    that prefills it; a handed-off request's blocks do not publish before the step that decodes
    it: on a GPU, delivering its KV events on the event loop's thread held up that step's launch."""
    llm = make_tiny_llm(tiny_llama_path).engine
    seen: list[tuple[str, object]] = []
    launch, kv_ready, add_request = llm.runner.launch, llm.kv_ready, llm.add_request

    def record(name, fn, key):
        def wrapped(*args, **kwargs):
            seen.append((name, key(*args)))
            return fn(*args, **kwargs)
        return wrapped

    llm.runner.launch = record("launch", launch, lambda output, *_: {s.request.request_id for s in output.scheduled})
    llm.kv_ready = record("ready", kv_ready, lambda rid, *_: rid)
    llm.add_request = record("add", add_request, lambda rid, *_: rid)

    async def landed(indices: list[int], local: list[int]) -> Landing:
        return Landing(True)

    async def main() -> None:
        engine = AsyncEngine(llm)
        publish = engine._publish
        engine._publish = record("publish", publish, lambda outputs: len(outputs))
        engine.start()
        try:
            assert [out async for out in engine.generate_prefilled("r1", OTHER, 7, GREEDY, landed)]
            assert [out async for out in engine.generate("r2", PROMPT, GREEDY)]
        finally:
            await engine.stop()

    asyncio.run(main())

    def between(start: tuple[str, object], rid: str) -> list[tuple[str, object]]:
        i = seen.index(start)
        j = next(k for k in range(i, len(seen)) if seen[k][0] == "launch" and rid in seen[k][1])
        return seen[i + 1:j]

    assert ("publish", 0) in between(("add", "r2"), "r2")
    assert not [e for e in between(("ready", "r1"), "r1") if e[0] == "publish"]


def test_a_request_admitted_before_its_first_token_decodes_from_the_landed_one(tiny_llama_path: str) -> None:
    """A handle sent ahead: the request is admitted with no first token; the landing brings it, and
    the outputs are those of a request admitted with it. A landing without one aborts the request
    (no recompute: there is no first token to continue from), frees its blocks, and the same id
    is served again at once."""
    llm = make_tiny_llm(tiny_llama_path).engine
    total = llm.load().num_free_blocks
    fetched: list[list[int]] = []

    async def lands_with_7(indices: list[int], local: list[int]) -> Landing:
        fetched.append(indices)
        return Landing(True, 7)

    async def fails(indices: list[int], local: list[int]) -> Landing:
        return Landing(False)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        try:
            prompt = OTHER[:32]
            known = engine.generate_prefilled("known", prompt, 7, GREEDY, lands_with_7)
            want = [t async for out in known for t in out.new_token_ids]
            ahead = engine.generate_prefilled("ahead", prompt, None, GREEDY, lands_with_7)
            got = [t async for out in ahead for t in out.new_token_ids]
            assert got == want and len(got) == GREEDY.max_tokens - 1  # the first token is not repeated
            # 32 tokens, two whole blocks: cached by the first request, so none moved; the token still came
            assert fetched == [[0, 1], []]
            failed = engine.generate_prefilled("reused", PROMPT, None, GREEDY, fails)
            try:
                await anext(failed)
                raise AssertionError("a landing without a first token must abort the request")
            except HandoffAbortedError:
                pass
            again = [o async for o in engine.generate("reused", PROMPT, GREEDY)]
            assert sum(len(o.new_token_ids) for o in again) == GREEDY.max_tokens
            assert engine.load.num_running == 0
        finally:
            await engine.stop()
        assert llm.load().num_free_blocks == total

    asyncio.run(main())


def test_a_reused_id_is_admitted_only_after_its_predecessors_clean_up(tiny_llama_path: str) -> None:
    """The router gives a handle sent ahead up and calls the same decode worker again with the
    same id and the whole handle (its KV push hung). The first call's fetch ends later (it keeps the
    blocks while a write may land), and its clean-up (abort, failed landing) is posted to the engine
    thread while that thread waits for the device in another request's step: ``admit`` would run
    the second call's admission at once, ahead of that clean-up, which then aborted the second
    request (its client waited for ever). The second call must be admitted after the clean-up and
    get its whole answer, and every block must come back."""
    llm = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    total = llm.load().num_free_blocks
    running, held = hold_steps(llm)  # steps run while `running` is set
    push_over = asyncio.Event()

    async def hung_push(indices: list[int], local: list[int]) -> Landing:
        try:
            await push_over.wait()
        except asyncio.CancelledError:  # given up: keep the blocks until the write cannot land
            await push_over.wait()
        return Landing(False)

    async def lands(indices: list[int], local: list[int]) -> Landing:
        return Landing(True)

    async def hold_the_device() -> None:
        running.clear()
        held.clear()
        await asyncio.to_thread(held.wait, 30)  # the engine thread waits for a step (lock released)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        long = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
        other = engine.generate("other", OTHER, long)  # keeps the engine stepping throughout
        other_first = asyncio.ensure_future(anext(other))
        try:
            await asyncio.to_thread(held.wait, 30)
            ahead = engine.generate_prefilled("reused", PROMPT, None, GREEDY, hung_push)
            first_call = asyncio.ensure_future(anext(ahead))
            while "reused" not in llm.scheduler.pulling:
                await asyncio.sleep(0.005)
            first_call.cancel()  # the router's deadline past the prefill's answer
            await asyncio.gather(first_call, return_exceptions=True)
            running.set()  # the first call's abort runs; its blocks stay while its fetch runs
            while await engine.call(lambda e: e.has_request("reused")):
                await asyncio.sleep(0.01)
            await hold_the_device()
            again = engine.generate_prefilled("reused", PROMPT, 7, GREEDY, lands)
            second_call = asyncio.ensure_future(anext(again))
            push_over.set()  # the hung push ends: its clean-up is queued behind the held step
            await asyncio.sleep(0.5)  # time enough for an admission that does not wait for it
            running.set()
            out = await asyncio.wait_for(second_call, 30)
            tokens = out.new_token_ids + [t async for o in again for t in o.new_token_ids]
            assert len(tokens) == GREEDY.max_tokens - 1  # the first token (7) came from the prefill
        finally:
            running.set()
            await other_first
            async for _ in other:  # to its end (an early aclose leaves the inner stream to the GC)
                pass
            await engine.stop()
        assert llm.load().num_free_blocks == total

    asyncio.run(main())


def test_admit_runs_between_steps_when_the_lock_never_comes_free(tiny_llama_path: str) -> None:
    """A CPU step has no device wait: a stepping engine thread takes its lock back at once. An
    admission is then run by the engine thread between two steps (here its own thread is kept
    busy, so that is the only way), while the running request goes on, and only once."""
    llm = make_tiny_llm(tiny_llama_path).engine
    calls: list[int] = []

    def admit_r1(e):
        calls.append(e.num_steps)
        return e.add_prefilled("r1", OTHER, 7, GREEDY)

    async def main() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        blocker = threading.Event()
        engine._admit_pool.submit(blocker.wait)  # the admission's own thread is taken
        stream = engine.generate("r0", PROMPT, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        try:
            await anext(stream)
            indices = await asyncio.wait_for(engine.admit(admit_r1), 10)
            assert indices is not None and llm.has_request("r0")  # admitted while r0 decodes
            blocker.set()
            await asyncio.sleep(0.05)
            assert len(calls) == 1
        finally:
            blocker.set()
            await stream.aclose()
            await engine.abort("r1")
            await engine.stop()

    asyncio.run(main())
