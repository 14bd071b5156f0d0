"""The router's own in-flight accounting, without a cluster: a request counts on its decode
worker from the routing decision on, including while its prompt prefills on the prefill tier,
so that requests routed meanwhile see that worker busy; and it stops counting whatever way the
request ends; and the decode worker is called before the first token goes out: with the handle
sent ahead while the prompt prefills (and again with the whole handle when that one fails), or,
when the cluster pulls, once the prefill answered. Workers are fake stubs; the routing core is
the real one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from protocol.model_card import ModelCard
from protocol.sampling import SamplingParams
from router import request_flow
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
            handle=pb.KVHandle(request_id=req.request_id, worker_id="p0", first_token_ids=[7]),
            outputs=[pb.SequenceOutput(index=0, token_ids=[7])],
            usage=pb.Usage(num_prompt_tokens=len(req.prompt_token_ids), num_completion_tokens=1))

    async def Abort(self, req: pb.AbortRequest, timeout: float) -> pb.AbortResponse:  # the gRPC method name
        return pb.AbortResponse(aborted=True)

    async def Health(self, req: pb.HealthRequest, timeout: float) -> pb.HealthResponse:  # the watchdog's probe
        return pb.HealthResponse()


class FakeCall:
    """A Generate call; ``aborted``: it ends ABORTED before any output (a handle sent ahead that did not land)."""

    def __init__(self, gate: asyncio.Event, aborted: grpc.StatusCode | None = None) -> None:
        self.gate = gate
        self.aborted = aborted
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return False

    async def __aiter__(self):
        await self.gate.wait()
        if self.aborted is not None:
            raise grpc.aio.AioRpcError(self.aborted, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "the handle sent ahead did not land, or was refused")
        yield pb.GenerateResponse(outputs=[pb.SequenceOutput(index=0, token_ids=[8])])
        yield pb.GenerateResponse(usage=pb.Usage(num_prompt_tokens=PROMPT, num_completion_tokens=1))


class FakeDecode:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[pb.GenerateRequest] = []
        self.ahead_ends: grpc.StatusCode | None = None  # how a call with a handle sent ahead ends
        self.ahead_hangs = False  # a call with a handle sent ahead never sends anything (its push hangs)
        self.streams: list[FakeCall] = []

    def Generate(self, req: pb.GenerateRequest) -> FakeCall:  # the gRPC method name
        self.calls.append(req)
        gate = asyncio.Event() if self.ahead_hangs and sent_ahead(req) else self.gate
        self.streams.append(FakeCall(gate, self.ahead_ends if sent_ahead(req) else None))
        return self.streams[-1]

    async def Health(self, req: pb.HealthRequest, timeout: float) -> pb.HealthResponse:  # the watchdog's probe
        await asyncio.sleep(timeout)  # never in time: only the call itself shows the worker alive
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata())


def sent_ahead(req: pb.GenerateRequest) -> bool:
    return req.HasField("kv_handle") and not req.kv_handle.first_token_ids


def make_core(kv_transfer_mode: str = "auto", **cfg_kw: float
              ) -> tuple[RequestFlow, FakePrefill, dict[str, FakeDecode]]:
    cfg = ClusterConfig(mode="disaggregated", routing_policy="kv", kv_events=False, max_local_prefill_tokens=64,
                        kv_transfer_mode=kv_transfer_mode, **cfg_kw)  # type: ignore[arg-type]
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
        (worker, load), = counted(core).items()
        assert load == (1, 0, PROMPT)  # one request, no prompt token to compute there, its KV to come
        assert [sent_ahead(c) for c in decodes[worker].calls] == [True]  # called while the prompt prefills
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
        await until(lambda: len(decodes[worker].calls) == 2, "the decode worker called after the failed prefill")
        # The call sent ahead was given up; the decode worker now computes the whole prompt itself.
        assert counted(core) == {worker: (1, PROMPT, PROMPT)}
        assert sent_ahead(decodes[worker].calls[0]) and not decodes[worker].calls[1].HasField("kv_handle")
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
        assert sent_ahead(called.calls[0])
        called.gate.set()
        rest = [x async for x in stream]
        assert rest[0].token_ids == [8]
        assert sum(len(d.calls) for d in decodes.values()) == 1  # the early call is the one read
        assert counted(core) == {}

    asyncio.run(main())


def test_a_decode_worker_gone_before_its_call_is_retried_elsewhere() -> None:
    """The planned decode worker leaves etcd while the prompt prefills remotely (a drain, a lease
    its keep-alives could not renew in time): nothing was streamed from it, so the request goes to
    the other decode worker with the KV handle, as for any decode failure before the first token.
    Pulled: the decode worker is called once the prefill answered (pushed, the handle sent ahead is
    already there; a worker gone then fails that call, the retry path below)."""
    async def main() -> None:
        core, prefill, decodes = make_core("pull")
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


def test_a_handle_sent_ahead_that_did_not_land_is_sent_again_whole_to_the_same_worker() -> None:
    """The decode worker ends the call sent ahead with ABORTED (its push failed; it has no first
    token to recompute from): the router calls it again with the whole handle, and the client
    gets the prefill worker's first token once, then the rest."""
    async def main() -> None:
        core, prefill, decodes = make_core()
        for d in decodes.values():
            d.ahead_ends = grpc.StatusCode.ABORTED
            d.gate.set()
        prefill.release.set()
        got = await collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2)))
        assert [x.token_ids for x in got[:2]] == [[7], [8]] and len(got) == 3
        (called,) = [d for d in decodes.values() if d.calls]
        assert [sent_ahead(c) for c in called.calls] == [True, False]
        assert list(called.calls[1].kv_handle.first_token_ids) == [7]  # the whole handle, from the prefill's answer
        assert counted(core) == {}

    asyncio.run(main())


