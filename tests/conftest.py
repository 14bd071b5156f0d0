"""Suite-wide: in CI (``CI`` set and not "0"/"false"), a skipped test fails the run unless the
machine lacks the hardware it needs: a GPU (the ``gpu`` marker, or a skip saying "needs a CUDA GPU")
or a CPU instruction set (a kernel tier's "this CPU has no ..."). A missing package (nixl, ray,
triton, tritonclient, the default model, openssl, the pinned grpcio-tools) is an incomplete CI
image, not a reason to pass: the report names the test and its skip reason. Expected failures
(``xfail``) are not skips and are left alone."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cluster_lifetime import teardown as stop_clusters_done_with

HARDWARE_SKIPS = ("needs a CUDA GPU", "this CPU has no ")  # how the suite's hardware skips begin


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def allowed_skip(item: pytest.Item, reason: str) -> bool:
    return item.get_closest_marker("gpu") is not None or reason.startswith(HARDWARE_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    reason = skip_reason(report)
    if not allowed_skip(item, reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI ({reason}): CI runs every test but those that need hardware "
                           f"this machine lacks (tests/conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module skipped whole (``pytest.importorskip`` at import) fails too."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and in_ci():
        reason = skip_reason(report)  # type: ignore[arg-type]
        if not reason.startswith(HARDWARE_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"{collector.nodeid} skipped in CI ({reason}) (tests/conftest.py)"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the test's own fixtures: the session clusters it was the last test of stop
    (tests/cluster_lifetime.py)."""
    stop_clusters_done_with(item)
