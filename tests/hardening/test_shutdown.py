"""Prompt exit: an idle worker and an idle router exit within 1 s of SIGTERM, the issue's bound
(they take 0.1-0.4 s here; a worker took ~0.9 s before, in its interpreter's teardown, and with a
5 s server grace longer), and the worker's registration is gone from etcd at once (the router
drops it without waiting for the lease)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from hardening_lib import completion, live, router_lists, start_router, wait_serves, wait_until

from deploy.local_cluster import LocalCluster

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(180)]
EXIT_WITHIN_S = 1.0  # the bound; CI's loaded two cores are slower than this machine
# Keep-alives go every TTL/3 (0.67 s), so an expired lease would vanish >= 1.33 s after the exit;
# a deregistered worker is gone within a watch event.
DEREGISTERED_WITHIN_S = 1.25


def _exit_time(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return time.monotonic() - t0


def test_idle_processes_exit_promptly_on_sigterm(sim_cluster: LocalCluster) -> None:
    worker = sim_cluster.add_worker("decode", timeout_s=120)
    router = start_router(sim_cluster)
    wait_serves(router.ready["http"])
    assert completion(sim_cluster, url=router.ready["http"])[0] == 200  # both have served: not a cold exit
    time.sleep(0.5)  # idle
    want = {"prefill": len(live(sim_cluster, "prefill")), "decode": len(live(sim_cluster, "decode")) - 1}
    worker_s = _exit_time(worker.proc)
    t_exit = time.monotonic()
    wait_until(lambda: router_lists(sim_cluster) == want, 5, "the router to drop the stopped worker")
    dropped_s = time.monotonic() - t_exit
    router_s = _exit_time(router.proc)
    print(f"SIGTERM when idle: worker exited in {worker_s:.2f} s (code {worker.proc.returncode}), router in "
          f"{router_s:.2f} s (code {router.proc.returncode}); the router dropped the worker {dropped_s:.2f} s after "
          "its exit")
    assert worker.proc.returncode == 0 and router.proc.returncode == 0
    assert worker_s < EXIT_WITHIN_S and router_s < EXIT_WITHIN_S
    assert dropped_s < DEREGISTERED_WITHIN_S  # deregistered, not expired (the lease TTL is 2 s)
