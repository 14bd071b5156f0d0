"""The router's own in-flight accounting, without a cluster: a request counts on its decode
worker from the routing decision on, including while its prompt prefills on the prefill tier,
so that requests routed meanwhile see that worker busy; and it stops counting whatever way the
request ends; and the decode worker is called before the first token goes out. Workers are
fake stubs; the routing core is the real one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from protocol.model_card import ModelCard
from protocol.sampling import SamplingParams
from router.errors import WorkerFailedError
from router.request_flow import RequestFlow
from runtime.discovery import WorkerInfo
from runtime.pb import tandem_worker_pb2 as pb
from runtime.settings import ClusterConfig

BS = 16
PROMPT = 300  # over max_local_prefill_tokens: prefilled on the prefill tier


class FakePrefill:
    """Prefill answers when the test releases it (or fails, with ``fail``)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail = False
        self.calls: list[pb.PrefillRequest] = []

    async def Prefill(self, req: pb.PrefillRequest) -> pb.PrefillResponse:  # the gRPC method name
        self.calls.append(req)
        await self.release.wait()
        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        return pb.PrefillResponse(
            handle=pb.KVHandle(request_id=req.request_id, worker_id="p0"),
            outputs=[pb.SequenceOutput(index=0, token_ids=[7])],
            usage=pb.Usage(num_prompt_tokens=len(req.prompt_token_ids), num_completion_tokens=1))

    async def Abort(self, req: pb.AbortRequest, timeout: float) -> pb.AbortResponse:  # the gRPC method name
        return pb.AbortResponse(aborted=True)


class FakeCall:
    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        await self.gate.wait()
        yield pb.GenerateResponse(outputs=[pb.SequenceOutput(index=0, token_ids=[8])])
        yield pb.GenerateResponse(usage=pb.Usage(num_prompt_tokens=PROMPT, num_completion_tokens=1))


class FakeDecode:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[pb.GenerateRequest] = []

    def Generate(self, req: pb.GenerateRequest) -> FakeCall:  # the gRPC method name
        self.calls.append(req)
        return FakeCall(self.gate)


def make_core() -> tuple[RequestFlow, FakePrefill, dict[str, FakeDecode]]:
    cfg = ClusterConfig(mode="disaggregated", routing_policy="kv", kv_events=False, max_local_prefill_tokens=64)
    core = RequestFlow(cfg, plane=None)  # type: ignore[arg-type]  (no I/O: workers set below)
    prefill, decodes = FakePrefill(), {"d0": FakeDecode(), "d1": FakeDecode()}
    for pool, ids in ((core.prefill, ["p0"]), (core.decode, list(decodes))):
        pool.workers._workers = {w: WorkerInfo(w, pool.role, f"127.0.0.1:{9000 + i}", ModelCard("m", 4096), BS)
                                 for i, w in enumerate(ids)}
    core.prefill.stub = lambda _w: prefill  # type: ignore[method-assign]
    core.decode.stub = lambda w: decodes[w]  # type: ignore[method-assign]
    return core, prefill, decodes


def counted(core: RequestFlow) -> dict[str, tuple[int, int, int]]:
    return {w: (e.num_requests, e.num_prefill_tokens, e.num_kv_tokens) for w, e in core.decode.inflight.items()
            if e.num_requests}


async def collect(agen) -> list:
    return [x async for x in agen]


async def until(check: Callable[[], object], what: str) -> None:
    """Let the routing core's tasks run until ``check()`` holds (the deadline only stops a hang)."""
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0)


