"""A ``torch.distributed.Store`` over etcd: where the NCCL transport's worker pairs meet to build
their process groups (``kv_transfer.nccl``), with no TCPStore server for anyone to run.

Keys live under ``runtime.keys.nccl_store_prefix(namespace)``, bound to this process's own lease
(a dead worker's rendezvous keys vanish with it). The Store's methods are called from torch's
threads; they run on a private event loop thread with its own ``ControlPlane`` (the process's main
one belongs to its own loop and is not thread-safe).
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch.distributed as dist

from runtime import keys, settings
from runtime.etcd import ControlPlane

T = TypeVar("T")
_POLL_S = 0.005


class EtcdStore(dist.Store):
    """set/get/add/wait/check/compare_set/delete_key/num_keys on etcd keys under a prefix."""

    def __init__(self, cfg: settings.ClusterConfig, timeout_s: float = 300.0) -> None:
        super().__init__()
        self._prefix = keys.nccl_store_prefix(cfg.namespace)
        self._timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="etcd-store", daemon=True)
        self._thread.start()
        self._plane = ControlPlane.from_config(cfg)
        self._run(self._plane.connect())

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._plane.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout_s + 30)

    def _key(self, key: str) -> str:
        return self._prefix + key

    # ---- the Store interface ---------------------------------------------------------------------
    def set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._run(self._put(self._key(key), data))

    async def _put(self, key: str, data: bytes) -> None:
        await self._plane.client.put(key.encode(), data, lease=self._plane.lease_id)

    def get(self, key: str) -> bytes:
        self.wait([key])
        value = self._run(self._plane.get(self._key(key)))
        if value is None:
            raise RuntimeError(f"etcd store: key {key!r} vanished")
        return value

    def add(self, key: str, amount: int) -> int:
        return self._run(self._add(self._key(key), amount))

    async def _add(self, key: str, amount: int) -> int:
        client = self._plane.client
        while True:
            current = await client.get(key.encode())
            if current is None:
                new = amount
                compare = [client.transactions.version(key.encode()) == 0]
            else:
                new = int(bytes(current.value)) + amount
                compare = [client.transactions.value(key.encode()) == bytes(current.value)]
            ok, _ = await client.transaction(compare=compare, success=[
                client.transactions.put(key.encode(), str(new).encode(), lease=self._plane.lease_id)], failure=[])
            if ok:
                return new

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        want = expected.encode() if isinstance(expected, str) else bytes(expected)
        new = desired.encode() if isinstance(desired, str) else bytes(desired)
        return self._run(self._compare_set(self._key(key), want, new))

    async def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        client = self._plane.client
        current = await client.get(key.encode())
        if current is None and not expected:
            compare = [client.transactions.version(key.encode()) == 0]
        elif current is not None and bytes(current.value) == expected:
            compare = [client.transactions.value(key.encode()) == expected]
        else:
            return b"" if current is None else bytes(current.value)
        ok, _ = await client.transaction(compare=compare, success=[
            client.transactions.put(key.encode(), desired, lease=self._plane.lease_id)], failure=[])
        if ok:
            return desired
        return await self._compare_set(key, expected, desired)

    def check(self, keys_: list[str]) -> bool:
        return all(self._run(self._plane.get(self._key(k))) is not None for k in keys_)

    def wait(self, keys_: list[str], timeout: datetime.timedelta | None = None) -> None:
        limit = timeout.total_seconds() if timeout is not None else self._timeout_s
        deadline = time.monotonic() + limit
        while not self.check(keys_):
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"etcd store: keys {keys_} not set within {limit:.0f} s")
            time.sleep(_POLL_S)

    def delete_key(self, key: str) -> bool:
        return self._run(self._delete(self._key(key)))

    async def _delete(self, key: str) -> bool:
        return await self._plane.client.delete(key.encode()) is not None

    def num_keys(self) -> int:
        return len(self._run(self._plane.get_prefix(self._prefix)))

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout_s = timeout.total_seconds()
