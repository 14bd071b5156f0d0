"""One sim-engine cluster for the hardening tests: real etcd, a real router, one prefill and two
decode workers as processes (``--engine sim``: the workers' block manager, scheduler, KV events
and transfers run; a timing model stands in for the forward pass), so faults, overload and
hostile input cost seconds, not minutes.

Tests that need another router setting (API keys, TLS, tight admission) start their own router
replica on this cluster's etcd (``LocalCluster.add_router``). Tests that stop or restart a
process put it back as they found it; ``destructive`` ones (etcd outage, load, shutdown) run last.

Settings: a 2 s etcd lease (a dead or stopped worker leaves within it), the watchdog probing a
silent worker after 1 s (``worker_silence_s``) with a 1 s Health timeout, TCP transport, the
prefill worker pushing, and its pushes of requests named ``hang-*`` starting 6 s late (a hung
transfer: the decode worker gives up after ``kv_pull_timeout_s`` = 3 s).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hardening_lib import CONFIG

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "destructive: stops etcd, overloads or shuts down processes; runs last")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("destructive") is not None)  # stable otherwise


@pytest.fixture(scope="session")
def sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir: Path = tmp_path_factory.mktemp("hardening")
    cluster = LocalCluster(ClusterConfig(**CONFIG), num_prefill=1, num_decode=2, quiet=True, log_dir=log_dir)
    cluster.start(timeout_s=180)
    try:
        yield cluster
    finally:
        cluster.stop()
