"""The KV transport interface: paged KV blocks move between a prefill worker and a decode worker.

Two directions, one interface:

- pull: the destination READs the owner's blocks (``pull``). The owner keeps them held until the
  destination says it is done.
- push: the destination ``expect``s a transfer into blocks it allocated and hands the returned id,
  its ``metadata()`` and the block ids to the owner; the owner ``push``es (WRITEs) its blocks into
  them and may free its own once ``push`` returns; the destination's ``wait`` returns when they
  landed (a NIXL notification, a message from the owner).

Ownership: destination blocks belong to the destination throughout; on ``TransferError`` they hold
undefined data and the caller recomputes the prefill instead. A timeout fails that one transfer,
never the peer: other transfers with it go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import socket
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

import torch

from kv_transfer import metrics
from kv_transfer.errors import (
    LayoutMismatchError,
    TransferError,
    TransferResult,
    TransferTimeoutError,
    TransportClosedError,
)
from kv_transfer.inbox import Inbox, blocks_digest
from kv_transfer.layout import BlockRun, KVLayout, check_block_ids, merge_runs

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "KVTransport",
    "LayoutMismatchError",
    "PeerMetadata",
    "TransferError",
    "TransferResult",
    "TransferTimeoutError",
    "TransportClosedError",
]

DEFAULT_TIMEOUT_S = 10.0
RELEASE_MARGIN_S = 1.0  # past the last awaited push's deadline before ``release`` lets the memory go
MAX_CONCURRENT_TRANSFERS = 64  # threads of a transport's pull_async/push_async pool
Mode = Literal["push", "pull"]
T = TypeVar("T")

_MAGIC = b"TKVM"
_VERSION = 2
_HEADER = struct.Struct("!4sBI")  # magic, version, json length; then json, then the opaque blob


@functools.cache
def host_id() -> str:
    """This machine's identity: processes with equal ids can share GPU memory (CUDA IPC)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def device_id(kv: torch.Tensor) -> str:
    """``cpu`` or ``cuda:<GPU uuid>``: equal ids mean the same memory device."""
    if kv.device.type != "cuda":
        return kv.device.type
    return f"cuda:{torch.cuda.get_device_properties(kv.device).uuid}"


