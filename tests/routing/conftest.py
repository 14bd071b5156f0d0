"""Clusters for the end-to-end routing tests (real etcd, worker and router processes):

- ``cpu_cluster``: two aggregated decode workers running the real model (SmolLM2 on CPU,
  float32, one thread each), KV-aware routing;
- ``sim_cluster``: 2 prefill + 2 decode workers on the ``sim`` engine, disaggregated.

Both are launched together the first time either is asked for (loading the model in every
process side by side is what keeps the suite short), and stopped after the last test that uses
them (tests/cluster_lifetime.py). Logs go to pytest's temp dir.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_lifetime import stop_after_last_use

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_COMMON = dict(port=0, grpc_port=0, lease_ttl_s=2, metrics_interval_s=0.25, routing_policy="kv")
SPECS: dict[str, tuple[dict, int, int]] = {  # fixture -> (config, prefill workers, decode workers)
    "cpu_cluster": (dict(mode="aggregated", dtype="float32", threads=1, kv_cache_gib=0.25, transport="tcp"), 0, 2),
    "sim_cluster": (dict(mode="disaggregated", engine="sim", kv_cache_gib=0.25, transport="tcp",
                         max_local_prefill_tokens=64), 2, 2),
}


class ClusterPool:
    def __init__(self, needed: list[str], log_root) -> None:
        self.needed, self.log_root = needed, log_root
        self.clusters: dict[str, LocalCluster] = {}
        self.ready: set[str] = set()

    def get(self, name: str) -> LocalCluster:
        if not self.clusters:
            for other in dict.fromkeys([name, *self.needed]):
                overrides, num_prefill, num_decode = SPECS[other]
                cluster = LocalCluster(ClusterConfig(**_COMMON, **overrides), num_prefill=num_prefill,
                                       num_decode=num_decode, quiet=True, log_dir=self.log_root / other)
                self.clusters[other] = cluster.launch()
        if name not in self.ready:
            self.clusters[name].wait_ready(480.0)
            self.ready.add(name)
        return self.clusters[name]

    def stop(self) -> None:
        """Stop the clusters side by side (each waits seconds for its processes to exit)."""
        threads = [threading.Thread(target=c.stop) for c in self.clusters.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@pytest.fixture(scope="session")
def routing_clusters(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterPool]:
    needed = [name for name in SPECS if any(name in item.fixturenames for item in request.session.items)]
    pool = ClusterPool(needed, tmp_path_factory.mktemp("routing-clusters"))
    stop = stop_after_last_use(request, Path(__file__).parent, "routing_clusters", pool.stop)
    try:
        yield pool
    finally:
        stop()


@pytest.fixture(scope="session")
def cpu_cluster(routing_clusters: ClusterPool) -> LocalCluster:
    return routing_clusters.get("cpu_cluster")


@pytest.fixture(scope="session")
def sim_cluster(routing_clusters: ClusterPool) -> LocalCluster:
    return routing_clusters.get("sim_cluster")
