"""The control-plane client against a real etcd: leases, registration, discovery, metrics keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest
from runtime_testlib import child_env, run

from protocol.model_card import ModelCard, TokenizerKind, TokenizerSource
from runtime import keys
from runtime.discovery import (
    WorkerEvent,
    WorkerEventKind,
    WorkerInfo,
    WorkerSet,
    WorkerWatch,
    deregister,
    list_workers,
    register,
)
from runtime.etcd import ControlPlane, EtcdAccess, LeaseLost
from runtime.etcd_server import EtcdServer, free_port
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as wpb
from runtime.settings import ClusterConfig

TTL_S = 2
# A dead lease is reaped within its TTL plus etcd's expiry check granularity (~0.5 s).
EXPIRY_SLACK_S = 2.0


MODEL = ModelCard("smollm2", 8192, TokenizerSource(TokenizerKind.GGUF, "/models/smollm2.gguf"))


def info(worker_id: str, role: str = "decode", **kw: object) -> WorkerInfo:
    fields: dict[str, object] = dict(worker_id=worker_id, role=role, endpoint="127.0.0.1:9000", model=MODEL,
                                     block_size=16)
    fields.update(kw)
    return WorkerInfo(**fields)  # type: ignore[arg-type]


def load_prefix(namespace: str, role: str) -> str:
    return keys.metrics_prefix(namespace, role)


def plane(etcd: EtcdServer, namespace: str, **kw: Any) -> ControlPlane:
    return ControlPlane([etcd.endpoint], namespace=namespace, lease_ttl_s=TTL_S, **kw)


# -- values and keys ------------------------------------------------------------------------


def test_keys_follow_design() -> None:
    assert keys.worker_key("prod", "prefill", "p0") == "/tandem/prod/workers/prefill/p0"
    assert keys.worker_load_key("prod", "decode", "d0") == "/tandem/prod/metrics/decode/d0"
    assert keys.router_stats_key("prod", "r0") == "/tandem/prod/metrics/router/r0"
    assert keys.router_inflight_key("prod", "r0") == "/tandem/prod/metrics/router_inflight/r0"
    assert keys.planner_decision_key("prod") == "/tandem/prod/planner/decision"
    for bad in ("", "a/b", "/x"):
        with pytest.raises(ValueError, match="bad"):
            keys.worker_key("prod", "decode", bad)
    with pytest.raises(ValueError, match="role"):
        keys.worker_load_key("prod", "router", "r0")


def test_worker_info_wire_round_trip_and_validation() -> None:
    original = info("d0", transport_metadata=b"\x00agent", pid=42, started_at_unix_ms=7, num_gpus=1.5)
    assert WorkerInfo.parse(original.to_pb().SerializeToString()) == original
    no_tokenizer = info("d1", model=ModelCard("dummy", 4096))
    assert WorkerInfo.parse(no_tokenizer.to_pb().SerializeToString()) == no_tokenizer
    newer = original.to_pb().SerializeToString() + b"\xf8\x07\x01"  # field 127 = 1: from a newer writer
    assert WorkerInfo.parse(newer) == original
    with pytest.raises(ValueError, match="block_size"):
        info("d0", block_size=0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="num_gpus"):
            info("d0", num_gpus=bad)
    with pytest.raises(ValueError, match="role"):
        info("d0", role="router")
    with pytest.raises(ValueError, match="not a WorkerInfo"):
        WorkerInfo.parse(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="endpoint"):
        WorkerInfo.parse(cpb.WorkerInfo(worker_id="d0", role=wpb.WORKER_ROLE_DECODE, block_size=16,
                                        model=cpb.ModelCard(name="m", max_model_len=16)).SerializeToString())
    with pytest.raises(ValueError, match="name"):
        WorkerInfo.parse(cpb.WorkerInfo(worker_id="d0", role=wpb.WORKER_ROLE_DECODE, endpoint="h:1",
                                        block_size=16).SerializeToString())


def test_bad_client_arguments() -> None:
    with pytest.raises(ValueError, match="no etcd endpoints"):
        ControlPlane([])
    with pytest.raises(ValueError, match="host:port"):
        ControlPlane(["localhost"])
    with pytest.raises(ValueError, match="lease_ttl_s"):
        ControlPlane(["127.0.0.1:2379"], lease_ttl_s=1)
    with pytest.raises(ValueError, match="go together"):
        EtcdAccess(user="root")
    with pytest.raises(ValueError, match="go together"):
        EtcdAccess(cert=b"pem")


# -- connection -----------------------------------------------------------------------------


def test_unreachable_endpoint_fails_fast_and_failover_works(etcd: EtcdServer, namespace: str) -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="cannot use etcd"):
            await ControlPlane([dead], request_timeout_s=1.0).connect()
        assert time.monotonic() - started < 5
        async with ControlPlane([dead, etcd.endpoint], namespace=namespace, request_timeout_s=1.0) as cp:
            await cp.put(f"/tandem/{namespace}/x", "1")
            assert await cp.get(f"/tandem/{namespace}/x") == b"1"

    run(main())


def test_from_config(etcd: EtcdServer, namespace: str) -> None:
    config = ClusterConfig(namespace=namespace, etcd_endpoints=(etcd.endpoint,), lease_ttl_s=3)

    async def main() -> None:
        async with ControlPlane.from_config(config) as cp:
            assert cp.namespace == namespace and cp.lease_ttl_s == 3 and cp.lease_ok

    run(main())
    with pytest.raises(ValueError, match="embedded"):
        ControlPlane.from_config(ClusterConfig())


# -- basics ---------------------------------------------------------------------------------


def test_put_get_delete_prefix_and_planner_decision(etcd: EtcdServer, namespace: str) -> None:
    key = keys.planner_decision_key(namespace)
    decision = cpb.PlannerDecision(planner_id="pl", mode="load", num_prefill=2, num_decode=3, reasons=[
        cpb.PlannerReason(code="prefill_queue_above_threshold", role="prefill", values={"queue_s": 2.5})])

    async def main() -> None:
        async with plane(etcd, namespace) as cp:
            base = f"/tandem/{namespace}/scratch/"
            await cp.put(base + "a", b"1")
            await cp.put(base + "b", "2")
            assert await cp.get(base + "a") == b"1"
            assert await cp.get(base + "missing") is None
            assert await cp.get_prefix(base) == {base + "a": b"1", base + "b": b"2"}
            assert await cp.delete(base + "a") is True
            assert await cp.delete(base + "a") is False
            assert await cp.get_message(key, cpb.PlannerDecision) is None
            await cp.put_message(key, decision, lease=False)
            assert await cp.get_message(key, cpb.PlannerDecision) == decision
            await cp.put(base + "junk", b"\xff\xff")
            assert await cp.get_message(base + "junk", cpb.PlannerDecision) is None  # logged, not raised
        async with plane(etcd, namespace) as cp:  # not lease-bound: outlives its writer
            assert await cp.get_message(key, cpb.PlannerDecision) == decision

    run(main())


# -- registration and discovery -------------------------------------------------------------


def test_register_discover_deregister(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        async with plane(etcd, namespace) as worker, plane(etcd, namespace) as router:
            await register(worker, info("d0"))
            await register(worker, info("p0", role="prefill"))
            assert await list_workers(router, "decode") == {"d0": info("d0")}
            assert set(await list_workers(router, "prefill")) == {"p0"}
            raw = await router.client.get(keys.worker_key(namespace, "decode", "d0").encode())
            assert raw is not None and raw.lease == worker.lease_id
            await deregister(worker, "decode", "d0")
            assert await list_workers(router, "decode") == {}
            assert set(await list_workers(router, "prefill")) == {"p0"}
        async with plane(etcd, namespace) as router:  # close() revoked the lease: keys gone at once
            assert await list_workers(router, "prefill") == {}

    run(main())


def test_watch_gives_snapshot_then_events(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        async with plane(etcd, namespace) as worker, plane(etcd, namespace) as router:
            await register(worker, info("d0"))
            watch = await WorkerWatch.open(router, "decode")
            try:
                assert watch.snapshot == {"d0": info("d0")}
                await register(worker, info("d1"))
                await register(worker, info("p0", role="prefill"))  # other role: unseen
                d1_endpoint = "127.0.0.1:9001"
                await register(worker, info("d1", endpoint=d1_endpoint))
                await register(worker, info("d1", endpoint=d1_endpoint))  # no-op
                await deregister(worker, "decode", "d0")
                events = [await watch.next_event(5) for _ in range(3)]
                assert events == [
                    WorkerEvent(WorkerEventKind.ADDED, "decode", "d1", info("d1")),
                    WorkerEvent(WorkerEventKind.UPDATED, "decode", "d1", info("d1", endpoint=d1_endpoint)),
                    WorkerEvent(WorkerEventKind.REMOVED, "decode", "d0", info("d0")),
                ]
                assert await watch.next_event(0.5) is None
            finally:
                await watch.close()
            assert [e async for e in watch] == []

    run(main())


def test_worker_set_is_live(etcd: EtcdServer, namespace: str) -> None:
    seen: list[WorkerEvent] = []

    async def main() -> None:
        async with (
            plane(etcd, namespace) as router,
            plane(etcd, namespace) as worker,
            WorkerSet(router, "prefill", on_event=seen.append) as prefill,
        ):
            assert len(prefill) == 0
            await register(worker, info("p0", role="prefill"))
            await register(worker, info("p1", role="prefill"))
            assert await prefill.wait_until(lambda w: set(w) == {"p0", "p1"}, 15)
            assert prefill.get("p0") == info("p0", role="prefill") and "p1" in prefill
            await deregister(worker, "prefill", "p0")
            assert await prefill.wait_until(lambda w: set(w) == {"p1"}, 15)
            assert not await prefill.wait_until(lambda w: not w, 0.2)
        assert [(e.kind, e.worker_id) for e in seen] == [
            (WorkerEventKind.ADDED, "p0"), (WorkerEventKind.ADDED, "p1"), (WorkerEventKind.REMOVED, "p0")
        ]  # fmt: skip

    run(main())


# -- lease loss -----------------------------------------------------------------------------


def test_revoked_lease_is_regranted_and_keys_reput(etcd: EtcdServer, namespace: str) -> None:
    losses: list[LeaseLost] = []

    async def main() -> None:
        async with plane(etcd, namespace) as worker, plane(etcd, namespace) as router:

            async def on_lease_lost(lost: LeaseLost) -> None:
                losses.append(lost)
                await register(worker, info("d9"))  # the callback may write

            worker.on_lease_lost = on_lease_lost
            await register(worker, info("d0"))
            await worker.put_message(keys.worker_load_key(namespace, "decode", "d0"), wpb.Load(num_waiting=1))
            async with WorkerSet(router, "decode") as decode:
                old_lease = worker.lease_id
                await router.client.revoke_lease(old_lease)  # as if etcd had expired it
                assert await decode.wait_until(lambda w: "d0" not in w, 15)
                # The keep-alive notices within TTL/3, restores both keys under a new lease, then calls back.
                assert await decode.wait_until(lambda w: {"d0", "d9"} <= set(w), TTL_S + EXPIRY_SLACK_S)
                assert worker.lease_id != old_lease and worker.lease_ok and worker.num_lease_losses == 1
                assert losses == [LeaseLost(old_lease, worker.lease_id)]
                assert await router.get_messages(load_prefix(namespace, "decode"), wpb.Load) == {
                    "d0": wpb.Load(num_waiting=1)}

    run(main())


def test_write_after_silent_lease_loss_heals(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        async with plane(etcd, namespace) as worker, plane(etcd, namespace) as router:
            await register(worker, info("d0"))
            await router.client.revoke_lease(worker.lease_id)
            # Registering at once, before the keep-alive has noticed: the write itself heals the lease.
            await register(worker, info("d1"))
            assert set(await list_workers(router, "decode")) == {"d0", "d1"}
            assert worker.num_lease_losses == 1

    run(main())


def test_stopped_keepalive_lets_keys_expire_within_ttl(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        async with plane(etcd, namespace) as router, WorkerSet(router, "decode") as decode:
            worker = await plane(etcd, namespace).connect()
            await register(worker, info("d0"))
            assert await decode.wait_until(lambda w: "d0" in w, 15)
            await worker.close(revoke=False)  # like a crash: no revoke, no more keep-alives
            started = time.monotonic()
            assert await decode.wait_until(lambda w: "d0" not in w, TTL_S + EXPIRY_SLACK_S)
            assert time.monotonic() - started <= TTL_S + EXPIRY_SLACK_S

    run(main())


_CHILD = """
import asyncio, sys
from protocol.model_card import ModelCard
from runtime import keys
from runtime.discovery import WorkerInfo, register
from runtime.etcd import ControlPlane
from runtime.pb import tandem_worker_pb2 as wpb