@dataclass(frozen=True)
class PeerMetadata:
    """What a peer needs to reach our blocks: identity, KV layout, where we are, backend blob.

    Carried as opaque bytes (``KVTransport.metadata()``) through etcd, a KV handle or a request.
    """

    transport: str
    name: str  # unique per registered transport instance
    layout: KVLayout
    address: dict[str, Any] = field(default_factory=dict)  # e.g. tcp: host, port; nixl: base_addr
    blob: bytes = b""  # backend-specific bytes (NIXL agent metadata, a CUDA IPC handle)
    host: str = ""  # host_id() of the peer's machine
    device: str = ""  # device_id() of the peer's KV tensor
    epoch: int = 0  # the peer's registration: 1 at ``register``, one more at each re-registration

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "transport": self.transport,
                "name": self.name,
                "layout": self.layout.to_dict(),
                "address": self.address,
                "host": self.host,
                "device": self.device,
                "epoch": self.epoch,
            },
            separators=(",", ":"),
        ).encode()
        return _HEADER.pack(_MAGIC, _VERSION, len(header)) + header + self.blob

    @classmethod
    def decode(cls, data: bytes) -> PeerMetadata:
        """Parse ``encode``'s bytes; ``ValueError`` when they are not KV transport metadata."""
        if len(data) < _HEADER.size:
            raise ValueError("KV transport metadata too short")
        magic, version, n = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"not KV transport metadata (magic {magic!r}, version {version})")
        try:
            header = json.loads(data[_HEADER.size : _HEADER.size + n])
            return cls(
                transport=header["transport"],
                name=header["name"],
                layout=KVLayout.from_dict(header["layout"]),
                address=header["address"],
                blob=bytes(data[_HEADER.size + n :]),
                host=header.get("host", ""),
                device=header.get("device", ""),
                epoch=int(header.get("epoch", 0)),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed KV transport metadata: {e}") from e


class KVTransport(ABC):
    """Moves paged KV blocks between worker processes.

    Life: ``register(kv)`` once, publish ``metadata()``; pull from peers, push to them, receive their
    pushes; ``close()``. Every transfer may run concurrently with others (threads or tasks), with one
    peer or many, as long as destination blocks are disjoint. Errors: ``TransferError`` (and
    subclasses) for anything the caller answers by recomputing; ``ValueError`` for bad arguments.
    """

    transport_name: ClassVar[str]
    # Why this transport cannot register the cache again after it moved (``release``, then
    # ``register`` at the new address: a parked worker), or "" when it can (``_reregister``).
    reregister_refusal: ClassVar[str] = "it does not implement re-registration"

    def __init__(self, *, model: str = "") -> None:
        self._model = model
        self._name = f"{self.transport_name}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._kv: torch.Tensor | None = None
        self._layout: KVLayout | None = None
        self._closed = False
        self._closing = threading.Event()  # set first by close(): new transfers are refused
        self._lock = threading.Lock()
        self._ops = 0  # transfers in flight (pull, push), drained by close()
        self._ops_changed = threading.Condition()
        self._inbox = Inbox()  # pushes we expect (shared with the children of an ``auto`` transport)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._epoch = 0  # registrations so far (PeerMetadata.epoch)
        self._released = False  # ``release``d: no cache registered until ``register`` again
        self._metadata: bytes | None = None  # ``metadata()`` of this registration

    @property
    def name(self) -> str:
        """This instance's unique name (also the NIXL agent name)."""
        return self._name

    @property
    def layout(self) -> KVLayout:
        if self._layout is None:
            raise RuntimeError(f"{self.transport_name} transport: register(kv) first")
        if self._closed:
            raise RuntimeError(f"{self.transport_name} transport is closed")
        return self._layout

    @property
    def kv(self) -> torch.Tensor:
        """The registered KV tensor."""
        if self._kv is None or self._closed:
            raise RuntimeError(f"{self.transport_name} transport: not registered, or closed")
        return self._kv

    def register(self, kv: torch.Tensor) -> None:
        """Prepare ``kv`` (the engine's whole KV tensor) once: memory registration, block descriptors.
        After ``release``, register it again at its new address (same layout): a new ``metadata()``
        (one ``epoch`` more), which the peers must get before their next transfer with us.

        Raises ``ValueError`` when ``kv`` breaks the layout contract (or changed it), ``RuntimeError``
        if called twice without a ``release`` between.
        """
        layout = KVLayout.from_tensor(kv, self._model)
        if self._layout is not None:
            if not self._released:
                raise RuntimeError(f"{self.transport_name} transport: register() called twice")
            if layout != self._layout:
                raise ValueError(f"{self.transport_name} transport: the cache came back with another layout "
                                 f"({layout}, registered: {self._layout})")
            self._reregister(kv, layout)
        else:
            self._register(kv, layout)
        self._kv, self._layout = kv, layout
        self._inbox.bytes_per_block = layout.bytes_per_block
        with self._lock:
            self._epoch += 1
            self._metadata = None
            self._released = False
        self._inbox.reopen()

    @property
    def can_reregister(self) -> bool:
        """Whether the cache may move (``release``, then ``register`` at its new address)."""
        return not self.reregister_refusal

    @property
    def released(self) -> bool:
        return self._released

    def release(self, grace_s: float = 5.0) -> None:
        """Stop serving the registered cache before its memory goes away (a parked worker): awaited
        pushes fail, new transfers are refused (``TransferError``), transfers in flight are waited for
        (up to ``grace_s``), and so is the deadline of every push we ever awaited (a one-sided write
        started before it may still land), then the backend deregisters the memory and, where it
        can, has the peers that mapped it let go. ``register`` the cache again once it is back.
        ``RuntimeError`` where ``reregister_refusal`` says why this transport cannot."""
        if self.reregister_refusal:
            raise RuntimeError(f"the {self.transport_name} transport cannot release its cache: "
                               f"{self.reregister_refusal}")
        with self._lock:
            if self._released or self._layout is None:
                return
            self._released = True
            self._metadata = None
        self._inbox.close(TransferError(f"{self.transport_name} transport released its KV cache (parked)"))
        deadline = time.monotonic() + grace_s
        with self._ops_changed:
            while self._ops and time.monotonic() < deadline:
                self._ops_changed.wait(deadline - time.monotonic())
        late = self._inbox.last_deadline + RELEASE_MARGIN_S - time.perf_counter()
        if late > 0:
            time.sleep(min(late, max(0.0, deadline - time.monotonic())))
        self._release()

    def metadata(self) -> bytes:
        """What a peer passes to ``pull``/``push``/``connect`` to reach our blocks (after ``register``;
        new after each re-registration)."""
        layout = self.layout
        if self._released:
            raise RuntimeError(f"{self.transport_name} transport released its cache: register(kv) again")
        cached = self._metadata
        if cached is not None:
            return cached
        address, blob = self._describe()
        cached = PeerMetadata(
            self.transport_name, self._name, layout, address, blob, host=host_id(), device=device_id(self.kv),
            epoch=self._epoch,
        ).encode()
        with self._lock:
            if not self._released:
                self._metadata = cached
        return cached

    def connect(self, peer_metadata: bytes) -> PeerMetadata:
        """Validate the peer (layout, transport) and set up what transfers with it need; a transfer does
        this implicitly, calling it early only moves the cost. Raises ``LayoutMismatchError``/``TransferError``.
        """
        peer = self._check_peer(peer_metadata)
        try:
            self._connect(peer)
        except TransferError as e:
            metrics.record_failure(self.transport_name, e.reason)
            raise
        return peer

    def disconnect(self, peer_metadata: bytes) -> None:
        """Forget what ``connect`` set up for this peer (e.g. it left the cluster). Never raises."""
        with contextlib.suppress(ValueError):
            self._disconnect(PeerMetadata.decode(peer_metadata).name)

    def preferred_mode(self, peer_metadata: bytes) -> Mode:
        """Whether blocks from this peer move faster pushed by it or pulled by us (measured table)."""
        from kv_transfer import selection

        peer = PeerMetadata.decode(peer_metadata)
        loc = selection.locality(host_id(), device_id(self.kv), peer.host, peer.device)
        return selection.choose(selection.default_table(), loc, [self.transport_name]).mode

    # Pull: the destination reads.

    def pull(
        self,
        peer_metadata: bytes,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        """READ the peer's ``remote_block_ids[i]`` into our ``local_block_ids[i]``, blocking.

        Contiguous runs (on both sides at once) move as one descriptor. Raises ``TransferError`` for a
        dead or unreachable peer (``TransferTimeoutError`` past ``timeout_s``, ``LayoutMismatchError``
        for an incompatible one) and never waits much longer than ``timeout_s``.
        """
        return self._transfer(peer_metadata, remote_block_ids, local_block_ids, timeout_s, None)

    async def pull_async(
        self,
        peer_metadata: bytes,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        """``pull`` on the transport's own thread pool, so an asyncio server's event loop keeps serving.

        Cancelling the awaiting task does not stop the transfer early: it ends within ``timeout_s``.
        """
        return await self._in_pool(self.pull, peer_metadata, remote_block_ids, local_block_ids, timeout_s)

    # Push: the owner writes into blocks the destination expects.

    def expect(self, local_block_ids: Sequence[int], timeout_s: float = DEFAULT_TIMEOUT_S,
               ahead: bool = False) -> str:
        """Destination: await a push into our ``local_block_ids``; returns the transfer id to pass on.

        Give the owner what is left of ``timeout_s`` as its push timeout. Then ``wait``/``wait_async``
        (or ``cancel``). ``ValueError`` for ids out of range, repeated, or awaited by another transfer.
        ``ahead``: the push starts only once the caller learns something (the owner's prefill ended,
        which its answer says): call ``hurry`` then. Until then a transport that polls for landings
        (nixl) spends no CPU on it; a landing it sees meanwhile (polling for another) still counts.
        """
        if self._closing.is_set():
            raise TransportClosedError(f"{self.transport_name} transport is closed")
        return self._inbox.expect(local_block_ids, timeout_s, self.layout.num_blocks, ahead)

    def hurry(self, transfer_id: str) -> None:
        """Destination: the push of ``transfer_id``, expected ``ahead``, has started or ended: look for it."""
        self._inbox.hurry(transfer_id)

    def wait(self, transfer_id: str) -> TransferResult:
        """Destination: block until the push of ``transfer_id`` landed; ``TransferError`` when it failed,
        timed out (``TransferTimeoutError`` at the deadline ``expect`` set) or the transport closed."""
        return self._inbox.wait(transfer_id)

    async def wait_async(self, transfer_id: str) -> TransferResult:
        """``wait`` for an asyncio caller; holds no thread while waiting."""
        return await self._inbox.wait_async(transfer_id)

    def cancel(self, transfer_id: str) -> None:
        """Destination: stop awaiting ``transfer_id`` (its request went away); a late push is refused."""
        self._inbox.cancel(transfer_id)

    def push(
        self,
        dest_metadata: bytes,
        transfer_id: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        """Owner: WRITE our ``local_block_ids[i]`` into the destination's ``remote_block_ids[i]`` of
        the transfer it ``expect``ed, and notify it. When this returns, our blocks may be freed.
        Errors as ``pull``'s; the destination's ``wait`` then fails too (or times out).
        """
        return self._transfer(dest_metadata, local_block_ids, remote_block_ids, timeout_s, transfer_id)

    async def push_async(
        self,
        dest_metadata: bytes,
        transfer_id: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        """``push`` on the transport's own thread pool."""
        return await self._in_pool(self.push, dest_metadata, transfer_id, local_block_ids, remote_block_ids, timeout_s)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop: refuse new transfers, fail awaited pushes, stop in-flight transfers (each ends with
        ``TransportClosedError`` or its result; waited for up to ``grace_s``), release every resource.
        Idempotent."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
        self._inbox.close(TransportClosedError(f"{self.transport_name} transport closed"))
        self._interrupt()
        deadline = time.monotonic() + grace_s
        with self._ops_changed:
            while self._ops and time.monotonic() < deadline:
                self._ops_changed.wait(deadline - time.monotonic())
        self._close()
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _transfer(
        self,
        peer_metadata: bytes,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        timeout_s: float,
        transfer_id: str | None,
    ) -> TransferResult:
        """One pull (``transfer_id`` None: src remote, dst local) or push (src local, dst remote)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self._closing.is_set():
            raise TransportClosedError(f"{self.transport_name} transport is closed")
        layout = self.layout
        start = time.perf_counter()
        with self._operation():
            try:
                peer = self._check_peer(peer_metadata)
                if transfer_id is None:
                    check_block_ids(src_block_ids, dst_block_ids, peer.layout.num_blocks, layout.num_blocks)
                    runs = merge_runs(src_block_ids, dst_block_ids)
                else:
                    check_block_ids(
                        src_block_ids, dst_block_ids, layout.num_blocks, peer.layout.num_blocks, ("local", "remote")
                    )
                    # BlockRun: remote_start is the destination's block, local_start ours.
                    runs = merge_runs(dst_block_ids, src_block_ids)
                if not runs and transfer_id is None:
                    return TransferResult(0, 0, 0.0, 0)
                if transfer_id is None:
                    num_descriptors = self._pull(peer, runs, start + timeout_s)
                else:
                    digest = blocks_digest(dst_block_ids)
                    num_descriptors = self._push(peer, transfer_id, digest, runs, start + timeout_s)
            except TransferError as e:
                if self._closing.is_set() and not isinstance(e, TransportClosedError):
                    e = TransportClosedError(f"{self.transport_name} transport closed during a transfer: {e}")
                metrics.record_failure(self.transport_name, e.reason)
                raise e from None
        duration_s = time.perf_counter() - start
        num_bytes = len(dst_block_ids) * layout.bytes_per_block
        metrics.record_success(self.transport_name, len(dst_block_ids), num_bytes, duration_s)
        return TransferResult(len(dst_block_ids), num_bytes, duration_s, num_descriptors)

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """Count a transfer in flight; refuse it once ``close`` began."""
        with self._ops_changed:
            if self._closing.is_set():
                raise TransportClosedError(f"{self.transport_name} transport is closed")
            if self._released:
                raise TransferError(f"{self.transport_name} transport released its KV cache (parked)")
            self._ops += 1
        try:
            yield
        finally:
            with self._ops_changed:
                self._ops -= 1
                self._ops_changed.notify_all()

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    MAX_CONCURRENT_TRANSFERS, thread_name_prefix=f"{self.transport_name}-xfer"
                )
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))

    def _check_peer(self, peer_metadata: bytes) -> PeerMetadata:
        peer = PeerMetadata.decode(peer_metadata)
        if peer.transport != self.transport_name:
            raise LayoutMismatchError(
                f"peer {peer.name!r} speaks transport {peer.transport!r}, this worker {self.transport_name!r}"
            )
        diff = self.layout.mismatches(peer.layout)
        if diff:
            raise LayoutMismatchError(f"KV layout mismatch with peer {peer.name!r}: {'; '.join(diff)}")
        return peer

    # Implementations fill these in.

    @abstractmethod
    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        """Register ``kv`` with the backend and start serving it; ``self.kv`` is not set yet."""

    @abstractmethod
    def _describe(self) -> tuple[dict[str, Any], bytes]:
        """(address, blob) of ``PeerMetadata`` for this instance."""

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        """Register ``kv`` again at its new address after ``_release`` (only where ``reregister_refusal``
        is empty)."""
        raise NotImplementedError

    def _release(self) -> None:  # noqa: B027  (optional hook)
        """Deregister the cache's memory; have peers that mapped it drop their mappings where possible."""

    def _connect(self, peer: PeerMetadata) -> None:  # noqa: B027  (optional hook)
        """Prepare per-peer state ahead of a transfer (NIXL: add the remote agent, prep its descriptors)."""

    def _disconnect(self, peer_name: str) -> None:  # noqa: B027  (optional hook)
        """Drop per-peer state (transfers with the peer still in flight finish first)."""

    @abstractmethod
    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        """Move ``runs`` (peer -> us) before ``time.perf_counter()`` reaches ``deadline``; return descriptors."""

    @abstractmethod
    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        """Move ``runs`` (us -> peer) before ``deadline``, then have the peer's inbox ``complete``
        ``transfer_id`` with ``digest`` (refused when the peer does not expect it); return descriptors."""

    def _interrupt(self) -> None:  # noqa: B027  (optional hook)
        """``close`` began: make in-flight transfers stop early (they see ``self._closing`` set)."""

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources (called once, after in-flight transfers ended or ``grace_s``)."""
