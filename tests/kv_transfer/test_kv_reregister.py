"""A transport follows a cache that moved (a parked worker's GPU cache comes back at a new address):
``release`` stops serving it (awaited pushes fail, transfers are refused), ``register`` registers it
again under the next epoch, and a peer that cached our old registration loads the new one on its
next transfer and refuses older metadata. Here on the CPU: the "moved" cache is another tensor of
the same layout, so a peer that kept the old registration would read the old tensor's bytes."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from kv_helpers import empty_kv, layout

from kv_transfer import PeerMetadata, TransferError, make_transport, nixl_available
from kv_transfer.inbox import Inbox

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed here")
NAMES = ["loopback", "tcp", pytest.param("nixl", marks=needs_nixl)]


def filled(value: float) -> torch.Tensor:
    kv = empty_kv(layout())
    kv.fill_(value)
    return kv


@pytest.mark.parametrize("name", NAMES)
def test_a_moved_cache_is_registered_again_and_peers_follow_it(name: str) -> None:
    owner, dest = make_transport(name), make_transport(name)
    try:
        old, new = filled(1.0), filled(2.0)
        owner.register(old)
        dest.register(empty_kv(layout()))
        first = owner.metadata()
        assert PeerMetadata.decode(first).epoch == 1
        dest.pull(first, [3, 4], [0, 1])
        assert dest.kv[:2].eq(1.0).all()

        tid = owner.expect([7], timeout_s=0.5)  # awaited when it parks: that push fails (release waits out
        # its deadline: a one-sided write started before it may still land)
        owner.release()
        with pytest.raises(TransferError, match="released"):
            owner.wait(tid)
        with pytest.raises(TransferError, match="released"):
            owner.expect([8])
        with pytest.raises(TransferError, match="released"):
            owner.pull(dest.metadata(), [0], [0])
        with pytest.raises(RuntimeError, match="released"):
            owner.metadata()
        with pytest.raises(ValueError, match="layout"):
            owner.register(empty_kv(layout(num_blocks=32)))

        owner.register(new)  # the cache "came back" at a new address
        second = owner.metadata()
        assert PeerMetadata.decode(second).epoch == 2
        dest.pull(second, [5, 6], [2, 3])
        assert dest.kv[2:4].eq(2.0).all(), "the peer read the cache's old registration"
        if name == "nixl":  # (loopback and tcp reach the tensor itself, wherever it is: nothing goes stale)
            with pytest.raises(TransferError, match="stale"):
                dest.pull(first, [5], [4])  # an older registration than the peer knows: refused
        # and pushes land in the new registration
        tid = owner.expect([9], timeout_s=30)
        dest.kv[10].fill_(3.0)
        dest.push(owner.metadata(), tid, [10], [9])
        owner.wait(tid)
        assert new[9].eq(3.0).all() and old[9].eq(1.0).all()
        with pytest.raises(RuntimeError, match="twice"):
            owner.register(new)
    finally:
        owner.close()
        dest.close()


def test_auto_drops_at_release_a_child_that_cannot_register_again() -> None:
    store = dist.HashStore()
    auto = make_transport("auto", store=store, transports=("tcp", "nccl"))
    try:
        auto.register(filled(1.0))
        assert set(auto.children) == {"tcp", "nccl"} and auto.can_reregister
        nccl = auto.children["nccl"]
        assert not nccl.can_reregister and "two GPUs" in nccl.reregister_refusal
        with pytest.raises(RuntimeError, match="cannot release"):
            nccl.release()
        auto.release()
        auto.register(filled(2.0))
        assert set(auto.children) == {"tcp"}
        assert PeerMetadata.decode(auto.metadata()).epoch == 2
    finally:
        auto.close()


@needs_nixl
def test_nixl_release_has_the_peers_that_loaded_us_drop_our_agent_and_refuses_stale_loads() -> None:
    """On one machine a NIXL peer's mapping of our cache keeps its memory allocated (CUDA IPC): at
    release every peer that loaded our agent drops it, answered; a push with the metadata of a
    registration we released (a handoff in flight across a park) is refused, nothing written."""
    dest, owner = make_transport("nixl"), make_transport("nixl")
    try:
        old, new = filled(1.0), filled(2.0)
        dest.register(old)
        owner.register(filled(5.0))
        first = dest.metadata()
        tid = dest.expect([3], timeout_s=30)
        owner.push(first, tid, [0], [3])  # the owner loads our agent and says so
        dest.wait(tid)
        assert old[3].eq(5.0).all()
        assert dest.name in owner._peers

        dest.release()
        assert dest.name not in owner._peers, "the peer kept our released registration loaded"
        dest.register(new)
        with pytest.raises(TransferError, match=r"registration 1 .* at 2"):
            owner.push(first, "stale-transfer", [1], [4])  # loads registration 1 again: we refuse it
        assert new.eq(2.0).all(), "a stale push wrote into the cache's new memory"
        assert dest.name not in owner._peers
        tid = dest.expect([4], timeout_s=30)
        owner.push(dest.metadata(), tid, [1], [4])
        dest.wait(tid)
        assert new[4].eq(5.0).all()
    finally:
        owner.close()
        dest.close()


@needs_nixl
def test_a_released_nixl_transport_sleeps() -> None:
    """Parked (released), the notifications thread waits for the next registration: it spun a core
    (its wait returned at once on the closed inbox) and slowed the worker's own unpark."""
    transport = make_transport("nixl")
    try:
        transport.register(filled(1.0))
        transport.release()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(1.0)
        busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        assert busy < 0.3, f"a released NIXL transport kept {busy:.2f} of a core busy"
    finally:
        transport.close()


def test_a_closed_inbox_waits_for_a_registration_instead_of_returning_at_once() -> None:
    inbox = Inbox()
    inbox.close(TransferError("released"))
    start = time.perf_counter()
    assert not inbox.wait_for_pending(0.2)
    assert time.perf_counter() - start >= 0.15
    inbox.reopen()
    inbox.expect([1], 5.0, 4)
    assert inbox.wait_for_pending(0.2)