async def main(endpoint, namespace):
    cp = await ControlPlane([endpoint], namespace=namespace, lease_ttl_s=2).connect()
    await register(cp, WorkerInfo("child", "decode", "127.0.0.1:1", ModelCard("m", 16), 16))
    cp.start_publisher(keys.worker_load_key(namespace, "decode", "child"), lambda: wpb.Load(num_running=1))
    await asyncio.sleep(120)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_sigkilled_process_disappears_within_ttl(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, etcd.endpoint, namespace], env=child_env())
        try:
            async with plane(etcd, namespace) as router, WorkerSet(router, "decode") as decode:
                assert await decode.wait_until(lambda w: "child" in w, 20), "child never registered"
                # Outlive a few keep-alives first, so the lease is really being kept alive.
                await asyncio.sleep(TTL_S + 0.5)
                assert "child" in decode
                child.kill()
                started = time.monotonic()
                assert await decode.wait_until(lambda w: "child" not in w, TTL_S + EXPIRY_SLACK_S)
                assert time.monotonic() - started <= TTL_S + EXPIRY_SLACK_S
                assert await router.get_messages(load_prefix(namespace, "decode"), wpb.Load) == {}
        finally:
            child.kill()
            child.wait(timeout=10)

    run(main())


# -- metrics --------------------------------------------------------------------------------


