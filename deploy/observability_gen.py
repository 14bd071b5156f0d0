"""Generate ``deploy/observability/``: Prometheus scrape configs and the Grafana dashboards, from
the metric definitions of ``runtime.metric_catalog`` (every metric a panel reads is looked up
there: a renamed or removed metric fails the generation, not a panel at 3 a.m.).

    python -m deploy.observability_gen                 # rewrite deploy/observability/
    python -m deploy.observability_gen --check         # exit 1 if the checked-in files differ

Files:

- ``prometheus.yml``: scrapes a running cluster through the router's ``/metrics/targets``
  (HTTP service discovery: the router and every registered worker, labelled role/worker/model);
- ``prometheus-file-sd.yml``: the same from a file that ``tandem deploy targets --out FILE``
  writes from etcd (a Ray deployment, or a Prometheus that cannot reach a router);
- ``grafana/tandem-overview.json`` (SLO attainment, TTFT/ITL percentiles against the SLO, traffic),
  ``grafana/tandem-tiers.json`` (per tier: workers, queue, queue wait, prefill time, KV usage, prefix
  hits), ``grafana/tandem-kv.json`` (KV transfers and handoffs, the host KV tier), ``grafana/tandem-planner.json``
  (desired vs actual workers, predicted vs observed load, reasons, tier switches).

The dashboards take their data source from a ``datasource`` variable (any Prometheus).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime import metric_catalog as mc

OUT_DIR = Path(__file__).resolve().parent / "observability"
RATE = "$__rate_interval"  # Grafana's; tests put a real window in its place
DEFAULT_ROUTER = "127.0.0.1:8000"
FILE_SD = "tandem-targets.json"
_METRIC_RE = re.compile(r"\btandem_[a-z0-9_]+")


def m(name: str, suffix: str = "") -> str:
    """A catalog metric's series name (``suffix``: ``_bucket``, ``_sum``, ``_count`` of a histogram)."""
    metric = mc.get(name)
    if suffix and metric.kind != "histogram":
        raise ValueError(f"{name} is a {metric.kind}, it has no {suffix}")
    return metric.name + suffix


def quantile(q: float, name: str, by: str = "", where: str = "") -> str:
    labels = ", ".join(x for x in ("le", by) if x)
    return f"histogram_quantile({q}, sum by ({labels}) (rate({m(name, '_bucket')}{where}[{RATE}])))"


def rate(name: str, by: str = "", where: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(name)}{where}[{RATE}]))"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    max: float | None = None
    dashed: set[str] = field(default_factory=set)  # legends drawn as dashed lines (SLO targets)


