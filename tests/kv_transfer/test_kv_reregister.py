"""A transport follows a cache that moved (a parked worker's GPU cache comes back at a new address):
``release`` stops serving it (awaited pushes fail, transfers are refused), ``register`` registers it
again under the next epoch, and a peer that cached our old registration loads the new one on its
next transfer and refuses older metadata. Here on the CPU: the "moved" cache is another tensor of
the same layout, so a peer that kept the old registration would read the old tensor's bytes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from kv_helpers import empty_kv, layout

from kv_transfer import PeerMetadata, TransferError, make_transport, nixl_available

NAMES = ["loopback", "tcp", pytest.param(
    "nixl", marks=pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed here"))]


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
