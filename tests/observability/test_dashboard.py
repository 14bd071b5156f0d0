"""The router's /dashboard in a real browser (Debian's chromium, driven by playwright; nothing
downloaded) against the sim cluster: the page renders with no console error, every number it
shows with a /metrics series equals that series on the router's /metrics at the same moment
UNDER LOAD (non-zero KV usage and running requests), it follows new load by its own polling, and
a planner decision written to etcd appears in its timeline."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from obs_testlib import GPUS_PER_WORKER, Load, planner_decision, scrape, system_tool, wait_for, write_decision

READ = """async (refresh) => {
  if (refresh) await window.tandemDashboard.refresh();
  return Array.from(document.querySelectorAll("[data-metric]"),
                    e => ({metric: e.dataset.metric, value: e.dataset.value, text: e.textContent}));
}"""


@pytest.fixture(scope="module")
def page(cluster) -> Iterator:
    from playwright.sync_api import sync_playwright

    chromium = system_tool("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1900})
        pg.errors = []
        pg.on("console", lambda msg: pg.errors.append(msg.text) if msg.type == "error" else None)
        pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
        pg.on("requestfailed", lambda req: pg.errors.append(f"request failed: {req.url}"))
        pg.goto(f"{cluster.http_url}/dashboard")
        pg.wait_for_selector("body[data-num-samples]")
        yield pg
        browser.close()


def shown(page, refresh: bool = True) -> list[dict]:
    return page.evaluate(READ, refresh)


def expected_text(metric: str, value: float) -> str:
    name = metric.split("{")[0]
    if name == "tandem_router_gpus":  # may be fractional (GPUs shared, logical GPUs)
        return f"{round(value, 2):g}"
    return f"{value * 100:.1f}%" if name.endswith("_ratio") else str(round(value))


def mismatches(numbers: list[dict], metrics: dict[str, float]) -> list[str]:
    out = []
    for n in numbers:
        have = metrics.get(n["metric"])
        if n["value"] == "":
            if have is not None and not math.isnan(have):
                out.append(f"{n['metric']}: shown none, /metrics {have}")
            continue
        value = float(n["value"])
        if have is None or not math.isclose(value, have, rel_tol=1e-12, abs_tol=1e-12):
            out.append(f"{n['metric']}: shown {value}, /metrics {have}")
        elif n["text"] != expected_text(n["metric"], have):
            out.append(f"{n['metric']}: shown text {n['text']!r}, /metrics {have}")
    return out


def by_name(numbers: list[dict], name: str) -> list[float]:
    return [float(n["value"]) for n in numbers if n["metric"].split("{")[0] == name and n["value"] != ""]


def test_numbers_equal_the_metrics_under_load(cluster, page) -> None:
    url = cluster.http_url
    workers = [w.ready["worker_id"] for w in cluster.workers("prefill") + cluster.workers("decode")]
    with Load(url, cluster.router["model"], concurrency=6):
        matched, last = None, []
        deadline = time.monotonic() + 40
        while matched is None and time.monotonic() < deadline:
            numbers = shown(page)
            metrics = scrape(f"{url}/metrics")
            under_load = (max(by_name(numbers, "tandem_router_worker_kv_usage_ratio"), default=0) > 0
                          and sum(by_name(numbers, "tandem_router_worker_running_requests")) > 0
                          and by_name(numbers, "tandem_router_slo_attainment_ratio"))
            last = mismatches(numbers, metrics)
            if under_load and not last:
                matched = numbers
            else:
                time.sleep(0.05)
        assert matched is not None, f"never equal under load; last differences: {last[:6]}"
        names = {n["metric"] for n in matched}
        for w in workers:  # every worker's KV usage, queue and running requests are on the page
            for gauge in ("kv_usage_ratio", "waiting_requests", "running_requests"):
                assert any(f"tandem_router_worker_{gauge}{{" in m and f'worker="{w}"' in m for m in names), (w, gauge)
        for target in ("ttft", "itl", "both"):
            assert f'tandem_router_slo_attainment_ratio{{target="{target}"}}' in names
        assert {'tandem_router_workers{role="prefill"}', 'tandem_router_workers{role="decode"}'} <= names
        gpus = {n["metric"]: (float(n["value"]), n["text"]) for n in matched
                if n["metric"].startswith("tandem_router_gpus{")}
        assert gpus == {f'tandem_router_gpus{{role="{role}"}}': (GPUS_PER_WORKER * len(cluster.workers(role)),
                                                              f"{GPUS_PER_WORKER * len(cluster.workers(role)):g}")
                        for role in ("prefill", "decode")}, gpus
        shot = Path(os.environ.get("TANDEM_DASHBOARD_SCREENSHOT", "") or cluster._tmp / "dashboard.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert page.errors == []


def test_follows_new_load(cluster, page) -> None:
    """By its own polling (no refresh from here): idle, then new load shows, then idle again."""
    def running() -> float:
        return sum(by_name(shown(page, refresh=False), "tandem_router_worker_running_requests"))

    wait_for(lambda: running() == 0, 20, "the dashboard to show no running request")
    finished = by_name(shown(page, refresh=False), "tandem_router_window_finished_requests")[0]
    tokens_svg = page.inner_html("#chart-tokens_per_s")
    with Load(cluster.http_url, cluster.router["model"], concurrency=4, prompt_len=120, max_tokens=64):
        wait_for(lambda: running() > 0, 15, "the dashboard to show running requests")
        wait_for(lambda: by_name(shown(page, refresh=False), "tandem_router_window_finished_requests")[0] > finished,
                 15, "the dashboard's finished count to grow")
        wait_for(lambda: float(page.inner_text("#tokens-per-s") or 0) > 0, 15, "tokens per second above 0")
    assert page.inner_html("#chart-tokens_per_s") != tokens_svg
    wait_for(lambda: running() == 0, 20, "the dashboard to show the load gone")
    assert page.errors == []


def test_planner_decisions_appear(cluster, page, decided) -> None:
    row = f'#planner tr.decision[data-decided-at="{decided}"]'
    page.wait_for_selector(row, timeout=10_000)
    text = page.inner_text(row)
    assert "itl-over-slo[decode]" in text and "start decode" in text and "1 / 3" in text, text
    metrics = scrape(f"{cluster.http_url}/metrics")
    assert metrics['tandem_router_planner_desired_workers{role="decode"}'] == 3
    assert metrics['tandem_router_planner_decision_reason{code="itl-over-slo",role="decode"}'] == 1
    assert metrics["tandem_router_planner_predicted_request_rate"] == 7.5

    later = decided + 1000  # the next decision: on top of the timeline, the first one kept below
    write_decision(cluster, planner_decision(later, "load-low", num_decode=2))
    page.wait_for_selector(f'#planner tr.decision[data-decided-at="{later}"]', timeout=10_000)
    rows = page.eval_on_selector_all("#planner tr.decision", "rows => rows.map(r => r.dataset.decidedAt)")
    assert rows[:2] == [str(later), str(decided)], rows
    metrics = scrape(f"{cluster.http_url}/metrics")
    assert metrics['tandem_router_planner_desired_workers{role="decode"}'] == 2
    assert 'tandem_router_planner_decision_reason{code="itl-over-slo",role="decode"}' not in metrics
    assert page.errors == []
