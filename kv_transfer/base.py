"""The KV transport interface: the decode side pulls a request's paged blocks from the prefill side.

Ownership: the peer (block owner, prefill) keeps the blocks pinned until the puller (decode) has them;
``pull`` only READs them and writes the puller's own, already allocated, blocks. On ``TransferError``
the puller's destination blocks hold undefined data and the caller recomputes the prefill instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

import torch

from kv_transfer import metrics
from kv_transfer.layout import BlockRun, KVLayout, check_block_ids, merge_runs

DEFAULT_TIMEOUT_S = 10.0


class TransferError(RuntimeError):
    """A pull failed: the peer is dead or unreachable, or broke the protocol. The caller recomputes."""

    reason: ClassVar[str] = "peer"


class TransferTimeoutError(TransferError):
    """A pull did not finish within its ``timeout_s``."""

    reason: ClassVar[str] = "timeout"


class LayoutMismatchError(TransferError):
    """The peer's KV layout (shape, dtype, block size, model) or transport differs from ours."""

    reason: ClassVar[str] = "layout"


@dataclass(frozen=True)
class TransferResult:
    """What one successful pull moved and how long it took (wall time, request to completion)."""

    num_blocks: int
    num_bytes: int
    duration_s: float
    num_descriptors: int  # contiguous runs actually issued (NIXL: as counted by the backend when known)

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / self.duration_s / 2**30 if self.duration_s > 0 else 0.0


_MAGIC = b"TKVM"
_VERSION = 1
_HEADER = struct.Struct("!4sBI")  # magic, version, json length; then json, then the opaque blob


@dataclass(frozen=True)
class PeerMetadata:
    """What a peer needs to pull from us: identity, KV layout, transport address, backend blob.

    Carried as opaque bytes (``KVTransport.metadata()``) through etcd or a handshake.
    """

    transport: str
    name: str  # unique per registered transport instance
    layout: KVLayout
    address: dict[str, Any] = field(default_factory=dict)  # e.g. tcp: host, port; nixl: base_addr
    blob: bytes = b""  # backend-specific bytes (NIXL agent metadata)

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "transport": self.transport,
                "name": self.name,
                "layout": self.layout.to_dict(),
                "address": self.address,
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
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed KV transport metadata: {e}") from e


class KVTransport(ABC):
    """Moves paged KV blocks between worker processes.

    Life: ``register(kv)`` once, publish ``metadata()``; peers ``pull`` from us and we pull from them;
    ``close()``. ``pull``/``pull_async`` may run concurrently from several threads or tasks as long as
    their local block ids are disjoint. Errors: ``TransferError`` (and subclasses) for anything the
    caller should answer by recomputing; ``ValueError`` for bad arguments (a bug in the caller).
    """

    transport_name: ClassVar[str]

    def __init__(self, *, model: str = "") -> None:
        self._model = model
        self._name = f"{self.transport_name}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._kv: torch.Tensor | None = None
        self._layout: KVLayout | None = None
        self._closed = False
        self._lock = threading.Lock()

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

        Raises ``ValueError`` when ``kv`` breaks the layout contract, ``RuntimeError`` if called twice.
        """
        if self._layout is not None:
            raise RuntimeError(f"{self.transport_name} transport: register() called twice")
        layout = KVLayout.from_tensor(kv, self._model)
        self._register(kv, layout)
        self._kv, self._layout = kv, layout

    def metadata(self) -> bytes:
        """What a peer passes to ``pull``/``connect`` to reach our blocks (valid after ``register``)."""
        layout = self.layout
        address, blob = self._describe()
        return PeerMetadata(self.transport_name, self._name, layout, address, blob).encode()

    def connect(self, peer_metadata: bytes) -> PeerMetadata:
        """Validate the peer (layout, transport) and set up what a pull to it needs; ``pull`` does this
        implicitly, calling it early only moves the cost. Raises ``LayoutMismatchError``/``TransferError``.
        """
        peer = self._check_peer(peer_metadata)
        try:
            self._connect(peer)
        except TransferError as e:
            metrics.record_failure(self.transport_name, e.reason)
            raise
        return peer

    def disconnect(self, peer_metadata: bytes) -> None:
        """Forget what ``connect`` set up for this peer (e.g. when its lease ends). Never raises."""
        with contextlib.suppress(ValueError):
            self._disconnect(PeerMetadata.decode(peer_metadata).name)

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
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        layout = self.layout
        start = time.perf_counter()
        try:
            peer = self._check_peer(peer_metadata)
            check_block_ids(remote_block_ids, local_block_ids, peer.layout.num_blocks, layout.num_blocks)
            if not local_block_ids:
                return TransferResult(0, 0, 0.0, 0)
            runs = merge_runs(remote_block_ids, local_block_ids)
            num_descriptors = self._pull(peer, runs, start + timeout_s)
        except TransferError as e:
            metrics.record_failure(self.transport_name, e.reason)
            raise
        duration_s = time.perf_counter() - start
        num_bytes = len(local_block_ids) * layout.bytes_per_block
        metrics.record_success(self.transport_name, len(local_block_ids), num_bytes, duration_s)
        return TransferResult(len(local_block_ids), num_bytes, duration_s, num_descriptors)

    async def pull_async(
        self,
        peer_metadata: bytes,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        """``pull`` on a worker thread, so an asyncio server's event loop keeps serving.

        Cancelling the awaiting task does not stop the transfer early: it ends within ``timeout_s``.
        """
        return await asyncio.to_thread(self.pull, peer_metadata, remote_block_ids, local_block_ids, timeout_s)

    def close(self) -> None:
        """Stop serving our blocks and release every resource; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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

    def _connect(self, peer: PeerMetadata) -> None:  # noqa: B027  (optional hook)
        """Prepare per-peer state ahead of a pull (NIXL: add the remote agent, prep its descriptors)."""

    def _disconnect(self, peer_name: str) -> None:  # noqa: B027  (optional hook)
        """Drop per-peer state."""

    @abstractmethod
    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        """Move ``runs`` before ``time.perf_counter()`` reaches ``deadline``; return descriptors issued."""

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources (called once)."""
