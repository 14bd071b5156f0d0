"""The generated worker stubs work end to end: a real grpc.aio server on 127.0.0.1 and a
real client, unary and server-streaming calls, and an rpc left unimplemented."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

EVENTS = [
    pb.KVEvent(event_id=0, block_stored=pb.BlockStored(block_hash=2**64 - 1, parent_hash=0,
                                                       token_ids=[1, 2, 3, 4])),
    pb.KVEvent(event_id=1, block_stored=pb.BlockStored(block_hash=7, parent_hash=2**64 - 1,
                                                       token_ids=[5, 6, 7, 8])),
    pb.KVEvent(event_id=2, block_removed=pb.BlockRemoved(block_hash=7)),
    pb.KVEvent(event_id=3, all_blocks_cleared=pb.AllBlocksCleared()),
]


class FakeWorker(pb_grpc.WorkerServiceServicer):
    """Health and KVEvents only; every other rpc keeps the generated UNIMPLEMENTED."""

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        load = pb.Load(num_waiting=2, num_running=3, num_total_blocks=100, num_free_blocks=75, kv_usage=0.25)
        return pb.HealthResponse(status=pb.WORKER_STATUS_SERVING, worker_id="w0",
                                 role=pb.WORKER_ROLE_DECODE, model="m", block_size=16, load=load)

    async def KVEvents(self, request: pb.KVEventsRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.KVEventsResponse]:
        if request.from_event_id >= len(EVENTS):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"no event {request.from_event_id}")
        wanted = EVENTS[request.from_event_id:]
        for start in range(0, len(wanted), 2):  # two events per message
            yield pb.KVEventsResponse(events=wanted[start:start + 2])


async def _serve_and_call() -> None:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(FakeWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.WorkerServiceStub(channel)

            health = await stub.Health(pb.HealthRequest(), timeout=10)
            assert health.status == pb.WORKER_STATUS_SERVING
            assert (health.worker_id, health.role, health.block_size) == ("w0", pb.WORKER_ROLE_DECODE, 16)
            load = health.load
            assert (load.num_waiting, load.num_running, load.num_free_blocks) == (2, 3, 75)
            assert load.kv_usage == pytest.approx(0.25)

            batches = [b async for b in stub.KVEvents(pb.KVEventsRequest(from_event_id=1), timeout=10)]
            events = [e for batch in batches for e in batch.events]
            assert [len(b.events) for b in batches] == [2, 1]
            assert [e.event_id for e in events] == [1, 2, 3]
            assert [e.WhichOneof("event") for e in events] == ["block_stored", "block_removed",
                                                                "all_blocks_cleared"]
            assert events[0].block_stored.parent_hash == 2**64 - 1  # fixed64 round-trips all 64 bits
            assert list(events[0].block_stored.token_ids) == [5, 6, 7, 8]

            with pytest.raises(grpc.aio.AioRpcError) as gap:
                async for _ in stub.KVEvents(pb.KVEventsRequest(from_event_id=99), timeout=10):
                    pass
            assert gap.value.code() == grpc.StatusCode.OUT_OF_RANGE

            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                await stub.Unpin(pb.UnpinRequest(request_id="r"), timeout=10)
            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace=None)


def test_health_and_kv_events_over_a_real_channel() -> None:
    asyncio.run(_serve_and_call())


def test_optional_fields_keep_presence_and_handles_round_trip() -> None:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=8)
    assert sampling.HasField("temperature") and sampling.temperature == 0.0  # greedy, not "unset"
    assert not sampling.HasField("top_p") and not sampling.HasField("seed")
    handle = pb.KVHandle(request_id="r1", worker_id="p0", worker_endpoint="127.0.0.1:1",
                         transport_metadata=b"\x00\xff", block_ids=[4, 9, 2], num_tokens=40, first_token_ids=[11])
    request = pb.GenerateRequest(request_id="r1", prompt_token_ids=list(range(40)), sampling=sampling,
                                 kv_handle=handle)
    decoded = pb.GenerateRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.HasField("kv_handle") and not pb.GenerateRequest(request_id="r2").HasField("kv_handle")
    output = pb.SequenceOutput(index=0, token_ids=[11], finish_reason=pb.FINISH_REASON_STOP, stop_token_id=11)
    assert output.WhichOneof("stop_reason") == "stop_token_id"


def test_workers_are_token_in_token_out() -> None:
    """Text fields do not exist on the worker protocol: stop strings are the router's."""
    for field in ("stop", "include_stop_str_in_output", "skip_special_tokens"):
        with pytest.raises(ValueError, match=field):
            pb.SamplingParams(**{field: ["x"] if field == "stop" else True})
    with pytest.raises(ValueError, match="stop_str"):
        pb.SequenceOutput(stop_str="x")
