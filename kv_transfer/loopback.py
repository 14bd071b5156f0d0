"""In-process transport: two engines in one process (unit tests) copy between registered tensors."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

from kv_transfer.base import KVTransport, PeerMetadata, TransferError, TransferTimeoutError
from kv_transfer.layout import BlockRun, KVLayout

# name -> live transport in this process; an entry disappears on close (the "peer died" case).
_REGISTRY: dict[str, LoopbackTransport] = {}
_REGISTRY_LOCK = threading.Lock()


class LoopbackTransport(KVTransport):
    """Copies blocks with ``Tensor.copy_`` from a peer registered in the same process."""

    transport_name = "loopback"
    reregister_refusal = ""

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY[self.name] = self

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        pass  # still in the registry: peers find the tensor by name

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        return {"pid": os.getpid()}, b""

    def _lookup(self, peer: PeerMetadata) -> LoopbackTransport:
        if peer.address.get("pid") != os.getpid():
            raise TransferError(f"loopback peer {peer.name!r} lives in process {peer.address.get('pid')}, not this one")
        with _REGISTRY_LOCK:
            owner = _REGISTRY.get(peer.name)
        if owner is None or owner._kv is None or owner._closing.is_set() or owner._released:
            raise TransferError(f"loopback peer {peer.name!r} is closed")
        return owner

    def _connect(self, peer: PeerMetadata) -> None:
        self._lookup(peer)

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        src = self._lookup(peer)._kv
        assert src is not None
        _copy(src, self.kv, [(r.remote_start, r.local_start, r.num_blocks) for r in runs], deadline, peer.name)
        return len(runs)

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        dest = self._lookup(peer)
        dest._inbox.claim(transfer_id, digest)  # refused (TransferError) unless the destination awaits it
        assert dest._kv is not None
        _copy(self.kv, dest._kv, [(r.local_start, r.remote_start, r.num_blocks) for r in runs], deadline, peer.name)
        if not dest._inbox.complete(transfer_id, digest, len(runs)):
            raise TransferError(f"loopback peer {peer.name!r} stopped awaiting transfer {transfer_id!r}")
        return len(runs)

    def _interrupt(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self.name, None)

    def _close(self) -> None:
        self._interrupt()


def _copy(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]], deadline: float, peer: str) -> None:
    """(src start, dst start, n) block runs, checking the deadline between runs."""
    for src_start, dst_start, n in runs:
        if time.perf_counter() > deadline:
            raise TransferTimeoutError(f"loopback transfer with {peer!r} timed out")
        dst[dst_start : dst_start + n].copy_(src[src_start : src_start + n])
    if dst.is_cuda or src.is_cuda:
        torch.cuda.synchronize(dst.device if dst.is_cuda else src.device)
