"""A real Ray cluster for the Ray deploy tests (``test_ray_deploy.py`` is skipped where ray is not
installed): one head node on 127.0.0.1 with 8 CPUs and 4 logical
GPUs (workers run on the CPU and hold GPU ids, so placement is real), started once per test
module and always stopped, by its pid (never `ray stop`: other Ray nodes on the machine are not
ours). This process is a Ray driver too (it inspects and kills actors); the `tandem deploy`
commands under test run as subprocesses, as a user runs them.
"""

from __future__ import annotations

import os

# Ray reads this when it is imported: every Ray listener and this driver stay on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.ray_head import RayHead, session_pids, start_head, stop_head

NUM_GPUS = 4
NUM_CPUS = 8


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    import ray

    from deploy.ray_cli import connect

    head = start_head("127.0.0.1", num_cpus=NUM_CPUS, num_gpus=NUM_GPUS)
    old_state_dir = os.environ.get("TANDEM_DEPLOY_STATE_DIR")
    os.environ["TANDEM_DEPLOY_STATE_DIR"] = str(tmp_path_factory.mktemp("deploy-state"))
    try:
        connect(head.address)
        yield head
    finally:
        ray.shutdown()
        stop_head(head)
        if old_state_dir is None:
            os.environ.pop("TANDEM_DEPLOY_STATE_DIR", None)
        else:
            os.environ["TANDEM_DEPLOY_STATE_DIR"] = old_state_dir
        assert not session_pids(head), "Ray processes outlived the head"
        assert not Path(head.temp_dir).exists()
