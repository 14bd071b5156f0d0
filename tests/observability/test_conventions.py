"""Metric names and label sets follow Prometheus's conventions (runtime/metric_catalog.py): the
catalog passes the checker, the checker catches each kind of violation, and what the router and
the workers really serve is the catalog (same names, types and labels; nothing undefined)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import pytest
from obs_testlib import get
from prometheus_client.parser import text_string_to_metric_families

from deploy import observability_gen
from runtime import metric_catalog as mc

GOOD = mc.Metric("tandem_router_example_seconds", "histogram", "an example", "router", ("role",), "seconds")


def test_catalog_follows_the_conventions() -> None:
    assert mc.convention_problems(mc.CATALOG.values()) == []
    assert len(mc.CATALOG) >= 40


@pytest.mark.parametrize("change, words", [
    (dict(name="router_example_seconds"), "tandem_"),
    (dict(name="tandem_router_Example_seconds"), "lower snake case"),
    (dict(name="tandem_router_example_total", kind="gauge"), "_total"),
    (dict(name="tandem_router_examples", kind="counter", unit=""), "_total"),
    (dict(name="tandem_router_example_ms", unit=""), "base units"),
    (dict(name="tandem_router_wait", unit=""), "seconds"),
    (dict(name="tandem_router_example_bytes"), "last word"),
    (dict(unit="milliseconds", name="tandem_router_example_milliseconds"), "base unit"),
    (dict(labels=("request_id",)), "bounded vocabulary"),
    (dict(labels=("role", "role")), "repeats"),
    (dict(help=" "), "help"),
    (dict(name="tandem_router_kv_usage_ratio", kind="gauge", unit=""), "declares none"),
    (dict(exporter="planner"), "served by the router"),
    (dict(name="tandem_planner_example_seconds"), "served by the planner"),
    (dict(per_request=True), "labelled model"),
])
def test_the_checker_catches(change: dict, words: str) -> None:
    bad = dataclasses.replace(GOOD, **change)
    problems = mc.convention_problems([bad])
    assert any(words in p for p in problems), problems
    assert mc.convention_problems([GOOD]) == []


def test_dashboards_read_catalog_metrics_only() -> None:
    queried = observability_gen.metrics_queried()
    assert queried <= set(mc.CATALOG), queried - set(mc.CATALOG)
    with pytest.raises(KeyError):
        observability_gen.m("tandem_router_time_to_first_token_secs")


def _families(url: str) -> dict[str, tuple[str, set[str]]]:
    """A /metrics page's tandem_ families: name (as exposed: counters with _total) -> (type, labels)."""
    out = {}
    for fam in text_string_to_metric_families(get(url).decode()):
        if not fam.name.startswith("tandem_"):
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        out[name] = (fam.type, labels)
    return out


def test_served_metrics_are_the_catalog(cluster) -> None:
    pages = {"router": f"{cluster.http_url}/metrics"}
    for w in cluster.workers("prefill") + cluster.workers("decode"):
        pages[w.name] = w.ready["metrics"]
    seen: set[str] = set()
    for who, url in pages.items():
        for name, (kind, labels) in _families(url).items():
            assert name in mc.CATALOG, f"{who} serves {name}, which runtime/metric_catalog.py does not define"
            metric = mc.CATALOG[name]
            assert kind == metric.kind, (who, name, kind, metric.kind)
            assert labels <= set(metric.labels), (who, name, labels, metric.labels)
            seen.add(name)
    # Every metric of the catalog is served by one of the processes (planner gauges appear only once
    # a decision is in etcd, kv transfer and handoff series once a transfer happened).
    # The planner service's own are checked where a planner runs (tests/planner/test_planner_live.py).
    lazy = {n for n, m in mc.CATALOG.items() if (m.labels and m.kind != "gauge") or m.exporter == "planner"} | {
        mc.ROUTER_PLANNER_DECISION_TIME.name, mc.ROUTER_PLANNER_PREDICTED_RATE.name, mc.ROUTER_PLANNER_DESIRED.name,
        mc.ROUTER_PLANNER_REASON.name, mc.ROUTER_WORKER_KV_USAGE.name, mc.ROUTER_WORKER_WAITING.name,
        mc.ROUTER_WORKER_RUNNING.name, mc.ROUTER_PREFIX_HIT.name, mc.ROUTER_SLO_TARGET.name,
        mc.ROUTER_SLO_ATTAINMENT.name, mc.ROUTER_WORKERS.name, mc.ROUTER_KV_INDEXED_BLOCKS.name}
    assert set(mc.CATALOG) - lazy <= seen, set(mc.CATALOG) - lazy - seen


def _complete(url: str, model: str) -> int:
    body = {"model": model, "prompt": [1000 + k for k in range(40)], "max_tokens": 4, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_request_metrics_are_labelled_with_the_served_model(cluster) -> None:
    """The router's per-request series (TTFT, ITL, end-to-end, tokens) carry ``model``, and its only
    value is the served model: a request naming another model (a client's string) adds none."""
    served = cluster.router["model"]
    assert _complete(cluster.http_url, "no-such-model") == 404
    assert _complete(cluster.http_url, served) == 200
    per_request = {n for n, m in mc.CATALOG.items() if m.per_request}
    assert {mc.ROUTER_TTFT.name, mc.ROUTER_ITL.name, mc.ROUTER_E2E.name} <= per_request
    models: dict[str, set[str | None]] = {}
    for fam in text_string_to_metric_families(get(f"{cluster.http_url}/metrics").decode()):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        if name in per_request:
            models[name] = {s.labels.get("model") for s in fam.samples}
    assert models == {name: {served} for name in per_request}, models
