"""One sim-engine cluster for the hardening tests: real etcd, a real router, one prefill and two
decode workers as processes (``--engine sim``: the workers' block manager, scheduler, KV events
and transfers run; a timing model stands in for the forward pass), so faults, overload and
hostile input cost seconds, not minutes.

Tests that need another router setting (API keys, TLS, tight admission) start their own router
replica on this cluster's etcd (``LocalCluster.add_router``). Tests that stop or restart a
process put it back as they found it; ``disruptive`` ones (etcd outage, load, shutdown) run last
here, and the cluster stops after them (not at the session's end).

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
from cluster_lifetime import stop_after_last_use
from hardening_lib import CONFIG

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disruptive: stops etcd, overloads or shuts down processes; runs last in "
                            "tests/hardening")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The disruptive tests last among this directory's, which keep their place in the session
    (not at its end: sim_cluster stops once they are done, tests/cluster_lifetime.py)."""
    places = [i for i, item in enumerate(items) if item.path.is_relative_to(HERE)]
    ours = sorted((items[i] for i in places), key=lambda item: item.get_closest_marker("disruptive") is not None)
    for i, item in zip(places, ours, strict=True):
        items[i] = item


@pytest.fixture(scope="session")
def sim_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir: Path = tmp_path_factory.mktemp("hardening")
    cluster = LocalCluster(ClusterConfig(**CONFIG), num_prefill=1, num_decode=2, quiet=True, log_dir=log_dir)
    stop = stop_after_last_use(request, HERE, "sim_cluster", cluster.stop)
    cluster.start(timeout_s=180)
    try:
        yield cluster
    finally:
        stop()
