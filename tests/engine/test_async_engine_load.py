"""An engine's published load is its real one from the start: before its first step, a worker
reports its KV cache's total (and free) blocks, not zeros (what ``Membership`` publishes to etcd
and the worker's /metrics serves, both read from ``AsyncEngine.load``)."""

from __future__ import annotations

import asyncio

from engine.async_engine import AsyncEngine
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine


def test_load_reports_the_kv_capacity_before_the_first_step() -> None:
    llm = LLMEngine(EngineConfig(model="dummy:smollm2-135m", backend="sim", cache=CacheConfig(block_size=4)),
                    progress=False)
    total = llm.block_manager.num_blocks
    assert total > 0 and llm.num_steps == 0

    async def idle_started() -> None:
        engine = AsyncEngine(llm)
        load = engine.load  # before the engine thread starts
        assert (load.num_total_blocks, load.num_free_blocks, load.kv_usage) == (total, total, 0.0)
        engine.start()
        try:
            await asyncio.sleep(0.6)  # idle: the engine thread waits for commands, takes no step
            assert llm.num_steps == 0
            assert (engine.load.num_total_blocks, engine.load.num_free_blocks) == (total, total)
        finally:
            await engine.stop()

    asyncio.run(idle_started())