def _pct(name: str, by: str = "", legend_by: str = "") -> list[tuple[str, str]]:
    prefix = f"{{{{{legend_by}}}}} " if legend_by else ""
    return [(quantile(q, name, by), f"{prefix}p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def _per_tier(name: str) -> str:
    """A router's per-tier gauge of the cluster: every router replica sees the same workers, so
    the replicas' values are one value (max), not parts of a sum."""
    return f"max by (role) ({m(name)})"


def dashboards() -> dict[str, tuple[str, list[Panel]]]:
    """file name -> (title, panels)."""
    slo = m("tandem_router_slo_target_seconds")
    return {
        "tandem-overview.json": ("tandem: cluster overview", [
            Panel("SLO attainment over the router's window", [(f"{m('tandem_router_slo_attainment_ratio')}",
                                                               "{{target}}")], "percentunit", max=1.0),
            Panel("Time to first token", [*_pct("tandem_router_time_to_first_token_seconds", "model", "model"),
                                          (f'{slo}{{target="ttft"}}', "SLO")], "s", dashed={"SLO"}),
            Panel("Inter-token latency", [*_pct("tandem_router_inter_token_latency_seconds", "model", "model"),
                                          (f'{slo}{{target="itl"}}', "SLO")], "s", dashed={"SLO"}),
            Panel("Requests per second", [(rate("tandem_router_requests_total", "status"), "{{status}}")], "reqps"),
            Panel("Tokens per second", [(rate("tandem_router_completion_tokens_total", "model"), "{{model}} generated"),
                                        (rate("tandem_router_prompt_tokens_total", "model"), "{{model}} prompt")]),
            Panel("Request duration", _pct("tandem_router_request_duration_seconds", "model", "model"), "s"),
            Panel("Workers per tier", [(_per_tier("tandem_router_workers"), "{{role}}")]),
            Panel("GPUs per tier", [(_per_tier("tandem_router_gpus"), "{{role}}")],
                  description="GPUs the registered workers hold (WorkerInfo.num_gpus; 0 on cpu)"),
            Panel("Requests in flight", [(f"sum ({m('tandem_router_inflight_requests')})", "in flight")]),
            Panel("Where prompts are prefilled", [(rate("tandem_router_route_decisions_total", "path"), "{{path}}")],
                  "reqps"),
        ]),
        "tandem-tiers.json": ("tandem: tiers", [
            Panel("Queued requests per tier", [(f"sum by (role) ({m('tandem_worker_num_waiting')})", "{{role}}")]),
            Panel("Running requests per tier", [(f"sum by (role) ({m('tandem_worker_num_running')})", "{{role}}")]),
            Panel("Queue wait per tier", _pct("tandem_worker_queue_wait_seconds", "role", "role"), "s"),
            Panel("Prefill time per tier", _pct("tandem_worker_prefill_seconds", "role", "role"), "s"),
            Panel("KV usage per tier (mean)", [(f"avg by (role) ({m('tandem_worker_kv_usage_ratio')})", "{{role}}")],
                  "percentunit", max=1.0),
            Panel("KV usage per worker", [(m("tandem_router_worker_kv_usage_ratio"), "{{role}} {{worker}}")],
                  "percentunit", max=1.0),
            Panel("Prefix cache hit ratio per tier",
                  [(f"{rate('tandem_worker_cached_prompt_tokens_total', 'role')} / "
                    f"{rate('tandem_worker_prompt_tokens_total', 'role')}", "{{role}}")], "percentunit", max=1.0),
            Panel("Prompt tokens still to compute",
                  [(f"sum by (role) ({m('tandem_worker_num_queued_prefill_tokens')})", "{{role}}")]),
            Panel("Engine steps per second", [(rate("tandem_worker_engine_steps_total", "role"), "{{role}}")]),
            Panel("Failed worker calls", [(rate("tandem_router_worker_failures_total", "role"), "{{role}}")], "reqps"),
        ]),
        "tandem-kv.json": ("tandem: KV cache and transfers", [
            Panel("KV transfer time per request", _pct("tandem_kv_transfer_duration_seconds", "transport",
                                                       "transport"), "s"),
            Panel("KV bytes per request", [(quantile(q, "tandem_kv_transfer_request_bytes", "transport"),
                                            f"{{{{transport}}}} p{round(q * 100)}") for q in (0.5, 0.99)], "bytes"),
            Panel("KV transfer bandwidth", [(rate("tandem_kv_transfer_bytes_total", "transport"), "{{transport}}")],
                  "Bps"),
            Panel("KV handoff on the decode worker", _pct("tandem_kv_handoff_seconds", "mode", "mode"), "s"),
            Panel("Blocks handed off", [(rate("tandem_kv_handoff_blocks_total", "mode"), "{{mode}}")]),
            Panel("Handoffs recomputed locally", [(rate("tandem_kv_pull_fallbacks_total"), "recomputed")], "reqps"),
            Panel("Held blocks released on prefill workers", [(rate("tandem_kv_held_releases_total", "reason"),
                                                               "{{reason}}")]),
            Panel("Pinned KV blocks", [(f"sum by (worker) ({m('tandem_worker_num_pinned_blocks')})", "{{worker}}")]),
            Panel("Blocks in the router's KV index", [(m("tandem_router_kv_indexed_blocks"), "{{role}}")]),
            Panel("Host KV tier: blocks held", [
                (f"sum by (worker) ({m('tandem_worker_host_kv_used_blocks')})", "{{worker}} used"),
                (f"sum by (worker) ({m('tandem_worker_host_kv_blocks')})", "{{worker}} capacity")],
                  description="host_kv_cache_gib; 0 where the tier is off"),
            Panel("Host KV tier: blocks copied", [
                (rate("tandem_worker_host_kv_loaded_blocks_total", "role"), "{{role}} loaded back (hits)"),
                (rate("tandem_worker_host_kv_offloaded_blocks_total", "role"), "{{role}} offloaded")]),
            Panel("Host KV tier: copy bandwidth", [
                (rate("tandem_worker_host_kv_loaded_bytes_total", "role"), "{{role}} to the device"),
                (rate("tandem_worker_host_kv_offloaded_bytes_total", "role"), "{{role}} to the host")], "Bps"),
            Panel("Routing decision time", _pct("tandem_router_decision_seconds"), "s"),
        ]),
        "tandem-planner.json": ("tandem: planner", [
            Panel("Desired vs actual workers", [(m("tandem_router_planner_desired_workers"), "desired {{role}}"),
                                                (_per_tier("tandem_router_workers"), "actual {{role}}")]),
            Panel("Predicted vs observed request rate",
                  [(m("tandem_router_planner_predicted_request_rate"), "predicted"),
                   (rate("tandem_router_requests_total"), "observed")], "reqps"),
            Panel("Last decision's reasons", [(m("tandem_router_planner_decision_reason"), "{{code}} {{role}}")],
                  kind="table"),
            Panel("Age of the last decision",
                  [(f"time() - {m('tandem_router_planner_decision_timestamp_seconds')}", "age")], "s", kind="stat"),
            Panel("Decisions seen", [(f"increase({m('tandem_router_planner_decisions_total')}[{RATE}])", "decisions")]),
            Panel("Tier switch time", _pct("tandem_worker_role_switch_seconds"), "s"),
        ]),
    }


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.max is not None:
        defaults |= {"min": 0, "max": panel.max}
    overrides = [{"matcher": {"id": "byName", "options": legend},
                  "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                 {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}
                 for legend in sorted(panel.dashed)]
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "datasource": ds,
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "targets": [{"refId": chr(ord("A") + k), "datasource": ds, "expr": expr, "legendFormat": legend,
                     **({"instant": True, "format": "table"} if panel.kind == "table" else {})}
                    for k, (expr, legend) in enumerate(panel.targets)],
    }
    if panel.description:
        out["description"] = panel.description
    return out


def dashboard_json(file_name: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": file_name.removesuffix(".json"), "title": title, "tags": ["tandem"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "5s", "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}}]},
        "panels": [_panel_json(p, k + 1, 12 * (k % 2), 8 * (k // 2)) for k, p in enumerate(panels)],
    }


def prometheus_config(router: str = DEFAULT_ROUTER, scrape_interval_s: float = 5.0,
                      file_sd: str | None = None) -> dict[str, Any]:
    """A Prometheus config scraping the cluster: through the router's ``/metrics/targets``
    (``router`` is its host:port), or from a ``file_sd`` target file."""
    # honor_labels: the router labels its per-request series with the served model's name, and its
    # target carries the same ``model`` label; the series keep theirs (no ``exported_model``).
    job: dict[str, Any] = {"job_name": "tandem", "scrape_interval": f"{scrape_interval_s:g}s", "honor_labels": True}
    if file_sd is None:
        job["http_sd_configs"] = [{"url": f"http://{router}/metrics/targets", "refresh_interval": "10s"}]
    else:
        job["file_sd_configs"] = [{"files": [file_sd], "refresh_interval": "10s"}]
    return {"global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
            "scrape_configs": [job]}


def panel_exprs() -> list[tuple[str, str, str]]:
    """Every (dashboard file, panel title, expression) of the generated dashboards."""
    return [(f, p.title, expr) for f, (_, panels) in dashboards().items() for p in panels for expr, _ in p.targets]


def metrics_queried() -> set[str]:
    """The catalog metrics the dashboards read."""
    names = set()
    for _, _, expr in panel_exprs():
        for series in _METRIC_RE.findall(expr):
            for suffix in ("_bucket", "_sum", "_count"):
                if series.endswith(suffix) and series.removesuffix(suffix) in mc.CATALOG:
                    series = series.removesuffix(suffix)
            names.add(series)
    return names


def files() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    header = "# Generated by `python -m deploy.observability_gen` from runtime/metric_catalog.py: do not edit.\n"
    out = {
        "prometheus.yml": header + yaml.safe_dump(prometheus_config(), sort_keys=False),
        "prometheus-file-sd.yml": header + yaml.safe_dump(prometheus_config(file_sd=FILE_SD), sort_keys=False),
    }
    for name, (title, panels) in dashboards().items():
        out[f"grafana/{name}"] = json.dumps(dashboard_json(name, title, panels), indent=2) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.observability_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where to write (default: deploy/observability)")
    parser.add_argument("--check", action="store_true", help="compare with the files there instead; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, content in files().items():
        path = args.out / rel
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m deploy.observability_gen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
