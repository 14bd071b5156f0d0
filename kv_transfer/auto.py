"""``auto``: one transport per peer, chosen by measured bandwidth for where the peer is.

``release`` releases every child that can re-register its cache and drops the others (nccl);
``register`` after it registers the remaining children again.

At ``register`` it builds every transport that can run here for this tensor (CPU: tcp, nixl, and
nccl over gloo when given a store; CUDA: cuda_ipc, nixl, tcp, and nccl when given a store),
sharing one inbox, and publishes all their metadata at once. For each peer it computes the
locality (same GPU, same node, other node, CPU memory) from both sides' ``host_id``/``device_id``
and takes the fastest (transport, mode) that both sides have from the table (``selection``).
Transfers delegate to that child, which also records the metrics under its own name.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kv_transfer import selection
from kv_transfer.base import DEFAULT_TIMEOUT_S, KVTransport, Mode, PeerMetadata, device_id, host_id
from kv_transfer.errors import LayoutMismatchError, TransferError, TransferResult
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("!I")


def _pack(parts: Sequence[bytes]) -> bytes:
    return _COUNT.pack(len(parts)) + b"".join(_COUNT.pack(len(p)) + p for p in parts)


def _unpack(blob: bytes) -> list[bytes]:
    (n,) = _COUNT.unpack_from(blob)
    parts, at = [], _COUNT.size
    for _ in range(n):
        (size,) = _COUNT.unpack_from(blob, at)
        at += _COUNT.size
        parts.append(blob[at : at + size])
        at += size
    if at != len(blob):
        raise ValueError("malformed auto transport metadata")
    return parts


class AutoTransport(KVTransport):
    """Picks, per peer, the fastest measured transport both sides have.

    ``table``: a table dict or path (default: ``selection.default_table()``); ``transports``: the
    children to try building (default: all that fit the tensor's device); ``store``: enables nccl;
    ``make_child(name, **opts)`` builds one (``factory.make_transport``, which passes itself: no
    import cycle); other keyword options go to the children that take them (``host``,
    ``advertise_host``, ``ucx_devices``).
    """

    transport_name = "auto"
    reregister_refusal = ""  # its children that cannot are dropped at ``release`` (tcp always can)

    def __init__(
        self,
        *,
        model: str = "",
        table: Mapping[str, Any] | str | Path | None = None,
        transports: Sequence[str] | None = None,
        store: Any = None,
        make_child: Callable[..., KVTransport],
        **child_opts: Any,
    ) -> None:
        super().__init__(model=model)
        self._make_child = make_child
        if table is None:
            self._table = selection.default_table()
        elif isinstance(table, str | Path):
            self._table = selection.load_table(table)
        else:
            self._table = selection.check_table(table)
        self._wanted = tuple(transports) if transports is not None else None
        self._store = store
        self._child_opts = child_opts
        self._children: dict[str, KVTransport] = {}

    @property
    def children(self) -> dict[str, KVTransport]:
        """The transports built at ``register``, by name."""
        return dict(self._children)

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        make_transport = self._make_child
        if self._wanted is not None:
            names = self._wanted
        elif kv.is_cuda:
            names = ("cuda_ipc", "nixl", "tcp", "nccl")
        else:
            names = ("tcp", "nixl", "nccl")
        for name in names:
            if name == "nccl" and self._store is None:
                continue
            opts = {k: v for k, v in self._child_opts.items() if k in _OPTIONS.get(name, ())}
            if name == "nccl":
                opts["store"] = self._store
            try:
                child = make_transport(name, model=self._model, **opts)
            except (ImportError, RuntimeError, ValueError) as e:
                logger.info("auto transport: %s unavailable here: %s", name, e)
                continue
            child._inbox = self._inbox  # a push lands through whichever child the owner picked
            try:
                child.register(kv)
            except (RuntimeError, ValueError) as e:
                logger.info("auto transport: %s cannot register this tensor: %s", name, e)
                child.close()
                continue
            self._children[name] = child
        if not self._children:
            raise RuntimeError(f"auto transport: none of {names} can run here")

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        for child in self._children.values():
            child.register(kv)

    def _release(self) -> None:
        """Release the children; close and drop those that cannot re-register (nccl): after the cache
        comes back, peers pick among the others (the metadata no longer offers them)."""
        for name, child in list(self._children.items()):
            if child.can_reregister:
                child.release()
            else:
                logger.warning("auto transport: dropping %s at release: %s", name, child.reregister_refusal)
                child.close()
                del self._children[name]

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        return {"children": list(self._children)}, _pack([c.metadata() for c in self._children.values()])

    def route(self, peer_metadata: bytes) -> tuple[KVTransport, bytes, selection.Choice]:
        """The child to use with this peer, the peer's metadata for it, and why (the table's choice)."""
        peer = self._check_peer_any(peer_metadata)
        loc = selection.locality(host_id(), device_id(self.kv), peer.host, peer.device)
        if peer.transport != self.transport_name:  # a peer with one concrete transport
            offered = {peer.transport: peer_metadata}
        else:
            try:
                offered = {PeerMetadata.decode(m).transport: m for m in _unpack(peer.blob)}
            except (ValueError, struct.error) as e:
                raise TransferError(f"malformed auto metadata from {peer.name!r}: {e}") from e
        common = [name for name in self._children if name in offered]
        try:
            choice = selection.choose(self._table, loc, common)
        except ValueError as e:
            raise LayoutMismatchError(f"no common transport with {peer.name!r}: {e}") from e
        return self._children[choice.transport], offered[choice.transport], choice

    def preferred_mode(self, peer_metadata: bytes) -> Mode:
        return self.route(peer_metadata)[2].mode

    def pull(
        self,
        peer_metadata: bytes,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        child, metadata, _ = self.route(peer_metadata)
        return child.pull(metadata, remote_block_ids, local_block_ids, timeout_s)

    def push(
        self,
        dest_metadata: bytes,
        transfer_id: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TransferResult:
        child, metadata, _ = self.route(dest_metadata)
        return child.push(metadata, transfer_id, local_block_ids, remote_block_ids, timeout_s)

    def connect(self, peer_metadata: bytes) -> PeerMetadata:
        child, metadata, _ = self.route(peer_metadata)
        child.connect(metadata)
        return PeerMetadata.decode(peer_metadata)

    def _check_peer_any(self, peer_metadata: bytes) -> PeerMetadata:
        peer = PeerMetadata.decode(peer_metadata)
        diff = self.layout.mismatches(peer.layout)
        if diff:
            raise LayoutMismatchError(f"KV layout mismatch with peer {peer.name!r}: {'; '.join(diff)}")
        return peer

    def disconnect(self, peer_metadata: bytes) -> None:
        try:
            peer = PeerMetadata.decode(peer_metadata)
            parts = _unpack(peer.blob) if peer.transport == self.transport_name else [peer_metadata]
        except (ValueError, struct.error):
            return
        for part in parts:
            for child in self._children.values():
                child.disconnect(part)

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        raise AssertionError("auto delegates every transfer to a child")  # pull() is overridden

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        raise AssertionError("auto delegates every transfer to a child")  # push() is overridden

    def _close(self) -> None:
        for child in self._children.values():
            child.close()


# Which of AutoTransport's keyword options each child takes.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "tcp": ("host", "advertise_host", "server_timeout_s"),
    "cuda_ipc": ("host", "server_timeout_s"),
    "nccl": ("host", "advertise_host", "server_timeout_s", "backend"),
    "nixl": ("ucx_devices", "progress_delay_us", "backends"),
}
