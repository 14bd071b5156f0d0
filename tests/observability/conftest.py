"""One sim cluster for the observability tests (real etcd, router and worker processes on the sim
engine: disaggregated, 1 prefill + 2 decode workers over TCP), shared by the whole session.
Debian's chromium and Prometheus (``make system-deps``) must be installed: a missing one fails the
tests that need it (not skipped), CI installs them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from obs_testlib import CONFIG

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(ClusterConfig(**CONFIG), num_prefill=1, num_decode=2, quiet=True,
                     log_dir=tmp_path_factory.mktemp("observability-logs"))
    c.start(240.0)
    try:
        yield c
    finally:
        c.stop()




@pytest.fixture(scope="session")
def decided(cluster: LocalCluster) -> int:
    """A planner decision in etcd (as the planner writes it); its decided_at_unix_ms."""
    from obs_testlib import planner_decision, write_decision

    at = int(time.time() * 1000)
    write_decision(cluster, planner_decision(at, "itl-over-slo", num_decode=3))
    return at
