"""The control-plane client: one etcd lease per process, and typed values under it.

Built on `aetcd` (asyncio, grpcio). Only one gRPC etcd client library may live in a process
(they register the same protobuf descriptors), so nothing else here imports `etcd3`.

The keys are `runtime.keys`'s; the values are protobuf messages (`proto/tandem_control.proto`),
written with `put_message` and read with `get_message`/`get_messages`. Worker registration and
discovery are `runtime.discovery`'s, on top of this client.

What the lease protects: every key this process writes with a lease (registrations, metrics)
dies with the process, within `lease_ttl_s` of its last keep-alive. If the lease is lost while
the process lives (etcd restarted, a long partition, someone revoked it), the keep-alive task
grants a new lease, re-puts every lease-bound key it owns, bumps `num_lease_losses` and calls
`on_lease_lost`. Writes of lease-bound keys that find the lease gone heal it the same way.

Everything runs on the event loop that called `connect()`; the client is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aetcd
import aetcd.rpc
import aetcd.watcher
import grpc
from google.protobuf.message import DecodeError, Message

from runtime.keys import id_under
from runtime.settings import check_name, split_endpoint

if TYPE_CHECKING:
    from runtime.settings import ClusterConfig

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_KEEPALIVE_FAILURES_BEFORE_RECONNECT = 3


@dataclasses.dataclass(frozen=True)
class LeaseLost:
    """Passed to `on_lease_lost` once a new lease is granted and owned keys are re-put."""

    old_lease_id: int
    new_lease_id: int


LeaseLostCallback = Callable[[LeaseLost], Awaitable[None] | None]


async def stop_task(task: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
    """Cancel `task` and wait (bounded) for it to end."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.error("task %s did not stop within %.1fs", task.get_name(), timeout_s)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("task %s had failed: %r", task.get_name(), task.exception())


# -- how a process reaches etcd -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EtcdAccess:
    """How this process reaches etcd: TLS (the CA that signed etcd's certificate; this process's
    client certificate and key, for an etcd that asks clients for one) and a user, or all None:
    plaintext, no user. PEM bytes, read once.

    `from_config` is the one place the `etcd_*` settings are read; every etcd client of a process
    is a `ControlPlane` built with one (`ControlPlane.from_config`).
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = dataclasses.field(default=None, repr=False)
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd user and password go together")
        if (self.cert is None) != (self.key is None):
            raise ValueError("etcd cert_file and key_file go together")

    @classmethod
    def from_files(
        cls,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
    ) -> EtcdAccess:
        """Read the files; a password file holds the password on its first line."""
        if password is not None and password_file is not None:
            raise ValueError("give the etcd password or a password file, not both")
        if password_file is not None:
            password = Path(password_file).read_text().split("\n", 1)[0].rstrip("\r")
            if not password:
                raise ValueError(f"etcd password file {password_file} is empty")

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca_file), read(cert_file), read(key_file), user, password)

    @classmethod
    def from_config(cls, config: ClusterConfig) -> EtcdAccess:
        """The config's `etcd_*` settings (checked when the config was built)."""
        return cls.from_files(
            ca_file=config.etcd_ca_file,
            cert_file=config.etcd_cert_file,
            key_file=config.etcd_key_file,
            user=config.etcd_user,
            password=config.etcd_password,
            password_file=config.etcd_password_file,
        )

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def credentials(self, *, https: bool = False) -> grpc.ChannelCredentials | None:
        """TLS credentials when this access has TLS files or an endpoint says https, else None.
        Without a CA the system's roots verify etcd's certificate."""
        if not (self.tls or https):
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def hint(self, exc: BaseException) -> str:
        """What to check when etcd refused this access with `exc` (for the error a process dies with)."""
        if _is_auth_error(exc):
            if self.user is None:
                return ("etcd has auth on and no etcd user is set: set etcd_user and its password "
                        "(TANDEM_ETCD_PASSWORD or etcd_password_file; --internal-tls-dir sets them)")
            return f"etcd refused the user {self.user!r}: check its password and that etcd has this user"
        if not self.tls:
            return ("this process connects in plaintext: an etcd that serves TLS needs etcd_ca_file, and "
                    "etcd_cert_file/etcd_key_file when it asks clients for a certificate (--internal-tls-dir "
                    "sets them for tandem serve's etcd)")
        return ("this process connects with TLS: is etcd up and serving TLS, is its certificate signed by "
                "etcd_ca_file for the host dialled, and does it take etcd_cert_file's CA?")