def test_metrics_keys_and_publisher(etcd: EtcdServer, namespace: str) -> None:
    async def main() -> None:
        async with plane(etcd, namespace) as worker, plane(etcd, namespace) as planner:
            await worker.put_message(keys.worker_load_key(namespace, "prefill", "p0"),
                                     wpb.Load(num_waiting=3, num_running=1, kv_usage=0.25))
            await worker.put_message(keys.router_stats_key(namespace, "r0"), cpb.RouterWindowStats(num_arrivals=7))
            assert await planner.get_messages(load_prefix(namespace, "prefill"), wpb.Load) == {
                "p0": wpb.Load(num_waiting=3, num_running=1, kv_usage=0.25)}
            raw = await planner.client.get(keys.router_stats_key(namespace, "r0").encode())
            assert raw is not None and cpb.RouterWindowStats.FromString(raw.value).num_arrivals == 7
            assert raw.lease == worker.lease_id

            ticks = iter(range(1000))
            started = time.monotonic()
            publisher = worker.start_publisher(keys.worker_load_key(namespace, "decode", "d0"),
                                               lambda: wpb.Load(num_waiting=next(ticks)), interval_s=0.1)
            deadline = started + 30  # only stops a hang: a slow machine publishes late, not wrongly
            while publisher.num_published < 5:
                assert time.monotonic() < deadline, publisher.num_published
                await asyncio.sleep(0.02)
            await publisher.stop()
            elapsed = time.monotonic() - started
            # Every sample was published once, the last one is what etcd holds, and none after stop().
            latest = (await planner.get_messages(load_prefix(namespace, "decode"), wpb.Load))["d0"]
            assert latest.num_waiting == publisher.num_published - 1 == next(ticks) - 1
            # It waits its interval between puts (one-sided: a loaded machine only makes it fewer).
            assert publisher.num_published <= elapsed / 0.1 + 1, (publisher.num_published, elapsed)
            worker.start_publisher(keys.worker_load_key(namespace, "decode", "d1"), wpb.Load, interval_s=0.1)
        async with plane(etcd, namespace) as planner:  # lease revoked on close: all metrics gone
            assert await planner.get_prefix(f"/tandem/{namespace}/metrics/") == {}

    run(main())