def test_a_handle_sent_ahead_silent_past_the_transfer_timeout_is_given_up_and_sent_again_whole(monkeypatch) -> None:
    """The prefill answered but the call sent ahead sends nothing (its push hangs; the decode
    worker, which has no deadline on it, stays alive): past kv_pull_timeout_s plus a grace from
    the prefill's answer the router cancels it and calls the same worker with the whole handle
    (which recomputes from the prefill's first token if the push cannot land)."""
    monkeypatch.setattr(request_flow, "_AHEAD_FIRST_GRACE_S", 0.05)

    async def main() -> None:
        core, prefill, decodes = make_core(kv_pull_timeout_s=0.2, worker_silence_s=60.0)
        for d in decodes.values():
            d.ahead_hangs = True
            d.gate.set()
        prefill.release.set()
        given_up = request_flow.KV_AHEAD_GIVEN_UP._value.get()
        got = await asyncio.wait_for(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))),
                                     20)
        assert [x.token_ids for x in got[:2]] == [[7], [8]] and len(got) == 3
        (called,) = [d for d in decodes.values() if d.calls]
        assert [sent_ahead(c) for c in called.calls] == [True, False]
        assert list(called.calls[1].kv_handle.first_token_ids) == [7]  # the whole handle
        assert called.streams[0].cancelled  # the decode worker gives up its push
        assert request_flow.KV_AHEAD_GIVEN_UP._value.get() == given_up + 1
        assert counted(core) == {}

    asyncio.run(main())


def test_a_handle_sent_ahead_is_not_watched_while_its_prompt_prefills() -> None:
    """The call sent ahead is silent for the whole prefill (queue included), legitimately: the
    watchdog's silence limit for it starts when the prefill answered, so a prefill many silence
    limits long does not get the decode worker judged hung (here its Health never answers in
    time, so a watch begun at the call would fail it)."""
    silence_s = 0.1

    async def main() -> None:
        core, prefill, decodes = make_core(worker_silence_s=silence_s, worker_probe_timeout_s=silence_s)
        task = asyncio.create_task(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))))
        await until(lambda: any(d.calls for d in decodes.values()), "the handle sent ahead")
        await asyncio.sleep(8 * silence_s)  # the prompt prefills
        (called,) = [d for d in decodes.values() if d.calls]
        prefill.release.set()
        await until(lambda: core.prefill.inflight["p0"].num_requests == 0, "the prefill answered")
        called.gate.set()  # the push landed at once
        got = await task
        assert [x.token_ids for x in got[:2]] == [[7], [8]] and len(got) == 3
        assert len(called.calls) == 1 and sent_ahead(called.calls[0])  # read, not retried nor re-called
        assert not core.decode._suspect

    asyncio.run(main())


def test_a_cluster_that_pulls_sends_no_handle_ahead() -> None:
    async def main() -> None:
        core, prefill, decodes = make_core("pull")
        for d in decodes.values():
            d.gate.set()
        task = asyncio.create_task(collect(core.generate("a", list(range(PROMPT)), SamplingParams(max_tokens=2))))
        await until(lambda: prefill.calls, "routed; waiting on the prefill worker")
        assert not any(d.calls for d in decodes.values())
        prefill.release.set()
        assert len(await task) == 3
        (called,) = [d for d in decodes.values() if d.calls]
        assert len(called.calls) == 1 and not sent_ahead(called.calls[0])

    asyncio.run(main())


def test_a_pair_whose_decode_worker_refused_a_handle_sent_ahead_gets_whole_handles_only() -> None:
    """A decode worker that would pull from the prefill worker refuses the handle sent ahead
    (FAILED_PRECONDITION): the request is served with the whole handle, and that pair is sent no
    handle ahead again."""
    async def main() -> None:
        core, prefill, decodes = make_core()
        for d in decodes.values():
            d.ahead_ends = grpc.StatusCode.FAILED_PRECONDITION
            d.gate.set()
        prefill.release.set()
        for i in range(4):
            got = await collect(core.generate(f"r{i}", list(range(1000 * i, 1000 * i + PROMPT)),
                                              SamplingParams(max_tokens=2)))
            assert [x.token_ids for x in got[:2]] == [[7], [8]]
        for d in decodes.values():
            assert sum(sent_ahead(c) for c in d.calls) <= 1
        assert sum(not sent_ahead(c) for d in decodes.values() for c in d.calls) == 4

    asyncio.run(main())
