"""Scrape targets of the cluster: ``tandem deploy targets --out FILE`` writes Prometheus file_sd
JSON read from a real etcd, equal to the router's /metrics/targets (http_sd); Prometheus's own
``promtool check service-discovery`` discovers every worker from it, with its labels; every
target serves /metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse

import yaml
from obs_testlib import get, system_tool

from deploy import observability_gen


def test_file_sd_from_etcd(cluster, tmp_path) -> None:
    out = tmp_path / "sd" / "tandem-targets.json"
    router = urllib.parse.urlsplit(cluster.http_url).netloc
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

    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(observability_gen.prometheus_config(file_sd=str(out))))
    sd = subprocess.run([system_tool("promtool"), "check", "service-discovery", "--timeout=3s", str(config), "tandem"],
                        capture_output=True, text=True, timeout=60)
    assert sd.returncode == 0, sd.stdout + sd.stderr
    found = json.loads(sd.stdout)
    discovered = {t["labels"].get("worker") for t in found if t["labels"].get("worker")}
    assert discovered == set(workers), sd.stdout
    assert {t["labels"]["job"] for t in found} == {"tandem-router", "tandem-prefill", "tandem-decode"}