def test_publisher_survives_bad_samples(etcd: EtcdServer, namespace: str) -> None:
    calls = 0

    def sample() -> wpb.Load:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("engine not ready")
        return wpb.Load(num_waiting=calls)

    async def main() -> None:
        async with plane(etcd, namespace) as worker:
            publisher = worker.start_publisher(keys.worker_load_key(namespace, "decode", "d0"), sample, interval_s=0.05)
            deadline = time.monotonic() + 5
            while publisher.num_published < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert publisher.num_published >= 2

    run(main())


# -- etcd restart ---------------------------------------------------------------------------


def test_survives_etcd_restart_with_empty_data(namespace: str) -> None:
    """etcd comes back empty: the lease is re-granted, keys re-put, and watchers resync."""
    server = EtcdServer(client_port=free_port(), peer_port=free_port())
    losses: list[LeaseLost] = []
    opts: dict[str, Any] = dict(namespace=namespace, lease_ttl_s=TTL_S, request_timeout_s=1)

    async def main() -> None:
        async with (
            ControlPlane([server.endpoint], **opts) as router,
            ControlPlane([server.endpoint], on_lease_lost=losses.append, **opts) as worker,
            WorkerSet(router, "decode") as decode,
        ):
            await register(worker, info("d0"))
            assert await decode.wait_until(lambda w: "d0" in w, 15)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            # Within a few keep-alive periods the worker notices, re-grants and re-registers.
            assert await decode.wait_until(lambda w: "d0" in w and worker.lease_ok and losses, 15)
            assert await list_workers(router, "decode") == {"d0": info("d0")}
            await register(worker, info("d1"))
            assert await decode.wait_until(lambda w: set(w) == {"d0", "d1"}, 15)

    try:
        server.start()
        run(main())
    finally:
        server.stop()
