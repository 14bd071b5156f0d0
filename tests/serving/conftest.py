"""Clusters for the serving tests: real etcd, real worker and router processes, on 127.0.0.1.

Three clusters serve the whole session, and every one the collected tests need is launched at
once on first use (each loads the model in every process: loading them side by side is what
keeps the suite short):

- ``disagg_cluster``: 1 prefill + 1 decode, NIXL (DRAM, over UCX on lo) when installed, else TCP;
  the decode worker pulls.
- ``agg_cluster``: one aggregated worker, the reference for "disaggregated equals aggregated".
- ``tcp_cluster``: 1 prefill + 1 decode over the TCP transport, the prefill worker pushing, with
  the asynchronous engine step.
- ``agg_bf16_cluster``, ``disagg_bf16_cluster``: bfloat16, two threads aggregated and one per
  worker disaggregated (the thread count differs between the modes, the answers must not).

The worker-failure tests kill workers (the TCP cluster's, and the NIXL cluster's prefill worker
at the very end), so they are marked ``destructive`` and run after every other test.

These use float32 (greedy outputs comparable token for token), one CPU thread per worker (the
same arithmetic in every process), ``max_local_prefill_tokens=16`` (prompts over 16 tokens are
prefilled remotely) and a 2 s etcd lease (a dead worker leaves within 2 s). Process logs go to
pytest's temp dir (``clusters*/{disagg,agg,tcp}/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_testlib import LEASE_TTL_S, MAX_LOCAL_PREFILL_TOKENS, NIXL

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_COMMON = dict(port=0, grpc_port=0, dtype="float32", threads=1, kv_cache_gib=0.5, lease_ttl_s=LEASE_TTL_S,
               max_local_prefill_tokens=MAX_LOCAL_PREFILL_TOKENS)
SPECS: dict[str, tuple[dict, int]] = {  # fixture name -> (config, prefill workers)
    # The decode worker pulls (NIXL READ of DRAM, or TCP).
    "disagg_cluster": (dict(mode="disaggregated", transport="nixl" if NIXL else "tcp", kv_transfer_mode="pull"), 1),
    "agg_cluster": (dict(mode="aggregated", transport="tcp"), 0),
    # The prefill worker pushes (PushKV), and the asynchronous engine step on both tiers (off by
    # default on the CPU): the tests comparing this cluster's output with agg_cluster's check it
    # against the synchronous step.
    # Its prefill worker forces a timeout on pushes of requests whose id starts "forced-timeout-".
    "tcp_cluster": (dict(mode="disaggregated", transport="tcp", kv_transfer_mode="push", async_scheduling="on",
                         worker_env=("TANDEM_FAULT_PUSH=^forced-timeout-=timeout",)), 1),
    # bfloat16 on the CPU kernels, the thread count differing between the topologies: the
    # aggregated worker on two threads, the disaggregated workers on one each.
    "agg_bf16_cluster": (dict(mode="aggregated", transport="tcp", dtype="bfloat16", threads=2), 0),
    "disagg_bf16_cluster": (dict(mode="disaggregated", transport="tcp", dtype="bfloat16", threads=1), 1),
}
START_TIMEOUT_S = 480.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "destructive: kills cluster processes; runs after the other serving tests")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("destructive") is not None)  # stable: order kept otherwise


class ClusterPool:
    """Launches every cluster the session's tests use the first time one is asked for."""

    def __init__(self, needed: list[str], log_root: Path) -> None:
        self.needed = needed
        self.log_root = log_root
        self.clusters: dict[str, LocalCluster] = {}
        self.ready: set[str] = set()

    def get(self, name: str) -> LocalCluster:
        for other in dict.fromkeys([name, *self.needed]) if not self.clusters else [name]:
            if other not in self.clusters:
                overrides, num_prefill = SPECS[other]
                cfg = ClusterConfig(**{**_COMMON, **overrides})
                cluster = LocalCluster(cfg, num_prefill=num_prefill, num_decode=1, quiet=True,
                                       log_dir=self.log_root / other.removesuffix("_cluster"))
                self.clusters[other] = cluster.launch()  # from the main thread: see LocalCluster
        if name not in self.ready:
            self.clusters[name].wait_ready(START_TIMEOUT_S)
            self.ready.add(name)
        return self.clusters[name]

    def stop(self) -> None:
        for cluster in self.clusters.values():  # every process winds down at once, then each cluster is reaped
            for child in cluster.children:
                if child.proc.poll() is None:
                    child.proc.terminate()
        for cluster in self.clusters.values():
            cluster.stop()  # (never raises for a slow child: see LocalCluster.stop)


@pytest.fixture(scope="session")
def cluster_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterPool]:
    # (a test may also ask for a cluster by name, getfixturevalue: that one starts when asked)
    needed = [name for name in SPECS if any(name in item.fixturenames for item in request.session.items)]
    pool = ClusterPool(needed, tmp_path_factory.mktemp("clusters"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session")
def disagg_cluster(cluster_pool: ClusterPool) -> LocalCluster:
    # Without nixl this cluster runs on TCP and its NIXL path goes untested: in CI that is a failure
    # (tests/conftest.py fails CI on the skips it causes elsewhere), not a quiet fallback.
    if not NIXL and os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("CI: the nixl package is not installed (make install installs it): disagg_cluster would fall "
                    "back to TCP")
    return cluster_pool.get("disagg_cluster")


@pytest.fixture(scope="session")
def agg_cluster(cluster_pool: ClusterPool) -> LocalCluster:
    return cluster_pool.get("agg_cluster")


@pytest.fixture(scope="session")
def tcp_cluster(cluster_pool: ClusterPool) -> LocalCluster:
    return cluster_pool.get("tcp_cluster")


@pytest.fixture(scope="session")
def agg_bf16_cluster(cluster_pool: ClusterPool) -> LocalCluster:
    return cluster_pool.get("agg_bf16_cluster")


@pytest.fixture(scope="session")
def disagg_bf16_cluster(cluster_pool: ClusterPool) -> LocalCluster:
    return cluster_pool.get("disagg_bf16_cluster")