def test_decode_worker_counts_a_request_while_its_prompt_prefills_remotely() -> None:
    async def main() -> None:
        core, prefill, decodes = make_core()
        prompts = [list(range(1000 * i, 1000 * i + PROMPT)) for i in (1, 2)]
        first = asyncio.create_task(collect(core.generate("a", prompts[0], SamplingParams(max_tokens=2))))
        await until(lambda: len(prefill.calls) == 1, "a routed; waiting on the prefill worker")
        (_worker, load), = counted(core).items()
        assert load == (1, 0, PROMPT)  # one request, no prompt token to compute there, its KV to come
        second = asyncio.create_task(collect(core.generate("b", prompts[1], SamplingParams(max_tokens=2))))
        await until(lambda: len(prefill.calls) == 2, "b routed; waiting on the prefill worker")
        # Costs 32 * 19 + 19 (the busy one) against 32 * 19: the second goes to the other worker.
        assert counted(core) == {"d0": (1, 0, PROMPT), "d1": (1, 0, PROMPT)}
        prefill.release.set()
        await until(lambda: all(d.calls for d in decodes.values()), "both on their decode workers")
        for d in decodes.values():
            assert [c.kv_handle.request_id for c in d.calls] and d.calls[0].HasField("kv_handle")
            d.gate.set()
        for task in (first, second):
            assert len(await task) == 3  # the first token (from the prefill tier), one more, usage
        assert counted(core) == {}

    asyncio.run(main())


def test_remote_prefill_failure_counts_the_prompt_on_the_decode_worker() -> None:
    async def main() -> None:
        core, prefill, decodes = make_core()
        task = asyncio.create_task(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))))
        await until(lambda: prefill.calls, "routed; waiting on the prefill worker")
        (worker, load), = counted(core).items()
        assert load == (1, 0, PROMPT)
        prefill.fail = True
        prefill.release.set()
        await until(lambda: decodes[worker].calls, "the decode worker called after the failed prefill")
        # The decode worker now computes the whole prompt itself.
        assert counted(core) == {worker: (1, PROMPT, PROMPT)}
        assert not decodes[worker].calls[0].HasField("kv_handle")
        decodes[worker].gate.set()
        assert len(await task) == 2
        assert counted(core) == {}

    asyncio.run(main())


def test_a_request_closed_while_prefilling_stops_counting() -> None:
    async def main() -> None:
        core, prefill, _decodes = make_core()
        task = asyncio.create_task(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))))
        await until(lambda: prefill.calls, "routed; waiting on the prefill worker")
        assert len(counted(core)) == 1
        task.cancel()  # the client left
        await asyncio.gather(task, return_exceptions=True)
        assert counted(core) == {}
        assert not any(e.num_requests for e in core.prefill.inflight.values())

    asyncio.run(main())


def test_decode_worker_is_called_before_the_first_token_goes_out() -> None:
    """The KV handoff overlaps the first token's way to the client: by the time the client's side
    holds the first token, the decode worker has been called with the KV handle."""
    async def main() -> None:
        core, prefill, decodes = make_core()
        prefill.release.set()
        stream = core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))
        first = await anext(stream)
        assert first.token_ids == [7]
        (called,) = [d for d in decodes.values() if d.calls]  # before we asked for a second item
        assert called.calls[0].HasField("kv_handle")
        called.gate.set()
        rest = [x async for x in stream]
        assert rest[0].token_ids == [8]
        assert sum(len(d.calls) for d in decodes.values()) == 1  # the early call is the one read
        assert counted(core) == {}

    asyncio.run(main())


def test_a_decode_worker_gone_before_its_call_is_retried_elsewhere() -> None:
    """The planned decode worker leaves etcd while the prompt prefills remotely (a drain, a lease
    its keep-alives could not renew in time): nothing was streamed from it, so the request goes to
    the other decode worker with the KV handle, as for any decode failure before the first token."""
    async def main() -> None:
        core, prefill, decodes = make_core()
        task = asyncio.create_task(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))))
        await until(lambda: prefill.calls, "routed; waiting on the prefill worker")
        (gone, _load), = counted(core).items()
        (other,) = [w for w in decodes if w != gone]
        del core.decode.workers._workers[gone]

        def stub(w: str) -> FakeDecode:
            if w == gone:
                raise WorkerFailedError(f"decode worker {w} is gone")
            return decodes[w]

        core.decode.stub = stub  # type: ignore[method-assign]
        decodes[other].gate.set()
        prefill.release.set()
        items = await task
        assert [x.token_ids for x in items[:2]] == [[7], [8]] and len(items) == 3
        assert not decodes[gone].calls and decodes[other].calls[0].HasField("kv_handle")
        assert counted(core) == {}

    asyncio.run(main())