PLAINTEXT = EtcdAccess()


# -- aetcd with TLS and a fixed target ------------------------------------------------------


class _Client(aetcd.Client):
    """aetcd.Client whose `connect` opens a TLS channel when given credentials.

    aetcd 1.0 only ever opens insecure channels, so `connect` is reimplemented here against
    aetcd 1.0's internals (stubs and watcher); the package is pinned for that reason.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout_s: float,
    ) -> None:
        options = {
            "grpc.keepalive_time_ms": 10_000,  # etcd's default min ping interval is 5 s
            "grpc.keepalive_timeout_ms": 5_000,
            "grpc.keepalive_permit_without_calls": 1,
            # Reconnect promptly once etcd is back (gRPC's default backoff grows to 120 s).
            "grpc.initial_reconnect_backoff_ms": 250,
            "grpc.max_reconnect_backoff_ms": 2_000,
        }
        # aetcd annotates timeout as int; gRPC takes float seconds.
        super().__init__(
            username=username,
            password=password,
            timeout=timeout_s,
            options=options,  # type: ignore[arg-type]
        )
        self._target = target
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            async with asyncio.timeout(self._connect_wait_timeout):
                await self._connected.wait()
            return
        rpc = aetcd.rpc
        try:
            self._is_connecting = True
            opts = list(self._options.items())
            if self._credentials is not None:
                self.channel = rpc.secure_channel(self._target, self._credentials, options=opts)
            else:
                self.channel = rpc.insecure_channel(self._target, options=opts)
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except rpc.AioRpcError as exc:
                    await self.channel.close()
                    aetcd.exceptions._handle_exception(exc)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def probe(self, key: bytes) -> None:
        """One read of `key` (connect is lazy without auth): the connection, TLS, the user and
        its permission to read are all checked before the process relies on them."""
        await self.connect()
        try:
            await self.kvstub.Range(
                aetcd.rpc.RangeRequest(key=key, keys_only=True), timeout=self._timeout, metadata=self.metadata
            )
        except aetcd.rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)


async def enable_auth(endpoint: str, access: EtcdAccess, user: str, password: str, *, role: str,
                      prefix: str, timeout_s: float = 5.0) -> None:
    """Turn on auth in a fresh etcd at `endpoint` (reached with `access`, no user yet): a `root`
    user with a random password nobody keeps, the role `role` allowed to read and write every key
    under `prefix`, and `user`/`password` in that role (an embedded etcd's start)."""
    rpc = aetcd.rpc
    client = _Client(endpoint, credentials=access.credentials(), username=None, password=None,
                     timeout_s=timeout_s)
    try:
        await client.connect()
        stub = rpc.AuthStub(client.channel)
        prefix_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        steps: list[tuple[Callable[..., Any], Message]] = [
            (stub.UserAdd, rpc.AuthUserAddRequest(name="root", password=secrets.token_urlsafe(32))),
            (stub.RoleAdd, rpc.AuthRoleAddRequest(name="root")),
            (stub.UserGrantRole, rpc.AuthUserGrantRoleRequest(user="root", role="root")),
            (stub.RoleAdd, rpc.AuthRoleAddRequest(name=role)),
            (stub.RoleGrantPermission, rpc.AuthRoleGrantPermissionRequest(name=role, perm=rpc.Permission(
                permType=rpc.Permission.READWRITE, key=prefix.encode(), range_end=prefix_end.encode()))),
            (stub.UserAdd, rpc.AuthUserAddRequest(name=user, password=password)),
            (stub.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=user, role=role)),
            (stub.AuthEnable, rpc.AuthEnableRequest()),
        ]
        for call, request in steps:
            try:
                await call(request, timeout=timeout_s)
            except rpc.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


