"""The NCCL transport's rendezvous store over etcd (``worker.etcd_store.EtcdStore``): the Store
operations torch's process groups use, against a real etcd; two NCCL (gloo) transports that meet
only through it move blocks bit-exactly; the keys are bound to the writer's lease."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from kv_transfer import make_transport
from runtime import keys
from runtime.etcd_server import EtcdServer
from runtime.settings import ClusterConfig
from worker.etcd_store import EtcdStore

KV_SHAPE = (16, 2, 2, 16, 2, 8)  # blocks, layers, k/v, block size, kv heads, head dim


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def cfg(etcd: EtcdServer) -> ClusterConfig:
    return ClusterConfig(etcd_endpoints=(etcd.endpoint,), namespace="t" + uuid.uuid4().hex[:10], lease_ttl_s=2)


def test_store_operations(cfg: ClusterConfig) -> None:
    a, b = EtcdStore(cfg), EtcdStore(cfg)
    try:
        a.set("k", b"v1")
        assert b.get("k") == b"v1" and b.check(["k"]) and not b.check(["k", "missing"])
        assert [a.add("n", 2), b.add("n", 3), a.add("n", 0)] == [2, 5, 5]
        assert a.compare_set("c", "", "first") == b"first"
        assert b.compare_set("c", "other", "second") == b"first"  # expected value wrong: unchanged
        assert b.compare_set("c", "first", "second") == b"second"
        assert a.num_keys() == 3
        assert a.delete_key("k") and not a.check(["k"])
        with pytest.raises(dist.DistStoreError):
            b.wait(["never"], datetime.timedelta(seconds=0.2))
    finally:
        a.close()
    # every key is bound to the lease of its last writer: a's lease was revoked on close
    assert b.check(["c"])  # last written by b
    assert not b.check(["n"])  # last written by a (its add of 0)
    b.close()


def test_nccl_transports_meet_through_etcd(cfg: ClusterConfig) -> None:
    stores = EtcdStore(cfg), EtcdStore(cfg)
    owner, puller = (make_transport("nccl", store=s) for s in stores)
    src, dst = torch.randn(*KV_SHAPE), torch.zeros(*KV_SHAPE)
    try:
        owner.register(src)
        puller.register(dst)
        result = puller.pull(owner.metadata(), [1, 2, 5], [3, 4, 9], timeout_s=60)
        assert result.num_blocks == 3
        assert all(torch.equal(dst[d], src[s]) for s, d in ((1, 3), (2, 4), (5, 9)))
        transfer_id = puller.expect([0, 7], timeout_s=60)
        owner.push(puller.metadata(), transfer_id, [8, 11], [0, 7], timeout_s=60)
        puller.wait(transfer_id)
        assert torch.equal(dst[0], src[8]) and torch.equal(dst[7], src[11])
        assert stores[0].num_keys() > 0  # the pair's rendezvous happened under the namespace's prefix
        assert keys.nccl_store_prefix(cfg.namespace).startswith(keys.namespace_prefix(cfg.namespace))
    finally:
        owner.close()
        puller.close()
        for s in stores:
            s.close()
