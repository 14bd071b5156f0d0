"""``AsyncEngine.admit``: a prefilled request is admitted while the engine thread waits for the
device in the middle of a step (``call`` would wait for the step's end: a whole decode step
added to every handoff), with the steps launched still counted as launched; then everything
finishes and every block comes back. The device is the CPU, made to hold each step until the
test lets it run (the step's ``wait``)."""

from __future__ import annotations

import asyncio
import threading

from engine_testlib import make_tiny_llm

from engine.async_engine import AsyncEngine
from protocol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = list(range(3, 40))  # 37 tokens: 3 blocks of 16
OTHER = list(range(100, 137))  # shares no block with PROMPT


def test_admit_runs_while_the_engine_waits_for_the_device(tiny_llama_path: str) -> None:
    llm = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    gate, waiting = threading.Event(), threading.Event()
    launch = llm.runner.launch

    def held_launch(*args, **kwargs):  # the step runs on the device only once the gate opens
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