# -- the client -----------------------------------------------------------------------------


class ControlPlane:
    """A process's connection to etcd: its lease and the keys it writes under it.

        async with ControlPlane(["127.0.0.1:2379"], namespace="dev", lease_ttl_s=10) as cp:
            await cp.put_message(keys.worker_key("dev", "decode", "d0"), info)   # lease-bound
            loads = await cp.get_messages(keys.metrics_prefix("dev", "decode"), pb.Load)

    `close()` revokes the lease (keys vanish at once); `close(revoke=False)` behaves like a
    crash: keys vanish when the TTL runs out.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        namespace: str = "default",
        lease_ttl_s: int = 10,
        access: EtcdAccess | None = None,
        request_timeout_s: float = 5.0,
        on_lease_lost: LeaseLostCallback | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        parsed = [split_endpoint(e) for e in endpoints]
        self.endpoints = [target for target, _ in parsed]
        self.namespace = check_name("namespace", namespace)
        if not isinstance(lease_ttl_s, int) or lease_ttl_s < 2:
            raise ValueError(f"lease_ttl_s must be an int >= 2 (etcd's minimum), got {lease_ttl_s!r}")
        self.lease_ttl_s = lease_ttl_s
        self.request_timeout_s = request_timeout_s
        self.on_lease_lost = on_lease_lost
        self.access = access or PLAINTEXT
        self._credentials = self.access.credentials(https=any(https for _, https in parsed))
        self._client: _Client | None = None
        self._endpoint_index = 0
        self._lease_id = 0
        self._lease_lost = False  # the lease is known (or presumed) dead; grant a new one
        self._resync_needed = False  # a new lease was granted; owned keys not yet re-put
        self._lost_lease_id = 0
        self._owned: dict[str, bytes] = {}  # lease-bound keys we wrote -> last value
        self._lock = asyncio.Lock()  # serializes lease changes with lease-bound writes
        self._keepalive_task: asyncio.Task[None] | None = None
        self._publishers: list[Publisher] = []
        self._last_refresh = 0.0
        self._closed = False
        self.num_lease_losses = 0

    @classmethod
    def from_config(
        cls,
        config: ClusterConfig,
        endpoints: Sequence[str] | None = None,
        on_lease_lost: LeaseLostCallback | None = None,
    ) -> ControlPlane:
        """From the cluster config; `endpoints` overrides it (an embedded etcd's endpoint)."""
        endpoints = list(endpoints or config.etcd_endpoints)
        if not endpoints:
            raise ValueError("config asks for an embedded etcd: pass its endpoint as `endpoints`")
        return cls(
            endpoints,
            namespace=config.namespace,
            lease_ttl_s=config.lease_ttl_s,
            access=EtcdAccess.from_config(config),
            on_lease_lost=on_lease_lost,
        )

    # -- state ------------------------------------------------------------------------------

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def lease_ok(self) -> bool:
        """False while the lease is lost and our keys are not yet back under a new one."""
        return self._client is not None and not (self._lease_lost or self._resync_needed)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def client(self) -> aetcd.Client:
        """The underlying aetcd client (changes on reconnect; do not keep it)."""
        if self._client is None:
            raise RuntimeError("ControlPlane is not connected")
        return self._client

    # -- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> ControlPlane:
        """Connect to the first reachable endpoint, grant the lease, start the keep-alive."""
        if self._closed:
            raise RuntimeError("ControlPlane is closed")
        self._client = await self._connect_any()
        lease = await self._client.lease(self.lease_ttl_s)
        self._lease_id = lease.id
        self._last_refresh = time.monotonic()
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name="etcd-keepalive")
        log.info("etcd lease %x (ttl %ds) on %s", self._lease_id, self.lease_ttl_s, self.endpoints)
        return self

    async def close(self, *, revoke: bool = True) -> None:
        """Stop publishers and keep-alive; revoke the lease unless `revoke=False`; disconnect."""
        if self._closed:
            return
        self._closed = True
        for publisher in list(self._publishers):
            await publisher.stop()
        if self._keepalive_task is not None:
            await stop_task(self._keepalive_task)
        if self._client is not None:
            if revoke and self._lease_id:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.request_timeout_s):
                        await self._client.revoke_lease(self._lease_id)
            with contextlib.suppress(Exception):
                await self._client.close()
        self._owned.clear()

    async def __aenter__(self) -> ControlPlane:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect_any(self) -> _Client:
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._endpoint_index + i) % len(self.endpoints)
            client = _Client(
                self.endpoints[index],
                credentials=self._credentials,
                username=self.access.user,
                password=self.access.password,
                timeout_s=self.request_timeout_s,
            )
            try:
                async with asyncio.timeout(self.request_timeout_s + 1):
                    await client.probe(f"/tandem/{self.namespace}/".encode())
            except (aetcd.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{self.endpoints[index]}: {_describe(exc)} ({self.access.hint(exc)})")
                with contextlib.suppress(Exception):
                    await client.close()
                continue
            self._endpoint_index = index
            return client
        raise ConnectionError("cannot use etcd: " + "; ".join(errors))

    async def _reconnect(self) -> None:
        old = self._client
        self._endpoint_index += 1
        self._client = await self._connect_any()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        log.warning("etcd reconnected to %s", self.endpoints[self._endpoint_index])

    # -- lease ------------------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        interval = self.lease_ttl_s / 3
        failures = 0
        while not self._closed:
            try:
                await self._keepalive_tick()
                failures = 0
                delay = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("etcd keep-alive failed (%d in a row): %r", failures, exc)
                if time.monotonic() - self._last_refresh > self.lease_ttl_s:
                    self._lease_lost = True  # the server has surely expired it by now
                if failures >= _KEEPALIVE_FAILURES_BEFORE_RECONNECT or isinstance(
                    exc, aetcd.exceptions.UnauthenticatedError
                ):
                    with contextlib.suppress(Exception):
                        await self._reconnect()
                delay = min(interval, 1.0)
            await asyncio.sleep(delay)

    async def _keepalive_tick(self) -> None:
        if not (self._lease_lost or self._resync_needed):
            async with asyncio.timeout(self.request_timeout_s):
                reply = await self.client.refresh_lease(self._lease_id)
            if reply is not None and reply.TTL > 0:
                self._last_refresh = time.monotonic()
                return
            log.warning("etcd lease %x expired or revoked", self._lease_id)
            self._lease_lost = True
        async with self._lock:
            healed = await self._heal_lease_locked()
        await self._notify(healed)

    async def _heal_lease_locked(self) -> LeaseLost | None:
        """Grant a new lease if ours is lost, then re-put every owned key under it.

        Returns the loss to report once all keys are back (call `_notify` outside the lock,
        so that the callback may register). Raises if etcd fails; the next tick retries.
        """
        if self._lease_lost:
            lease = await self.client.lease(self.lease_ttl_s)
            if not self._resync_needed:
                self._lost_lease_id = self._lease_id
                self.num_lease_losses += 1
            self._lease_id = lease.id
            self._lease_lost = False
            self._resync_needed = True
            self._last_refresh = time.monotonic()
        if not self._resync_needed:
            return None
        try:
            for key, value in list(self._owned.items()):
                await self.client.put(key.encode(), value, lease=self._lease_id)
        except aetcd.ClientError as exc:
            if _is_lease_not_found(exc):  # the new lease died too while we retried: grant again
                self._lease_lost = True
            raise
        self._resync_needed = False
        log.warning(
            "etcd lease %x replaced by %x; %d keys re-put",
            self._lost_lease_id,
            self._lease_id,
            len(self._owned),
        )
        return LeaseLost(self._lost_lease_id, self._lease_id)

    async def _notify(self, lost: LeaseLost | None) -> None:
        if lost is None or self.on_lease_lost is None:
            return
        try:
            result = self.on_lease_lost(lost)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lease_lost callback failed")

    async def _put_owned(self, key: str, value: bytes) -> None:
        healed = None
        async with self._lock:
            self._owned[key] = value
            if self._lease_lost or self._resync_needed:
                healed = await self._heal_lease_locked()  # puts `key` too
            else:
                try:
                    await self.client.put(key.encode(), value, lease=self._lease_id)
                except aetcd.ClientError as exc:
                    if not _is_lease_not_found(exc):
                        raise
                    self._lease_lost = True
                    healed = await self._heal_lease_locked()
        await self._notify(healed)

    # -- typed values -----------------------------------------------------------------------

    async def put_message(self, key: str, message: Message, *, lease: bool = True) -> None:
        """Write a protobuf message; lease-bound (dies with this process) unless `lease=False`."""
        await self.put(key, message.SerializeToString(), lease=lease)

    async def get_message(self, key: str, cls: type[M]) -> M | None:
        """The message at `key`, or None when it is absent or not a `cls` (logged)."""
        value = await self.get(key)
        return None if value is None else _parse(cls, key, value)

    async def get_messages(self, prefix: str, cls: type[M]) -> dict[str, M]:
        """Every `cls` message under `prefix`, by the key's last segment; unparsable ones are skipped."""
        out: dict[str, M] = {}
        for key, value in (await self.get_prefix(prefix)).items():
            message = _parse(cls, key, value)
            if message is not None:
                out[id_under(prefix, key)] = message
        return out

    def start_publisher(self, key: str, sample: Callable[[], Message], interval_s: float = 1.0) -> Publisher:
        """Write `sample()` under `key` (lease-bound) every `interval_s` until `stop()`/close."""
        publisher = Publisher(self, key, sample, interval_s)
        self._publishers.append(publisher)
        publisher.start()
        return publisher

    # -- basics -----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes | str, *, lease: bool = False) -> None:
        """Put a key; with `lease=True` it is bound to (and re-put with) this process's lease."""
        data = value.encode() if isinstance(value, str) else value
        if lease:
            await self._put_owned(key, data)
        else:
            await self.client.put(key.encode(), data)

    async def get(self, key: str) -> bytes | None:
        result = await self.client.get(key.encode())
        return None if result is None else bytes(result.value)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        result = await self.client.get_prefix(prefix.encode())
        return {kv.key.decode(): bytes(kv.value) for kv in result.kvs}

    async def delete(self, key: str) -> bool:
        """Delete a key (and stop re-putting it if it was lease-bound). True if it existed."""
        async with self._lock:
            self._owned.pop(key, None)
            return await self.client.delete(key.encode()) is not None


def _describe(exc: BaseException) -> str:
    """An etcd client error in a few words (a timeout has no message of its own)."""
    if isinstance(exc, TimeoutError | aetcd.exceptions.ConnectionTimeoutError):
        return "no answer in time (down, or a TLS/plaintext mismatch)"
    return f"{type(exc).__name__}: {exc}"


def _is_auth_error(exc: BaseException) -> bool:
    """etcd refused the user (none, unknown, wrong password, no permission), not the connection."""
    return isinstance(exc, aetcd.exceptions.UnauthenticatedError) or any(
        words in str(exc) for words in ("authentication failed", "permission denied", "user name is empty"))


def _is_lease_not_found(exc: Exception) -> bool:
    return "requested lease not found" in str(exc)


def _parse(cls: type[M], key: str, value: bytes) -> M | None:
    try:
        return cls.FromString(value)
    except DecodeError as exc:
        log.warning("ignoring a value at %s that is not a %s: %s", key, cls.__name__, exc)
        return None


class Publisher:
    """Writes `sample()` under a lease-bound key about every `interval_s`; errors are logged."""

    def __init__(self, plane: ControlPlane, key: str, sample: Callable[[], Message], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.plane, self.key = plane, key
        self.sample, self.interval_s = sample, interval_s
        self.num_published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"publish-{self.key}")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        with contextlib.suppress(ValueError):
            self.plane._publishers.remove(self)

    async def _run(self) -> None:
        while not self.plane.closed:
            started = time.monotonic()
            try:
                await self.plane.put_message(self.key, self.sample())
                self.num_published += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("publishing %s failed: %r", self.key, exc)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
