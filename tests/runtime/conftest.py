"""Fixtures for the runtime tests: one real etcd for the session, a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from runtime.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]
