"""The prefill worker's one owner of held KV blocks (``prefill_worker.held.HeldBlocks``), on a real
``AsyncEngine`` (sim backend: no weights): every way a hold ends frees the engine's blocks exactly
once and is counted by its reason; a push keeps them from every other release until it ends; the
lease runs on the owner's one clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from prefill_worker.held import HeldBlocks
from protocol.sampling import SamplingParams

PROMPT = list(range(100, 140))  # 40 tokens: 10 blocks of 4
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _released(reason: str) -> float:
    return REGISTRY.get_sample_value("tandem_kv_held_releases_total", {"reason": reason}) or 0.0


async def _engine() -> AsyncEngine:
    llm = LLMEngine(EngineConfig(model="dummy:smollm2-135m", backend="sim",
                                 cache=CacheConfig(block_size=4, num_blocks=64)), progress=False)
    engine = AsyncEngine(llm)
    engine.start()
    return engine


async def _prefill(engine: AsyncEngine, held: HeldBlocks, rid: str) -> list[int]:
    async for out in engine.generate(rid, PROMPT, GREEDY, prefill_only=True):
        assert out.finished and out.finish_reason is None
    table = await engine.call(lambda e: e.block_table(rid))
    held.hold(rid, table)
    return table


async def _pinned(engine: AsyncEngine) -> int:
    return await engine.call(lambda e: e.scheduler.num_pinned_blocks)


async def _until(check: Callable[[], object]) -> None:
    deadline = time.monotonic() + 60  # only stops a hang: the engine thread may be slow on a loaded machine
    while not await check():  # type: ignore[misc]
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def _run(coro_fn: Callable) -> None:
    async def main() -> None:
        engine = await _engine()
        clock = Clock()
        try:
            await coro_fn(engine, HeldBlocks(engine, lease_s=30.0, clock=clock), clock)
        finally:
            await engine.stop()

    asyncio.run(main())


@pytest.mark.parametrize("reason", ["unpinned", "aborted", "cancelled"])
def test_a_release_frees_the_blocks_once(reason: str) -> None:
    async def body(engine: AsyncEngine, held: HeldBlocks, clock: Clock) -> None:
        table = await _prefill(engine, held, "r1")
        assert await _pinned(engine) == len(table) == 10
        before = _released(reason)
        assert held.release("r1", reason) and "r1" not in held
        await _until(lambda: _is(engine, 0))
        assert _released(reason) - before == 1
        assert not held.release("r1", reason)  # twice: nothing more, not counted again
        assert held.take("r1") is None
        assert _released(reason) - before == 1

    _run(body)


async def _is(engine: AsyncEngine, n: int) -> bool:
    return await _pinned(engine) == n


def test_the_lease_ends_on_the_owners_clock() -> None:
    async def body(engine: AsyncEngine, held: HeldBlocks, clock: Clock) -> None:
        await _prefill(engine, held, "old")
        clock.now += 20
        await _prefill(engine, held, "new")
        assert held.renew("old")  # a new lease from now: 30 s more
        clock.now += 25
        assert held.reap() == 0
        before = _released("lease")
        clock.now += 10  # "new" is 35 s old, "old" renewed 35 s ago
        assert held.reap() == 2 and len(held) == 0
        assert _released("lease") - before == 2
        await _until(lambda: _is(engine, 0))

    _run(body)


def test_a_push_owns_the_blocks_until_it_ends() -> None:
    async def body(engine: AsyncEngine, held: HeldBlocks, clock: Clock) -> None:
        table = await _prefill(engine, held, "r1")
        assert held.take("r1") == table
        assert held.take("r1") is None  # one push at a time
        clock.now += 3600
        assert held.reap() == 0  # out of the lease's reach
        assert held.release("r1", "aborted")  # answered, but the push still reads them
        assert held.release("r1", "unpinned")
        # _pinned runs on the engine thread after whatever the releases posted there (one FIFO
        # queue), so a release that freed the blocks under the push shows here, without a sleep.
        assert await _pinned(engine) == len(table)
        before = _released("pushed")
        held.end_push("r1")
        await _until(lambda: _is(engine, 0))
        assert _released("pushed") - before == 1 and "r1" not in held

    _run(body)


def test_a_release_before_the_hold_frees_what_the_engine_kept() -> None:
    """The caller went away between the prefill's end and ``hold``: the engine's blocks still go."""
    async def body(engine: AsyncEngine, held: HeldBlocks, clock: Clock) -> None:
        async for _ in engine.generate("r1", PROMPT, GREEDY, prefill_only=True):
            pass
        assert await _pinned(engine) == 10
        assert not held.release("r1", "cancelled")
        await _until(lambda: _is(engine, 0))
        with pytest.raises(ValueError, match="reason"):
            held.release("r1", "because")

    _run(body)
