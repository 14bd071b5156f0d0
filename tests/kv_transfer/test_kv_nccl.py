"""The nccl transport between two real processes, over the gloo backend (CPU tensors): one pair
group per pair of workers, built from a store the caller provides (here a TCPStore), never through
the global ``init_process_group``."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from kv_helpers import Owner, block_pattern, empty_kv, filled_kv, layout, spawn_owner
from prometheus_client import REGISTRY

from kv_transfer import KVTransport, TransferError, TransferTimeoutError, make_transport

pytestmark = pytest.mark.timeout(120)


def _connects() -> float:
    return REGISTRY.get_sample_value("tandem_kv_transfer_connects_total", {"transport": "nccl"}) or 0.0


@pytest.fixture(scope="module")
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)


@pytest.fixture(scope="module")
def peer(store: dist.TCPStore) -> Iterator[Owner]:
    with spawn_owner("nccl", store=f"127.0.0.1:{store.port}") as proc:
        yield proc


def _nccl(store: dist.Store, kv: torch.Tensor) -> KVTransport:
    transport = make_transport("nccl", store=store)
    transport.register(kv)
    return transport


def test_needs_a_store() -> None:
    with pytest.raises(ValueError, match="Store"):
        make_transport("nccl", store=None)


def test_pull_over_one_pair_group(store: dist.TCPStore, peer: Owner) -> None:
    lay = layout()
    md = peer.metadata["bfloat16"]
    assert not dist.is_initialized()
    with _nccl(store, empty_kv(lay)) as puller:
        assert puller.backend == "gloo"
        connects = _connects()
        remote, local = [0, 1, 2, 17, 18, 30, 63], [20, 21, 22, 5, 6, 47, 0]
        assert puller.pull(md, remote, local, timeout_s=30.0).num_blocks == 7
        assert _connects() == connects + 1  # the pair group, built once
        puller.pull(md, list(range(40, 48)), list(range(30, 38)), timeout_s=30.0)  # one run: no staging
        assert _connects() == connects + 1  # ... and reused
        for r, loc in [*zip(remote, local), *zip(range(40, 48), range(30, 38))]:
            assert torch.equal(puller.kv[loc], block_pattern(lay, r)), (r, loc)
    assert not dist.is_initialized(), "the global process group is never touched"


def test_push_both_ways(store: dist.TCPStore, peer: Owner) -> None:
    lay = layout()
    with _nccl(store, filled_kv(lay)) as us:
        peer.send("EXPECT", "a", "bfloat16", [1, 2, 3, 60], 30.0)
        _, _, transfer_id = peer.wait_for("EXPECTED a")
        us.push(peer.metadata["bfloat16"], transfer_id, [9, 10, 11, 33], [1, 2, 3, 60], timeout_s=30.0)
        assert peer.wait_for("LANDED a") == ["LANDED", "a", "OK"]
        peer.send("CHECK", "a", "bfloat16", [9, 10, 11, 33], [1, 2, 3, 60])
        assert peer.wait_for("CHECKED a") == ["CHECKED", "a", "OK"]

        us.kv.zero_()
        transfer_id = us.expect([5, 6, 50], timeout_s=30.0)
        peer.send("PUSH", "bfloat16", us.metadata().hex(), transfer_id, [7, 8, 9], [5, 6, 50], 30.0)
        assert peer.wait_for(f"PUSHED {transfer_id}") == ["PUSHED", transfer_id, "OK"]
        assert us.wait(transfer_id).num_blocks == 3
        for s, d in zip([7, 8, 9], [5, 6, 50]):
            assert torch.equal(us.kv[d], block_pattern(lay, s))


def test_a_timeout_breaks_only_that_transfer_and_the_pair_is_rebuilt(store: dist.TCPStore, peer: Owner) -> None:
    lay = layout()
    md = peer.metadata["bfloat16"]
    with _nccl(store, filled_kv(lay)) as us:
        us.pull(md, [0], [0], timeout_s=30.0)
        connects = _connects()
        peer.send("EXPECT", "t", "bfloat16", [40, 41], 1.0)
        _, _, doomed = peer.wait_for("EXPECTED t")
        with pytest.raises(TransferTimeoutError):
            us.push(md, doomed, [1, 2], [40, 41], timeout_s=1e-6)
        assert peer.wait_for("LANDED t") == ["LANDED", "t", "ERR", "TransferTimeoutError"]
        peer.send("EXPECT", "u", "bfloat16", [42, 43], 30.0)
        _, _, transfer_id = peer.wait_for("EXPECTED u")
        us.push(md, transfer_id, [3, 4], [42, 43], timeout_s=30.0)
        assert peer.wait_for("LANDED u") == ["LANDED", "u", "OK"]
        assert _connects() == connects + 1  # a new generation of the pair
        with pytest.raises(TransferError, match="no transfer"):  # refused before any data: the pair stays
            us.push(md, "unknown", [3], [44], timeout_s=30.0)
        us.pull(md, [5], [5], timeout_s=30.0)
        assert _connects() == connects + 1
