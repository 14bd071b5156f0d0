"""Session-scoped clusters that stop after the session's last test that uses them, not at the
session's end: pytest keeps a session fixture until then, and an idle cluster's processes would
share the cores with every later directory's tests (the suite runs on two).

A directory's conftest registers its cluster's stop with :func:`stop_after_last_use`; the suite's
conftest (``tests/conftest.py``) calls :func:`teardown` after each test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

_STOP_AFTER: dict[pytest.Item, list[Callable[[], None]]] = {}


def stop_after_last_use(request: pytest.FixtureRequest, here: Path, fixture: str,
                        stop: Callable[[], None]) -> Callable[[], None]:
    """``stop`` made to run once, after the last test under ``here`` that uses ``fixture`` (or
    at the session's end, whichever comes first: call the returned function from the fixture's
    teardown too)."""
    done: list[bool] = []

    def once() -> None:
        if not done:
            done.append(True)
            stop()

    users = [item for item in request.session.items if item.path.is_relative_to(here) and fixture in item.fixturenames]
    if users:
        _STOP_AFTER.setdefault(users[-1], []).append(once)
    return once


def teardown(item: pytest.Item) -> None:
    for stop in _STOP_AFTER.pop(item, []):
        stop()
