"""Push: the destination expects, the owner WRITEs its blocks into the destination's, the destination
waits. In one process (loopback) and between two real processes (tcp, nixl) in both roles."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from kv_helpers import Owner, block_pattern, empty_kv, filled_kv, layout, spawn_owner
from prometheus_client import REGISTRY

from kv_transfer import KVTransport, TransferError, TransferTimeoutError, make_transport, nixl_available

pytestmark = pytest.mark.timeout(120)

NIXL = pytest.param(
    "nixl", marks=pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed here")
)
TRANSPORTS = ["tcp", NIXL]


@pytest.fixture(autouse=True)
def _ucx_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _transport(name: str, kv: torch.Tensor) -> KVTransport:
    transport = make_transport(name)
    transport.register(kv)
    return transport


# In one process.


def test_loopback_push_lands_in_the_expected_blocks() -> None:
    lay = layout()
    with _transport("loopback", filled_kv(lay)) as owner, _transport("loopback", empty_kv(lay)) as dest:
        src, dst = [3, 4, 5, 9, 40], [10, 11, 12, 0, 63]
        transfer_id = dest.expect(dst, timeout_s=5.0)
        pushed = owner.push(dest.metadata(), transfer_id, src, dst, timeout_s=5.0)
        landed = dest.wait(transfer_id)
        assert pushed.num_blocks == landed.num_blocks == 5
        assert landed.num_bytes == 5 * lay.bytes_per_block
        for s, d in zip(src, dst):
            assert torch.equal(dest.kv[d], block_pattern(lay, s))
        untouched = sorted(set(range(lay.num_blocks)) - set(dst))
        assert not dest.kv[untouched].any()


def test_loopback_push_refused_unless_expected_and_matching() -> None:
    lay = layout()
    with _transport("loopback", filled_kv(lay)) as owner, _transport("loopback", empty_kv(lay)) as dest:
        with pytest.raises(TransferError, match="no transfer 'nope' is expected"):
            owner.push(dest.metadata(), "nope", [1], [1], timeout_s=5.0)
        transfer_id = dest.expect([1, 2], timeout_s=5.0)
        with pytest.raises(TransferError, match="other blocks"):
            owner.push(dest.metadata(), transfer_id, [1, 2], [1, 3], timeout_s=5.0)
        assert not dest.kv.any(), "a refused push writes nothing"
        dest.cancel(transfer_id)
        with pytest.raises(TransferError, match="no transfer"):
            owner.push(dest.metadata(), transfer_id, [1, 2], [1, 2], timeout_s=5.0)


def test_expect_rejects_bad_and_busy_blocks() -> None:
    with _transport("loopback", empty_kv(layout())) as dest:
        with pytest.raises(ValueError, match="out of range"):
            dest.expect([64])
        with pytest.raises(ValueError, match="repeat"):
            dest.expect([1, 1])
        first = dest.expect([1, 2], timeout_s=5.0)
        with pytest.raises(ValueError, match=f"already await transfer {first}"):
            dest.expect([2, 3])
        dest.cancel(first)
        dest.cancel(dest.expect([2, 3], timeout_s=5.0))  # free again once the first is gone


def test_empty_push_still_completes_the_wait() -> None:
    with _transport("loopback", filled_kv(layout())) as owner, _transport("loopback", empty_kv(layout())) as dest:
        transfer_id = dest.expect([], timeout_s=5.0)
        owner.push(dest.metadata(), transfer_id, [], [], timeout_s=5.0)
        assert dest.wait(transfer_id).num_blocks == 0


def test_wait_async_holds_no_thread_and_times_out_alone() -> None:
    lay = layout()

    async def main(owner: KVTransport, dest: KVTransport) -> None:
        ids = [dest.expect([2 * i, 2 * i + 1], timeout_s=10.0) for i in range(20)]
        never = dest.expect([60], timeout_s=0.3)
        waits = [asyncio.create_task(dest.wait_async(t)) for t in [*ids, never]]
        for i, transfer_id in enumerate(ids):
            await owner.push_async(dest.metadata(), transfer_id, [i, i + 30], [2 * i, 2 * i + 1], timeout_s=10.0)
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert isinstance(results[-1], TransferTimeoutError)
        assert all(r.num_blocks == 2 for r in results[:-1])
        for i in range(20):
            assert torch.equal(dest.kv[2 * i + 1], block_pattern(lay, i + 30))

    with _transport("loopback", filled_kv(lay)) as owner, _transport("loopback", empty_kv(lay)) as dest:
        asyncio.run(asyncio.wait_for(main(owner, dest), timeout=30))


# Between two processes.


@pytest.fixture(scope="module", params=TRANSPORTS)
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[str, Owner]]:
    with spawn_owner(request.param) as proc:
        yield request.param, proc


def test_peer_pushes_into_our_blocks(peer: tuple[str, Owner]) -> None:
    """We are the destination: the peer process WRITEs its blocks into ours and we learn of it."""
    name, proc = peer
    lay = layout()
    with _transport(name, empty_kv(lay, "cpu")) as dest:
        src, dst = [0, 1, 2, 17, 30, 63], [40, 41, 42, 5, 6, 7]
        transfer_id = dest.expect(dst, timeout_s=20.0)
        proc.send("PUSH", "bfloat16", dest.metadata().hex(), transfer_id, src, dst, 20.0)
        assert proc.wait_for(f"PUSHED {transfer_id}") == ["PUSHED", transfer_id, "OK"]
        landed = dest.wait(transfer_id)
        assert landed.num_blocks == 6
        for s, d in zip(src, dst):
            assert torch.equal(dest.kv[d], block_pattern(lay, s)), (s, d)
        untouched = sorted(set(range(lay.num_blocks)) - set(dst))
        assert not dest.kv[untouched].any()


def test_push_expected_ahead_is_looked_for_once_hurried(peer: tuple[str, Owner]) -> None:
    """A push expected ahead (a handoff sent before its prefill) costs a polling receiver (nixl)
    nothing until ``hurry``; then it lands as any push (tcp's landing needs no hurry)."""
    name, proc = peer
    lay = layout()
    with _transport(name, empty_kv(lay, "cpu")) as dest:
        src, dst = [3, 4, 60], [8, 9, 10]
        transfer_id = dest.expect(dst, timeout_s=20.0, ahead=True)
        proc.send("PUSH", "bfloat16", dest.metadata().hex(), transfer_id, src, dst, 20.0)
        assert proc.wait_for(f"PUSHED {transfer_id}") == ["PUSHED", transfer_id, "OK"]
        # Unhurried, it is looked for every 0.5 s (hurried, or before this change: every 0.2 ms).
        assert getattr(dest, "num_notif_polls", 0) <= 2, "polled for a push expected ahead, not hurried"
        dest.hurry(transfer_id)
        assert dest.wait(transfer_id).num_blocks == 3
        assert getattr(dest, "num_notif_polls", 1) > 0
        for s, d in zip(src, dst):
            assert torch.equal(dest.kv[d], block_pattern(lay, s))


def test_we_push_into_the_peer(peer: tuple[str, Owner]) -> None:
    """We are the owner: the peer expects, we push, the peer's wait returns and its blocks match."""
    name, proc = peer
    lay = layout()
    with _transport(name, filled_kv(lay)) as owner:
        src, dst = [9, 10, 11, 50], [1, 2, 3, 20]
        proc.send("EXPECT", "a", "bfloat16", dst, 20.0)
        _, _, transfer_id = proc.wait_for("EXPECTED a")
        bytes_before = _sample("tandem_kv_transfer_bytes_total", transport=name)
        result = owner.push(proc.metadata["bfloat16"], transfer_id, src, dst, timeout_s=20.0)
        assert result.num_bytes == 4 * lay.bytes_per_block
        assert _sample("tandem_kv_transfer_bytes_total", transport=name) - bytes_before == result.num_bytes
        assert proc.wait_for("LANDED a") == ["LANDED", "a", "OK"]
        proc.send("CHECK", "a", "bfloat16", src, dst)
        assert proc.wait_for("CHECKED a") == ["CHECKED", "a", "OK"]
        if name == "tcp":  # a message-based push that nobody awaits is refused before a byte moves
            with pytest.raises(TransferError, match="no transfer"):
                owner.push(proc.metadata["bfloat16"], transfer_id, [0], [30], timeout_s=5.0)
