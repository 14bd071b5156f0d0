"""The edge's pure parts, without processes: sampling values against the worker wire's ranges,
per-request limits naming the field, admission's bounds, API keys and their rate limits, the
hung-worker watchdog's decisions, and the decode worker's check of a KV handle."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decode_worker.wire import check_handle
from protocol.load import EngineLoad
from protocol.model_card import ModelCard
from protocol.sampling import SamplingParams
from router.admission import Admission, AdmissionLimits
from router.auth import Auth, UnauthenticatedError
from router.errors import OverloadedError, RequestError
from router.request_params import MAX_SEQUENCES, MAX_STOP_STRINGS, to_sampling
from router.watchdog import (
    GAP_FACTOR,
    GAP_HALF_LIFE_S,
    STREAMED_FACTOR,
    Liveness,
    Patience,
    Watch,
    WorkerHungError,
    watched_call,
    watched_stream,
)
from router.worker_pool import WorkerPool
from runtime.convert import sampling_from_pb, sampling_to_pb
from runtime.discovery import WorkerEvent, WorkerEventKind, WorkerInfo
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

# ---- sampling values vs the worker wire ---------------------------------------------------------

_INTS = st.one_of(st.integers(), st.integers(-(1 << 70), 1 << 70), st.sampled_from([-1, 0, 1, (1 << 31) - 1, 1 << 31,
                                                                                    (1 << 32) - 1, 1 << 32,
                                                                                    (1 << 63) - 1, 1 << 63]))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=_INTS, max_tokens=st.one_of(st.none(), _INTS), min_tokens=_INTS, top_k=_INTS, seed=st.one_of(st.none(), _INTS),
       stop_token_ids=st.lists(_INTS, max_size=3), temperature=_FLOATS, top_p=_FLOATS, min_p=_FLOATS,
       logprobs=st.one_of(st.none(), _INTS), presence_penalty=_FLOATS, repetition_penalty=_FLOATS)
def test_accepted_sampling_always_fits_the_worker_wire(**fields: object) -> None:
    """Whatever a client sends, SamplingParams either refuses it (ValueError naming the field:
    a 400) or the worker wire carries it and the worker reads back the same values: a value
    never fails at encoding (that was a 500: ``stop_token_ids: [-14120]``)."""
    try:
        params = SamplingParams(**fields)  # type: ignore[arg-type]
    except ValueError as e:
        assert str(e).split(" ", 1)[0] in fields or str(e).startswith(("min_tokens", "stop")), e
        return
    assert sampling_from_pb(pb.SamplingParams.FromString(sampling_to_pb(params).SerializeToString())) == params


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop_token_ids": [-14120]}, "stop_token_ids"),  # the 500
    ({"stop_token_ids": [1 << 32]}, "stop_token_ids"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop": 5}, "stop"),
    ({"n": 1 << 32}, "n"),
    ({"n": MAX_SEQUENCES + 1}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1 << 40}, "max_tokens"),
    ({"max_tokens": 10 ** 400}, "max_tokens"),
    ({"temperature": 10 ** 400}, "temperature"),  # float(int) overflows
    ({"temperature": float("inf")}, "temperature"),
    ({"seed": 1 << 64}, "seed"),
    ({"top_k": 1 << 31}, "top_k"),
    ({"min_tokens": 2.5}, "min_tokens"),
    ({"ignore_eos": "false"}, "ignore_eos"),  # bool("false") was True
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": ["x" * 5000]}, "stop"),
    ({"stop_token_ids": list(range(300))}, "stop_token_ids"),
])
def test_each_bad_field_is_a_request_error_naming_it(fields: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        to_sampling(fields, {"max_tokens": "max_tokens"})
    assert info.value.param == param, info.value


# ---- admission ----------------------------------------------------------------------------------

def test_admission_bounds_requests_and_tokens_per_tier() -> None:
    admission = Admission(AdmissionLimits(max_queued_requests=2, max_queued_tokens=100))
    a = admission.admit("prefill", 60)
    with pytest.raises(OverloadedError) as info:  # 60 + 50 > 100 tokens
        admission.admit("prefill", 50)
    assert info.value.code == "overloaded" and 1 <= info.value.retry_after_s <= 30
    b = admission.admit("prefill", 40)
    with pytest.raises(OverloadedError):  # 2 requests
        admission.admit("prefill", 1)
    admission.admit("decode", 10).release()  # another tier, its own bound
    a.release()
    a.release()  # once only
    assert admission.queued("prefill") == (1, 40)
    c = admission.admit("prefill", 60)
    b.release()
    c.release()
    assert admission.queued("prefill") == (0, 0)
    big = admission.admit("prefill", 1000)  # larger than the bound: admitted into an empty queue
    big.release()


def test_admission_unbounded_when_zero() -> None:
    admission = Admission(AdmissionLimits())
    permits = [admission.admit("decode", 10**6) for _ in range(1000)]
    assert admission.queued("decode") == (1000, 10**9)
    for p in permits:
        p.release()


# ---- API keys -----------------------------------------------------------------------------------

def test_api_keys_and_rate_limits() -> None:
    auth = Auth(["k1", "k2"], rate_limit_rpm=3, rate_limit_tpm=100)
    for bad in (None, "", "Bearer", "Bearer nope", "Basic k1", "k3"):
        with pytest.raises(UnauthenticatedError):
            auth.check(bad, now=0.0)
    usage = auth.check("Bearer k1", now=0.0)
    auth.check("k1", now=1.0)  # a bare key too (gRPC metadata)
    auth.check("bearer  k1 ", now=2.0)
    with pytest.raises(OverloadedError) as info:
        auth.check("Bearer k1", now=3.0)
    assert info.value.code == "rate_limited" and info.value.retry_after_s == 57
    auth.check("Bearer k2", now=3.0)  # keys are counted apart
    auth.check("Bearer k1", now=60.5)  # the first request left the window
    usage.charge(100, now=61.0)
    with pytest.raises(OverloadedError) as info:
        auth.check("Bearer k1", now=62.0)
    assert "tokens" in str(info.value) and info.value.retry_after_s == 59
    assert not Auth([]).enabled


# ---- the watchdog -------------------------------------------------------------------------------

def _watch(probe, silence_s: float = 0.05, liveness: Liveness | None = None) -> Watch:
    return Watch(probe, liveness or Liveness(), Patience(silence_s, 0.05), "w")


def test_watchdog_fails_a_silent_call_whose_worker_does_not_answer() -> None:
    async def scenario() -> None:
        probes: list[bool] = []

        async def dead() -> bool:
            probes.append(False)
            await asyncio.sleep(0.05)  # its timeout
            return False

        async def alive() -> bool:
            probes.append(True)
            return True

        hang: asyncio.Future = asyncio.get_running_loop().create_future()
        with pytest.raises(WorkerHungError):
            await watched_call(hang, _watch(dead))
        assert hang.cancelled() and probes == [False]

        async def slow() -> str:  # silent for 3 periods, but its worker answers Health
            await asyncio.sleep(0.17)
            return "ok"

        assert await watched_call(slow(), _watch(alive)) == "ok"
        assert probes.count(True) >= 2

        async def stream():  # two messages, then silence
            yield 1
            yield 2
            await asyncio.sleep(3600)

        got = []
        t0 = time.monotonic()
        with pytest.raises(WorkerHungError):
            async for msg in watched_stream(stream(), _watch(dead)):
                got.append(msg)
        assert got == [1, 2]
        # after a message: STREAMED_FACTOR x the silence, then the probe's timeout
        assert 0.05 * STREAMED_FACTOR + 0.05 <= time.monotonic() - t0 < 2.0

        async def short():
            yield 1
            await asyncio.sleep(0.12)
            yield 2

        assert [m async for m in watched_stream(short(), _watch(alive))] == [1, 2]

    asyncio.run(scenario())


def test_watchdog_keeps_a_slow_worker_that_is_alive() -> None:
    """A worker slowed by a loaded machine, not hung: its Health answer comes too late, yet the
    call's own answer comes while the probe waits, or the worker is heard on another call, or the
    call is silent no longer than the worker's own recent gaps allow. Each of these calls failed
    before (a fixed silence, then one probe whose timeout was the verdict)."""
    async def scenario() -> None:
        async def starved() -> bool:  # Health queued behind a long stall: no answer in time
            await asyncio.sleep(0.05)
            return False

        async def answer_during_probe() -> str:  # silent 0.05 s, answers 0.03 s into the probe
            await asyncio.sleep(0.08)
            return "ok"

        assert await watched_call(answer_during_probe(), _watch(starved)) == "ok"

        live = Liveness()

        async def heard_elsewhere() -> None:  # the worker's other calls keep getting messages
            for _ in range(12):
                await asyncio.sleep(0.02)
                live.message(0.02)

        async def slow_call() -> str:  # silent for 0.25 s (5 silences), its worker busy elsewhere
            await asyncio.sleep(0.25)
            return "ok"

        other = asyncio.ensure_future(heard_elsewhere())
        assert await watched_call(slow_call(), _watch(starved, liveness=live)) == "ok"
        await other

        async def bursty():  # gaps of 0.09 s, then one of 0.25 s: 5 silences, within 4 x its gaps
            for pause in (0.0, 0.09, 0.09, 0.25):
                await asyncio.sleep(pause)
                yield pause

        got = [m async for m in watched_stream(bursty(), _watch(starved))]
        assert got == [0.0, 0.09, 0.09, 0.25]

    asyncio.run(scenario())


def test_liveness_remembers_the_longest_recent_gap() -> None:
    live = Liveness()
    assert live.gap_s(0.0) == 0.0 and live.last_heard_s == -math.inf
    live.message(0.1, now_s=10.0)
    live.message(2.0, now_s=12.0)
    live.message(0.1, now_s=12.1)  # a short gap does not shorten the memory
    assert live.gap_s(12.0) == 2.0 and live.last_heard_s == 12.1
    assert live.gap_s(12.0 + GAP_HALF_LIFE_S) == pytest.approx(1.0)  # halved per half-life
    live.heard(5.0)  # an older piece of evidence changes nothing
    assert live.last_heard_s == 12.1
    patience = Patience(silence_s=1.0, probe_timeout_s=2.0)
    assert patience.silence_limit_s(False, 0.0) == 1.0
    assert patience.silence_limit_s(True, 0.0) == STREAMED_FACTOR
    assert patience.silence_limit_s(True, 2.0) == GAP_FACTOR * 2.0


def test_a_published_load_with_new_steps_is_heard() -> None:
    """A worker whose step count moved between two polls of its load was alive after the first."""
    pool = WorkerPool(None, "decode")  # type: ignore[arg-type]  # no start(): fed by hand
    pool.reported = {"d0": EngineLoad(num_steps=5), "d1": EngineLoad(num_steps=7)}
    pool._hear_steps({"d0": pb.Load(num_steps=9), "d1": pb.Load(num_steps=7)}, polled_s=100.0)
    assert pool.liveness("d0").last_heard_s == 100.0
    assert pool.liveness("d1").last_heard_s == -math.inf  # no new step: stopped, or idle


def test_watchdog_asks_a_worker_that_left_etcd_at_its_endpoint() -> None:
    """A worker that left etcd while a call to it ran (its lease starved under load, a drain) but
    answers Health is not hung: the probe goes to the endpoint its call went to. Before, the
    probe asked only registered workers, so every silent call to such a worker failed."""
    class Alive(pb_grpc.WorkerServiceServicer):
        async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
            return pb.HealthResponse(worker_id="d0")

    async def scenario() -> None:
        server = grpc.aio.server()
        pb_grpc.add_WorkerServiceServicer_to_server(Alive(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = WorkerPool(None, "decode")  # type: ignore[arg-type]  # no start(): fed by hand
        try:
            info = WorkerInfo("d0", "decode", f"127.0.0.1:{port}", ModelCard("m", 4096), 16)
            pool.workers._workers = {"d0": info}
            assert pool.endpoint("d0") == info.endpoint and await pool.probe("d0", 5.0, pool.endpoint("d0"))
            pool.workers._workers = {}
            pool._on_event(WorkerEvent(WorkerEventKind.REMOVED, "decode", "d0", info))
            assert pool.endpoint("d0") == info.endpoint
            assert await pool.probe("d0", 5.0, pool.endpoint("d0"))  # alive though gone from etcd
            assert not await pool.probe("d0", 5.0, None)  # nowhere to ask
            await server.stop(None)
            assert not await pool.probe("d0", 1.0, pool.endpoint("d0"))  # the process answers no more
        finally:
            await server.stop(None)
            for channel in pool._channels.values():
                await channel.close()

    asyncio.run(scenario())


# ---- the decode worker's KV handle check --------------------------------------------------------

def _handle(**kw: object) -> pb.KVHandle:
    fields = dict(request_id="r", worker_id="p", worker_endpoint="127.0.0.1:5000", block_ids=[1, 2, 3],
                  num_tokens=40, first_token_ids=[7])
    fields.update(kw)
    return pb.KVHandle(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("handle", "what"), [
    (_handle(first_token_ids=[]), "first_token_ids"),
    (_handle(num_tokens=39), "num_tokens"),
    (_handle(block_ids=[1, 2]), "block ids"),
    (_handle(block_ids=[1, 2, 3, 4]), "block ids"),
    (_handle(worker_endpoint="nowhere"), "worker_endpoint"),
    (_handle(worker_endpoint="h:99999"), "worker_endpoint"),
    (_handle(request_id=""), "request_id"),
    # sent ahead (no first token, no block ids): its other fields are checked the same
    (_handle(first_token_ids=[], block_ids=[], num_tokens=39), "num_tokens"),
    (_handle(first_token_ids=[], block_ids=[], worker_endpoint="nowhere"), "worker_endpoint"),
    (_handle(first_token_ids=[], block_ids=[], request_id=""), "request_id"),
    (_handle(block_ids=[]), "block ids"),  # a first token without blocks
])
def test_malformed_kv_handles_are_refused(handle: pb.KVHandle, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        check_handle(handle, 40, 16)
    check_handle(_handle(), 40, 16)


def test_a_handle_sent_ahead_is_well_formed() -> None:
    """The router's handle sent ahead while the prompt prefills: no block ids, no first token."""
    check_handle(_handle(first_token_ids=[], block_ids=[]), 40, 16)
