"""The event plane, router side: events applied in order; a gap, a reordering or a lost
history makes the router take a snapshot and converge; a worker that leaves disappears; a
restarted worker is re-read. Against a scripted worker, then a real one over gRPC (the sim
engine behind the real worker servicer)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest

from engine.async_engine import AsyncEngine
from engine.block_manager import BlockManager
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from protocol.kv_events import BlockRemoved, BlockStored, KVEvent
from protocol.model_card import ModelCard
from protocol.sampling import SamplingParams
from router.kv_events import EventCursor, KVEventFeed
from router.kv_index import KVIndex
from runtime.convert import event_to_pb
from runtime.discovery import WorkerInfo
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from worker.server import WorkerIdentity, WorkerServicer

BS = 4


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---- the cursor alone ----------------------------------------------------------------------------
def test_cursor_applies_in_order_skips_replays_and_stops_at_a_gap() -> None:
    index = KVIndex(BS)
    cursor = EventCursor(index, "w")
    assert not cursor.apply([BlockStored(0, 1, 0, ())])  # no snapshot yet
    cursor.load_snapshot([7], next_event_id=5)
    assert cursor.apply([BlockStored(3, 99, 0, ()), BlockStored(5, 1, 0, ()), BlockStored(6, 2, 1, ())])
    assert index.blocks_of("w") == {7, 1, 2} and cursor.next_event_id == 7  # event 3 was in the snapshot
    assert not cursor.apply([BlockRemoved(8, 1)])  # 7 is missing
    assert cursor.next_event_id is None and cursor.stats.num_gaps == 1
    assert index.blocks_of("w") == {7, 1, 2}


# ---- a scripted worker ---------------------------------------------------------------------------
def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


class ScriptedWorker:
    """KVSnapshot and KVEvents over a real block manager; ``faults`` (one per stream opened)
    rewrite what a stream sends."""

    def __init__(self) -> None:
        self.bm = BlockManager(num_blocks=16, block_size=BS)
        self.history: list[KVEvent] = []
        self.faults: list[Callable[[list[KVEvent]], list[KVEvent]] | Exception | None] = []
        self.num_streams = 0
        self._new = asyncio.Event()

    def serve(self, seed: int, num_tokens: int = 3 * BS + 1) -> None:
        prompt = tokens(seed, num_tokens)
        rid = f"r{seed}"
        assert self.bm.allocate(rid, len(prompt), self.bm.match_prefix(prompt)) is not None
        self.bm.commit(rid, prompt, len(prompt))
        self.bm.free(rid)
        self.history.extend(self.bm.take_events())
        self._new.set()

    async def KVSnapshot(self, request: pb.KVSnapshotRequest, timeout: float | None = None) -> pb.KVSnapshotResponse:
        blocks, next_id = self.bm.snapshot()
        return pb.KVSnapshotResponse(blocks=[pb.CachedBlock(block_hash=h, parent_hash=p) for h, p in blocks],
                                     next_event_id=next_id, worker_id="w", block_size=BS)

    def KVEvents(self, request: pb.KVEventsRequest) -> _Stream:
        fault = self.faults.pop(0) if self.faults else None
        self.num_streams += 1
        return _Stream(self, request.from_event_id, fault)


class _Stream:
    def __init__(self, worker: ScriptedWorker, cursor: int, fault) -> None:
        self.worker, self.cursor, self.fault = worker, cursor, fault

    def cancel(self) -> None:
        pass

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> pb.KVEventsResponse:
        if isinstance(self.fault, Exception):
            raise self.fault
        while True:
            ready = [ev for ev in self.worker.history if ev.event_id >= self.cursor]
            if ready:
                break
            self.worker._new.clear()
            await self.worker._new.wait()
        self.cursor = ready[-1].event_id + 1
        if self.fault is not None:
            ready = self.fault(ready)
        return pb.KVEventsResponse(events=[event_to_pb(ev) for ev in ready])


def run_scripted(script: Callable[[ScriptedWorker, KVEventFeed], object]) -> None:
    async def main() -> None:
        worker = ScriptedWorker()
        index = KVIndex(BS)
        feed = KVEventFeed(index, connect=lambda endpoint: worker)
        try:
            await script(worker, feed)
        finally:
            await feed.stop()

    asyncio.run(main())


INFO = {"w": WorkerInfo(worker_id="w", role="decode", endpoint="scripted:1", model=ModelCard("m", 4096), block_size=BS)}


def converged(worker: ScriptedWorker, feed: KVEventFeed) -> bool:
    return feed.index.blocks_of("w") == set(worker.bm._cached)


@pytest.mark.parametrize("fault", ["gap", "reorder"])
def test_gap_or_reordering_triggers_a_snapshot_and_converges(fault: str) -> None:
    def drop_second(events: list[KVEvent]) -> list[KVEvent]:
        return events[:1] + events[2:]

    def swap_first_two(events: list[KVEvent]) -> list[KVEvent]:
        return [events[1], events[0], *events[2:]]

    async def script(worker: ScriptedWorker, feed: KVEventFeed) -> None:
        worker.serve(0)
        worker.faults = [drop_second if fault == "gap" else swap_first_two]
        feed.sync(INFO)
        sub = feed.subscription("w")
        await until(lambda: sub.stats.num_snapshots == 1)
        worker.serve(1)  # the first stream mangles these events
        await until(lambda: sub.stats.num_gaps == 1 and sub.stats.num_snapshots == 2)
        await until(lambda: converged(worker, feed))
        for seed in range(2, 8):  # evictions: removed events too; the second stream is clean
            worker.serve(seed)
        await until(lambda: converged(worker, feed) and sub.cursor.next_event_id == len(worker.history))
        assert sub.stats.num_gaps == 1 and worker.num_streams == 2
        assert any(isinstance(ev, BlockRemoved) for ev in worker.history)

    run_scripted(script)


def test_lost_history_out_of_range_triggers_a_snapshot() -> None:
    async def script(worker: ScriptedWorker, feed: KVEventFeed) -> None:
        worker.faults = [rpc_error(grpc.StatusCode.OUT_OF_RANGE), rpc_error(grpc.StatusCode.UNAVAILABLE)]
        worker.serve(0)
        feed.sync(INFO)
        sub = feed.subscription("w")
        await until(lambda: sub.stats.num_snapshots == 3 and worker.num_streams == 3)
        worker.serve(1)
        await until(lambda: converged(worker, feed))
        assert sub.stats.num_errors == 2

    run_scripted(script)


def test_worker_leaving_is_unsubscribed_and_dropped() -> None:
    async def script(worker: ScriptedWorker, feed: KVEventFeed) -> None:
        worker.serve(0)
        feed.sync(INFO)
        await until(lambda: converged(worker, feed) and feed.index.num_blocks > 0)
        task = feed._subs["w"][2]
        feed.sync({})
        assert feed.index.workers == [] and feed.index.num_blocks == 0
        assert feed.subscription("w") is None
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()

    run_scripted(script)


def test_worker_with_another_block_size_is_not_indexed() -> None:
    async def script(worker: ScriptedWorker, feed: KVEventFeed) -> None:
        feed.sync({"w": WorkerInfo(worker_id="w", role="decode", endpoint="x:1", model=ModelCard("m", 4096),
                                   block_size=2 * BS)})
        assert feed.subscription("w") is None

    run_scripted(script)


# ---- a real worker over gRPC ---------------------------------------------------------------------
async def start_worker(port: int = 0) -> tuple[grpc.aio.Server, AsyncEngine, int]:
    config = EngineConfig(model="dummy:smollm2-135m", backend="sim", cache=CacheConfig(block_size=BS, num_blocks=32))
    engine = AsyncEngine(LLMEngine(config, progress=False))
    engine.start()
    server = grpc.aio.server()
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    pb_grpc.add_WorkerServiceServicer_to_server(
        WorkerServicer(WorkerIdentity("decode", "w", f"127.0.0.1:{port}", "sim", BS), engine, None), server)
    await server.start()
    return server, engine, port


async def generate(engine: AsyncEngine, rid: str, prompt: list[int]) -> None:
    async for _ in engine.generate(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
        pass


async def cached_set(engine: AsyncEngine) -> set[int]:
    return await engine.call(lambda e: {h for h, _ in e.kv_snapshot()[0]})


def test_real_worker_events_converge_and_a_restart_is_reread() -> None:
    async def main() -> None:
        server, engine, port = await start_worker()
        index = KVIndex(BS)
        feed = KVEventFeed(index)
        info = {"w": WorkerInfo(worker_id="w", role="decode", endpoint=f"127.0.0.1:{port}",
                                model=ModelCard("sim", 4096), block_size=BS)}
        try:
            feed.sync(info)
            for i in range(12):  # 32 blocks: the later prompts evict the earlier ones
                await generate(engine, f"a{i}", tokens(i, 5 * BS + 1))
            want = await cached_set(engine)
            await until(lambda: index.blocks_of("w") == want)
            assert feed.subscription("w").stats.num_events > len(want)  # stored and removed

            # The worker restarts on the same address: a new cache, event ids from 0 again.
            await server.stop(grace=None)
            await engine.stop()
            server, engine, _ = await start_worker(port)
            await generate(engine, "b", tokens(99, 3 * BS + 1))
            want = await cached_set(engine)
            await until(lambda: index.blocks_of("w") == want, timeout_s=20)
            assert feed.subscription("w").stats.num_snapshots >= 2

            # An event id beyond the worker's next one (from before its restart) is refused.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = pb_grpc.WorkerServiceStub(channel).KVEvents(pb.KVEventsRequest(from_event_id=10**6))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stream.read()
                assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        finally:
            await feed.stop()
            await server.stop(grace=None)
            await engine.stop()

    asyncio.run(main())
