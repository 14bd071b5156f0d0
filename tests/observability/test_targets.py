"""Scrape targets of the cluster: ``tandem deploy targets --out FILE`` writes Prometheus file_sd
JSON read from a real etcd, equal to the router's /metrics/targets (http_sd); Prometheus's own
``promtool check service-discovery`` discovers every worker and the running planner from it, with
their labels; every target serves /metrics; a stopped planner is no target."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse

import yaml
from obs_testlib import get, system_tool

from deploy import observability_gen
from deploy.planner_actuator import PlannerRunner


def test_file_sd_from_etcd(cluster, tmp_path) -> None:
    # a planner (dry run: it decides, acts on nothing) registered under its lease, as any planner is
    planner = PlannerRunner(cluster.cfg, None, dry_run=True, num_workers=3).start()
    try:
        _check_file_sd(cluster, tmp_path, planner)
    finally:
        planner.stop()
    # stopped: its lease is revoked with its registration, and it is no target
    assert not [g for g in json.loads(get(f"{cluster.http_url}/metrics/targets"))
                if g["labels"]["job"] == "tandem-planner"]


def _check_file_sd(cluster, tmp_path, planner: PlannerRunner) -> None:
    out = tmp_path / "sd" / "tandem-targets.json"
    router = urllib.parse.urlsplit(cluster.http_url).netloc
    _wait_listed(cluster.http_url, "tandem-planner")
    cli = subprocess.run([sys.executable, "-m", "deploy.cli", "deploy", "targets", "--out", str(out),
                          "--etcd-endpoints", ",".join(cluster.cfg.etcd_endpoints),
                          "--namespace", cluster.cfg.namespace, "--router", router],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    groups = json.loads(out.read_text())
    assert groups == json.loads(get(f"{cluster.http_url}/metrics/targets"))

    workers = {w.ready["worker_id"]: w for w in cluster.workers("prefill") + cluster.workers("decode")}
    listed = {g["labels"]["worker"]: g for g in groups if "worker" in g["labels"]}
    assert set(listed) == set(workers)
    for wid, group in listed.items():
        role = "prefill" if wid.startswith("prefill") else "decode"
        assert group["labels"]["role"] == role and group["labels"]["model"] == cluster.router["model"]
        assert group["targets"] == [urllib.parse.urlsplit(workers[wid].ready["metrics"]).netloc]
        assert b"tandem_worker_num_running" in get(f"http://{group['targets'][0]}/metrics")
    planners = [g for g in groups if g["labels"]["job"] == "tandem-planner"]
    assert [g["targets"] for g in planners] == [[urllib.parse.urlsplit(planner.metrics_url).netloc]]
    assert planners[0]["labels"]["role"] == "planner" and planners[0]["labels"]["model"] == cluster.router["model"]
    assert b"tandem_planner_desired_workers" in get(planner.metrics_url)

    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(observability_gen.prometheus_config(file_sd=str(out))))
    sd = subprocess.run([system_tool("promtool"), "check", "service-discovery", "--timeout=3s", str(config), "tandem"],
                        capture_output=True, text=True, timeout=60)
    assert sd.returncode == 0, sd.stdout + sd.stderr
    found = json.loads(sd.stdout)
    discovered = {t["labels"].get("worker") for t in found if t["labels"].get("worker")}
    assert discovered == set(workers), sd.stdout
    assert {t["labels"]["job"] for t in found} == {"tandem-router", "tandem-prefill", "tandem-decode", "tandem-planner"}
    assert [t["labels"]["__address__"] for t in found if t["labels"]["job"] == "tandem-planner"] == \
        planners[0]["targets"]


def _wait_listed(http_url: str, job: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not [g for g in json.loads(get(f"{http_url}/metrics/targets")) if g["labels"]["job"] == job]:
        assert time.monotonic() < deadline, f"{job} is not listed in /metrics/targets"
        time.sleep(0.1)
