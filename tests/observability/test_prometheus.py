"""A real Prometheus (Debian's) against the sim cluster: the generated configs pass ``promtool
check config``, the checked-in files equal what the generator writes, Prometheus discovers the
cluster through the router's /metrics/targets and scrapes every process, and every expression of
every generated Grafana panel evaluates through Prometheus's HTTP API to a non-empty result with
a finite value (under load; the tier-switch panel has no observation without a planner)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from obs_testlib import GPUS_PER_WORKER, Load, get, system_tool, wait_for

from deploy import observability_gen

WINDOW = "20s"  # in place of Grafana's $__rate_interval
NO_DATA_WITHOUT_A_PLANNER = ("tandem_worker_role_switch_seconds",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("promtool"), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def prometheus(cluster, decided, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = system_tool("prometheus")
    d = tmp_path_factory.mktemp("prometheus")
    config = d / "prometheus.yml"
    router = urllib.parse.urlsplit(cluster.http_url).netloc
    config.write_text(yaml.safe_dump(observability_gen.prometheus_config(router, scrape_interval_s=1.0)))
    check = promtool("check", "config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    url = f"http://127.0.0.1:{free_port()}"
    with open(d / "prometheus.log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ok(f"{url}/-/ready"), 30, "Prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _ok(url: str) -> bool:
    try:
        get(url, timeout=2)
        return True
    except OSError:
        return False


def query(prometheus: str, expr: str) -> list[dict]:
    body = json.loads(get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_checked_in_files_are_generated() -> None:
    assert observability_gen.main(["--check"]) == 0, "run python -m deploy.observability_gen"


def test_promtool_checks_the_checked_in_configs() -> None:
    out = observability_gen.OUT_DIR
    for name in ("prometheus.yml", "prometheus-file-sd.yml"):
        check = promtool("check", "config", str(out / name))
        assert check.returncode == 0, (name, check.stdout + check.stderr)


def test_every_panel_query_returns_data(cluster, prometheus) -> None:
    workers = {w.ready["worker_id"] for w in cluster.workers("prefill") + cluster.workers("decode")}

    def up() -> set[str]:
        targets = json.loads(get(f"{prometheus}/api/v1/targets"))["data"]["activeTargets"]
        return {t["labels"].get("worker", t["labels"]["job"]) for t in targets if t["health"] == "up"}

    wait_for(lambda: up() >= workers | {"tandem-router"}, 30, "Prometheus to scrape the router and every worker")
    with Load(cluster.http_url, cluster.router["model"], concurrency=6):
        time.sleep(8)  # a few scrapes of the load
        empty, nan_only = [], []
        for dashboard, title, expr in observability_gen.panel_exprs():
            result = query(prometheus, expr.replace(observability_gen.RATE, WINDOW))
            values = [float(r["value"][1]) for r in result]
            if not values:
                empty.append(f"{dashboard} / {title}: {expr}")
            elif not any(v == v and abs(v) != float("inf") for v in values) and \
                    not any(m in expr for m in NO_DATA_WITHOUT_A_PLANNER):
                nan_only.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not nan_only, "panels with no finite value:\n" + "\n".join(nan_only)
    # the worker series carry their target's labels (role, worker, model)
    kv = query(prometheus, "tandem_worker_kv_usage_ratio")
    assert {r["metric"]["worker"] for r in kv} == workers
    assert {r["metric"]["role"] for r in kv} == {"prefill", "decode"}
    # GPUs per tier: what the workers registered (num_gpus_per_worker each)
    panel = next(p for p in observability_gen.dashboards()["tandem-overview.json"][1] if p.title == "GPUs per tier")
    gpus = {r["metric"]["role"]: float(r["value"][1]) for r in query(prometheus, panel.targets[0][0])}
    assert gpus == {role: GPUS_PER_WORKER * len(cluster.workers(role)) for role in ("prefill", "decode")}, gpus
    # the router's per-request series keep their own model label (honor_labels): no exported_model
    ttft = query(prometheus, "tandem_router_time_to_first_token_seconds_count")
    assert ttft and all(r["metric"].get("model") == cluster.router["model"] and "exported_model" not in r["metric"]
                        for r in ttft), ttft


def test_grafana_dashboards_reference_their_datasource() -> None:
    for path in sorted((observability_gen.OUT_DIR / "grafana").glob("*.json")):
        board = json.loads(Path(path).read_text())
        assert board["panels"], path
        for panel in board["panels"]:
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), (path, panel["title"])
            assert panel["datasource"]["uid"] == "${datasource}"
