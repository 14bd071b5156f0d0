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

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY[self.name] = self

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        return {"pid": os.getpid()}, b""

    def _lookup(self, peer: PeerMetadata) -> torch.Tensor:
        if peer.address.get("pid") != os.getpid():
            raise TransferError(f"loopback peer {peer.name!r} lives in process {peer.address.get('pid')}, not this one")
        with _REGISTRY_LOCK:
            owner = _REGISTRY.get(peer.name)
        if owner is None or owner._kv is None:
            raise TransferError(f"loopback peer {peer.name!r} is closed")
        return owner._kv

    def _connect(self, peer: PeerMetadata) -> None:
        self._lookup(peer)

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        src, dst = self._lookup(peer), self.kv
        for run in runs:
            if time.perf_counter() > deadline:
                raise TransferTimeoutError(f"loopback pull from {peer.name!r} timed out")
            n = run.num_blocks
            dst[run.local_start : run.local_start + n].copy_(src[run.remote_start : run.remote_start + n])
        if dst.is_cuda or src.is_cuda:
            torch.cuda.synchronize(dst.device if dst.is_cuda else src.device)
        return len(runs)

    def _close(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self.name, None)
