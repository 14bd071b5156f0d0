"""The saturation spill's ITL rule (``spill_only_to_idle_decode``; ``router.policy.spill_breaks_itl`` and
``spill_plan``): a prompt the prefill tier has no room for goes to a decode worker only where its chunks slow no
decoding request, else it queues on the prefill tier.

- the rule, pure;
- the router's routing core (``RequestFlow._plan``) and the replay's router (``bench/planner_sim.py``, its
  ``spill_idle_only``) take the same decision in the same situations;
- a real router's request flow on the sim cluster (real etcd and worker processes): a long prompt is not spilled
  onto a decode worker with an answer decoding there but onto an idle one, and queues on the prefill tier when
  every decode worker decodes, unless that is over 4 times its saturation point behind; with the setting off it is
  spilled onto the decoding worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.model_card import ModelCard
from protocol.sampling import SamplingParams
from router.policy import WorkerLoad, spill_breaks_itl, spill_plan
from router.request_flow import RequestFlow, Route
from runtime.discovery import WorkerInfo
from runtime.etcd import ControlPlane
from runtime.settings import ClusterConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.planner_sim import Req, SimConfig, Simulation, StepModel
from bench.planner_workload import Arrival
from engine.sim import SimProfile

BS = 16


def test_a_long_prompt_breaks_the_itl_of_a_decoding_worker_only() -> None:
    # max_local_prefill_tokens 64: a decode worker prefills up to 64 tokens in any case
    assert spill_breaks_itl(25_000, 64, decoding=True)
    assert spill_breaks_itl(65, 64, decoding=True)  # one token over what it prefills anyway
    assert not spill_breaks_itl(25_000, 64, decoding=False)  # idle: nothing waits for its steps
    assert not spill_breaks_itl(64, 64, decoding=True)  # within what it prefills anyway
    assert not spill_breaks_itl(0, 64, decoding=True)


def test_the_spill_plan_keeps_the_workers_it_does_not_slow_or_queues_on_the_prefill_tier() -> None:
    busy, idle, busy2 = WorkerLoad("busy", num_inflight=1), WorkerLoad("idle"), WorkerLoad("busy2", num_inflight=3)
    limit = 16_384  # the router's queue limit: 8 x 2048
    saturated = [WorkerLoad("p0", 1, 20_000), WorkerLoad("p1", 1, 17_000)]  # both over it
    # the idle one only, any length prefilled there (None)
    assert spill_plan([busy, idle], {"busy": 5000, "idle": 5000}, 64, saturated, limit) == ([idle], None)
    # the busy one holds all but 64 tokens of the prompt: it slows nothing more than any local prefill
    assert spill_plan([busy, idle], {"busy": 64, "idle": 5000}, 64, saturated, limit) == ([busy, idle], None)
    # every worker decoding: all of them, and the prompt goes to the prefill tier (64: only a local finish)
    assert spill_plan([busy, busy2], {"busy": 5000, "busy2": 5000}, 64, saturated, limit) == ([busy, busy2], 64)
    # every prefill worker over SPILL_GIVES_WAY (4) x the limit: the rule gives way, a spill onto any
    far = [WorkerLoad("p0", 1, 4 * limit + 1), WorkerLoad("p1", 1, 70_000)]
    assert spill_plan([busy, busy2], {"busy": 5000, "busy2": 5000}, 64, far, limit) == ([busy, busy2], None)
    # one of them at 4 x the limit exactly: not yet
    at = [WorkerLoad("p0", 1, 4 * limit), WorkerLoad("p1", 1, 70_000)]
    assert spill_plan([busy, busy2], {"busy": 5000, "busy2": 5000}, 64, at, limit) == ([busy, busy2], 64)


# ---- the router's routing core and the replay's router, the same situations ----------------------------------
SITUATIONS = [  # (prompt tokens, decode workers decoding, the setting, the prefill worker's backlog) -> expected
    (5000, (True, False), True, 20_000, ("local", {"d1"})),
    (5000, (True, True), True, 20_000, ("remote", {"d0", "d1"})),
    (5000, (False, False), True, 20_000, ("local", None)),
    (40, (True, True), True, 20_000, ("local", None)),  # within max_local_prefill_tokens: a local prefill anyway
    (5000, (True, True), True, 70_000, ("local", None)),  # over 4 x 16,384 behind: the rule gives way
    (5000, (True, True), False, 20_000, ("local", None)),
    (5000, (True, False), False, 20_000, ("local", {"d1"})),  # the cost picks the idle one
]


def router_places(isl: int, decoding: tuple[bool, ...], on: bool, backlog: int) -> tuple[str, set[str]]:
    """The router's routing core (no I/O): one prefill worker with ``backlog`` prompt tokens in flight (saturated:
    over 8 x 2048), decode workers d0, d1 with an answer of 100 tokens each where ``decoding``. (prefill, decode
    workers it may go to): "remote" (queued on the prefill tier) or "local" (prefilled on the decode worker)."""
    cfg = ClusterConfig(mode="disaggregated", routing_policy="kv", kv_events=False, max_local_prefill_tokens=64,
                        max_num_batched_tokens=2048, spill_only_to_idle_decode=on)
    flow = RequestFlow(cfg, plane=None)  # type: ignore[arg-type]  (no I/O)
    for pool, ids in ((flow.prefill, ["p0"]), (flow.decode, ["d0", "d1"])):
        pool.workers._workers = {w: WorkerInfo(w, pool.role, f"127.0.0.1:{9000 + i}", ModelCard("m", 65536), BS)
                                 for i, w in enumerate(ids)}
    flow.prefill.open("p0", backlog, backlog)
    for w, busy in zip(("d0", "d1"), decoding):
        if busy:
            flow.decode.open(w, 0, 100)
    ids = list(range(1, isl + 1))
    plan = flow._plan(ids, 1)
    if plan.prefill is not None:
        return "remote", {"d0", "d1"}
    return "local", {plan.decode.worker_id}


def replay_places(isl: int, decoding: tuple[bool, ...], on: bool, backlog: int) -> tuple[str, set[str]]:
    """The same in the replay: its one prefill worker with ``backlog`` prompt tokens queued, d0/d1 running an answer."""
    sim = Simulation(SimConfig(spill_idle_only=on, max_num_batched_tokens=2048, max_local_prefill_tokens=64),
                     StepModel(SimProfile.load("h200-llama-3.1-8b")))
    p = sim.add_worker("prefill", 0.0)
    d = [sim.add_worker("decode", 0.0) for _ in decoding]
    p.add_job(Req(0, Arrival(0.0, backlog, 10, ())), 0.0)
    for i, (w, busy) in enumerate(zip(d, decoding)):
        if busy:
            w.add_local(Req(1 + i, Arrival(0.0, 10, 100, ())), 0.0)
    sim.arrive(Req(9, Arrival(0.0, isl, 10, ())), 0.0)
    if sim.num_local_prefill == 0:  # the router's local prefills (the answers above were placed directly)
        assert p.queued_prefill_tokens == backlog + isl
        return "remote", {"d0", "d1"}
    return "local", {f"d{i}" for i, w in enumerate(d) if any(s.req.rid == 9 for s in [*w.waiting, *w.running])}


@pytest.mark.parametrize("isl,decoding,on,backlog,expected", SITUATIONS)
def test_the_router_and_the_replay_place_a_prompt_alike(isl: int, decoding: tuple[bool, ...], on: bool, backlog: int,
                                                        expected: tuple[str, set[str] | None]) -> None:
    router, replay = router_places(isl, decoding, on, backlog), replay_places(isl, decoding, on, backlog)
    assert router[0] == replay[0] == expected[0], (router, replay)
    if expected[1] is not None:
        assert router[1] == replay[1] == expected[1], (router, replay)


# ---- a real router's request flow on the sim cluster ---------------------------------------------------------
def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


async def until(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_real_router_spills_a_long_prompt_only_onto_an_idle_decode_worker(sim_cluster) -> None:
    """The prefill tier saturated (its workers each counted with 20,000 prompt tokens in flight, as a peer
    router's would count: over 8 x max_num_batched_tokens), one decode worker answering a long request whose
    prompt it holds, the other idle: a prompt of that prefix and 200 new tokens would be cheapest where the prefix
    is (13 new blocks against 33), the decoding worker, and goes there with the setting off; on, it is prefilled
    on the idle worker; once both decode, it queues on the prefill tier."""
    cfg = dataclasses.replace(sim_cluster.cfg, spill_only_to_idle_decode=True)

    async def main() -> None:
        async with ControlPlane.from_config(cfg) as plane:
            flow = RequestFlow(cfg, plane)
            await flow.start()
            answers: list[asyncio.Task] = []
            try:
                await until(lambda: len(flow.decode.ids()) == 2 and len(flow.prefill.ids()) == 2, "the workers")
                full = [flow.prefill.open(w, 20_000, 20_000) for w in flow.prefill.ids()]

                streaming: set[int] = set()  # id() of the routes whose answer has streamed a token

                async def answer(prompt: list[int], max_tokens: int, route: Route) -> None:
                    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
                    async for _ in flow.generate(f"spill-{time.monotonic_ns()}", prompt, params, route=route):
                        streaming.add(id(route))

                async def place(prompt: list[int], on: bool) -> Route:
                    flow.cfg = dataclasses.replace(cfg, spill_only_to_idle_decode=on)
                    route = Route()
                    await asyncio.wait_for(answer(prompt, 2, route), 30)
                    return route

                prefix = tokens(20, 20 * BS)
                for ticket in full:  # the first answer's prompt prefills remotely, then lands on its decode worker
                    ticket.close()
                long1 = Route()
                answers.append(asyncio.create_task(answer(prefix, 100_000, long1)))
                await until(lambda: id(long1) in streaming, "the first long answer to decode")
                busy = long1.decode_worker
                (idle,) = set(flow.decode.ids()) - {busy}
                full = [flow.prefill.open(w, 20_000, 20_000) for w in flow.prefill.ids()]
                assert flow._max_local(flow.prefill.ids()) is None  # saturated: a spill
                off = await place(prefix + tokens(21, 200), on=False)
                assert (off.prefill_worker, off.decode_worker) == ("", busy)  # spilled where the prefix is
                on = await place(prefix + tokens(22, 200), on=True)
                assert (on.prefill_worker, on.decode_worker) == ("", idle)  # not onto the decoding worker
                long2 = Route()
                answers.append(asyncio.create_task(answer(tokens(23, 40), 100_000, long2)))
                await until(lambda: id(long2) in streaming, "the second long answer to decode")
                assert long2.decode_worker == idle
                queued = await place(prefix + tokens(24, 200), on=True)
                assert queued.prefill_worker in flow.prefill.ids()  # every decode worker decodes: the prefill tier
                spilled = await place(prefix + tokens(25, 200), on=False)
                assert spilled.prefill_worker == ""
                far = [flow.prefill.open(w, 50_000, 50_000) for w in flow.prefill.ids()]  # 70,000: over 4 x 16,384
                assert flow.prefill_queue_limit_tokens == 16_384
                gave_way = await place(prefix + tokens(26, 200), on=True)
                assert gave_way.prefill_worker == ""  # so far behind the rule gives way: spilled
                full += far
                assert all(not a.done() for a in answers)  # both still decoding throughout
                for ticket in full:
                    ticket.close()
            finally:
                for a in answers:
                    a.cancel()
                await asyncio.gather(*answers, return_exceptions=True)
                await flow.stop()

    asyncio.run(main())
