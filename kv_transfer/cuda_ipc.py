"""CUDA IPC transport: processes on one node copy straight between each other's KV tensors.

A peer asks for our KV tensor's CUDA IPC handle once, on its first transfer with us (``open`` over
our channel server), and keeps the mapping until ``disconnect``/``close`` or our ``unmap``. Each
``open`` exports the handle anew (``UntypedStorage._share_cuda_``, what ``torch.multiprocessing``
uses): torch keeps an exported allocation alive until the process that opened that export lets go
of it, so one export per peer that maps it lets the memory go once every such peer did (an export
made at registration that nobody opened would keep the cache allocated for ever: a parked worker's
memory would not go back). A transfer is then a device-to-device copy inside one process: a few
runs of blocks as one ``copy_`` each, many as ONE gather kernel (``gather.copy_runs``).

- pull: the destination copies from the owner's mapped tensor into its blocks, then synchronizes.
- push: the owner ``claim``s the transfer on the destination's channel server (it still awaits
  exactly these blocks, and is alive: nothing is written into a dead process's memory), copies into
  the destination's mapped tensor, synchronizes, then sends ``done`` (transfer id, digest; not
  answered: one round trip per push), on which the destination's inbox completes the ``expect``ed
  transfer; when ``push`` returns the owner may free its blocks.

Re-registration (a parked worker's cache comes back at a new address): ``release`` sends
``unmap`` to every peer that opened our handle and waits for its answer (it dropped the mapping),
so the old allocation is really freed; ``register`` starts the next ``epoch``. A peer that sees a
newer epoch opens the new handle and drops the old mapping; an older epoch than it knows is stale
metadata, refused (``TransferError``: the caller recomputes); ``open`` and a push's ``claim`` name
the epoch the peer saw, and we refuse any other (and everything while released).

The caller makes sure the source blocks are final (the step that wrote them has finished). Only
processes on the same machine (``host_id``) whose GPUs can map each other's memory can use it; the
metadata carries the GPU's uuid, mapped to a local device index on open.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import metrics
from kv_transfer.base import KVTransport, PeerMetadata, host_id
from kv_transfer.channel import ChannelClient, ChannelServer, Stream
from kv_transfer.errors import TransferError, TransferTimeoutError, TransportClosedError
from kv_transfer.gather import copy_runs
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_SPIN_S = 2e-3  # poll a copy's event without sleeping this long, then sleep between polls
_POLL_SLEEP_S = 5e-5
_UNMAP_TIMEOUT_S = 2.0  # a peer's answer to ``unmap`` at release


def export_handle(kv: torch.Tensor) -> dict[str, Any]:
    """The CUDA IPC handle of ``kv``'s memory, as JSON-able fields (no pickle crosses processes)."""
    storage = kv.untyped_storage()
    device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = storage._share_cuda_()
    return {
        "handle": bytes(handle).hex(),
        "size_bytes": int(size),
        "offset_bytes": int(offset),
        "ref_counter_handle": bytes(ref_handle).hex(),
        "ref_counter_offset": int(ref_offset),
        "event_handle": bytes(event_handle or b"").hex(),
        "event_sync_required": bool(event_sync),
        "tensor_offset_bytes": kv.storage_offset() * kv.element_size(),
        "uuid": str(torch.cuda.get_device_properties(device).uuid),
    }


def open_handle(fields: dict[str, Any], layout: KVLayout) -> torch.Tensor:
    """The peer's KV tensor, mapped into this process from ``export_handle``'s fields."""
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if fields["uuid"] not in uuids:
        raise TransferError(f"the peer's GPU {fields['uuid']} is not visible to this process")
    device = uuids.index(fields["uuid"])
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        device,
        bytes.fromhex(fields["handle"]),
        int(fields["size_bytes"]),
        int(fields["offset_bytes"]),
        bytes.fromhex(fields["ref_counter_handle"]),
        int(fields["ref_counter_offset"]),
        bytes.fromhex(fields["event_handle"]),  # bytes, empty when no event is needed
        bool(fields["event_sync_required"]),
    )
    raw = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
    raw.set_(storage)
    start = int(fields["tensor_offset_bytes"])
    nbytes = layout.num_blocks * layout.bytes_per_block
    if start + nbytes > raw.numel():
        raise TransferError(f"the peer's handle maps {raw.numel()} bytes, its layout needs {start + nbytes}")
    return raw[start : start + nbytes].view(layout.torch_dtype).view(layout.num_blocks, *layout.block_shape)


@dataclass
class _Mapped:
    kv: torch.Tensor  # the peer's KV tensor, mapped here
    epoch: int = 0  # of the peer's registration it maps
    users: int = 0
    dropped: bool = False


class CudaIpcTransport(KVTransport):
    """Copies through CUDA IPC mappings between processes on one node (CUDA tensors only).

    ``host``/``port``: the channel server that receives push notifications (127.0.0.1: one machine,
    which is all CUDA IPC can reach anyway).
    """

    transport_name = "cuda_ipc"
    reregister_refusal = ""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, server_timeout_s: float = 30.0, model: str = ""):
        super().__init__(model=model)
        self._host, self._port = host, port
        self._server_timeout_s = server_timeout_s
        self._server: ChannelServer | None = None
        self._client = ChannelClient()
        self._mapped: dict[str, _Mapped] = {}
        self._mappers: dict[str, tuple[str, int]] = {}  # peers that mapped our handle: name -> channel address
        self._streams = threading.local()  # a copy stream per transfer thread

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        if not kv.is_cuda:
            raise ValueError("the cuda_ipc transport moves CUDA tensors only")
        self._server = ChannelServer(self.name, self._host, self._port, self._handle_message, self._server_timeout_s)

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        pass  # peers open the new tensor's handle on their next transfer (``open`` names the epoch)

    def _release(self) -> None:
        """Have every peer that opened our handle drop it (answered once dropped)."""
        with self._lock:
            mappers, self._mappers = dict(self._mappers), {}
        deadline = time.perf_counter() + _UNMAP_TIMEOUT_S
        for name, (host, port) in mappers.items():
            peer = PeerMetadata(self.transport_name, name, self.layout, {"host": host, "port": port})
            try:
                self._notify(peer, {"op": "unmap", "name": name, "peer": self.name, "epoch": self._epoch}, deadline)
            except TransferError as e:  # gone, or slow: its mapping keeps the old allocation until it drops it
                logger.warning("%s: %s did not drop its mapping of our KV cache: %s", self.name, name, e)

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        assert self._server is not None
        return {"host": self._host, "port": self._server.port}, b""

    # Peers' mapped tensors.

    def _acquire(self, peer: PeerMetadata, deadline: float | None = None) -> _Mapped:
        """The peer's tensor, mapped on first use (and again when it re-registered), counted as used
        until ``_release_mapping``."""
        if peer.host != host_id():
            raise TransferError(f"cuda_ipc peer {peer.name!r} runs on another machine ({peer.host})")
        with self._lock:
            mapped = self._lookup(peer)
            if mapped is not None:
                mapped.users += 1
                return mapped
        tensor = self._open(peer, deadline if deadline is not None else time.perf_counter() + 5.0)
        with self._lock:
            mapped = self._lookup(peer)
            if mapped is None:  # (else another transfer mapped it meanwhile: ours closes unused)
                mapped = self._mapped[peer.name] = _Mapped(tensor, peer.epoch)
                metrics.record_connect(self.transport_name)
            mapped.users += 1
            return mapped

    def _lookup(self, peer: PeerMetadata) -> _Mapped | None:
        """Our mapping of the peer's current registration (under the lock), or None."""
        mapped = self._mapped.get(peer.name)
        if mapped is not None and mapped.epoch != peer.epoch:
            if peer.epoch < mapped.epoch:
                raise TransferError(f"stale metadata of cuda_ipc peer {peer.name!r}: its registration "
                                    f"{peer.epoch}, we mapped its newer {mapped.epoch}")
            del self._mapped[peer.name]  # it re-registered: the old mapping closes once unused
            mapped = None
        return mapped

    def _open(self, peer: PeerMetadata, deadline: float) -> torch.Tensor:
        """Ask the peer for its handle (it exports it for us and remembers us, to ``unmap`` us when it
        releases its cache) and map it. A peer at another registration, or released, refuses."""
        assert self._server is not None
        message = {"op": "open", "name": peer.name, "epoch": peer.epoch,
                   "by": {"name": self.name, "host": self._host, "port": self._server.port}}
        reply = self._notify(peer, message, deadline)
        try:
            return open_handle(reply["ipc"], peer.layout)
        except (RuntimeError, KeyError, ValueError) as e:  # TransferError is a RuntimeError too
            raise TransferError(f"cannot open the CUDA IPC handle of {peer.name!r}: {e}") from e

    def _release_mapping(self, mapped: _Mapped) -> None:
        with self._lock:
            mapped.users -= 1

    def _connect(self, peer: PeerMetadata) -> None:
        self._release_mapping(self._acquire(peer))

    def _disconnect(self, peer_name: str) -> None:
        with self._lock:
            self._mapped.pop(peer_name, None)  # the mapping closes once no transfer holds the tensor

    # Transfers.

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        mapped = self._acquire(peer, deadline)
        try:
            return self._copy(
                mapped.kv, self.kv, [(r.remote_start, r.local_start, r.num_blocks) for r in runs], deadline
            )
        finally:
            self._release_mapping(mapped)

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        """Claim (the destination still awaits these blocks, and is alive), copy, then ``done``."""
        message = {"name": peer.name, "transfer_id": transfer_id, "digest": digest}
        self._notify(peer, {**message, "op": "claim", "epoch": peer.epoch}, deadline)
        mapped = self._acquire(peer, deadline)
        try:
            n = self._copy(self.kv, mapped.kv, [(r.local_start, r.remote_start, r.num_blocks) for r in runs], deadline)
        finally:
            self._release_mapping(mapped)
        self._notify(peer, {**message, "op": "done", "num_copies": n}, deadline, answered=False)
        return n

    def _notify(self, peer: PeerMetadata, message: dict[str, Any], deadline: float,
                answered: bool = True) -> dict[str, Any]:
        """Send ``message``; wait for the answer unless ``answered`` is False (``done``: the destination
        completes the transfer on receipt, sparing the owner a round trip)."""
        return self._client.ask(peer.address["host"], int(peer.address["port"]), peer.name, message, deadline,
                                "cuda_ipc", answered)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]], deadline: float) -> int:
        """Copy on this thread's stream and wait for it (polling, so the deadline holds). A copy starts
        only before the deadline, which is at or before the destination's own."""
        if time.perf_counter() >= deadline:
            raise TransferTimeoutError("cuda_ipc copy not started: the deadline passed")
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(device=self.kv.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.device))  # after what the caller queued
        with torch.cuda.stream(stream):
            n = copy_runs(src, dst, runs)
            done = torch.cuda.Event()
            done.record(stream)
        start = time.perf_counter()
        while not done.query():
            now = time.perf_counter()
            if now >= deadline:  # the copy still runs to its end: the destination blocks are undefined
                raise TransferTimeoutError("cuda_ipc copy did not finish before the deadline")
            if self._closing.is_set():
                done.synchronize()  # never release a mapping under a running copy
                raise TransportClosedError("cuda_ipc transport closing")
            time.sleep(0 if now - start < _SPIN_S else _POLL_SLEEP_S)
        return n

    # Serving side: push notifications.

    def _handle_message(self, stream: Stream, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op not in ("claim", "done", "open", "unmap") or request.get("name") != self.name:
            error = f"unexpected message for {self.name!r}: op {op!r} for {request.get('name')!r}"
            stream.send_message({"ok": False, "error": error})
            return
        if op in ("open", "claim") and (self._released or request.get("epoch") != self._epoch):
            error = f"{op} names registration {request.get('epoch')} of {self.name!r}, which is at {self._epoch}" \
                + (" and released (parked)" if self._released else "")
            stream.send_message({"ok": False, "error": error})
            return
        if op == "open":  # one export per peer that maps it (see the module's docstring)
            by = request["by"]
            with self._lock:
                self._mappers[str(by["name"])] = (str(by["host"]), int(by["port"]))
            try:
                ipc = export_handle(self.kv)
            except RuntimeError as e:
                stream.send_message({"ok": False, "error": f"cannot export the KV cache's handle: {e}"})
                return
            stream.send_message({"ok": True, "ipc": ipc})
            return
        if op == "unmap":  # the peer releases its cache: drop our mapping of it (transfers using it finish on it)
            with self._lock:
                mapped = self._mapped.get(str(request["peer"]))
                if mapped is not None and mapped.epoch <= int(request["epoch"]):
                    del self._mapped[str(request["peer"])]
            del mapped
            stream.send_message({"ok": True})
            return
        transfer_id, digest = str(request["transfer_id"]), str(request["digest"])
        if op == "claim":
            try:
                self._inbox.claim(transfer_id, digest)
            except TransferError as e:
                stream.send_message({"ok": False, "error": str(e)})
                return
            stream.send_message({"ok": True})
            return
        self._inbox.complete(transfer_id, digest, int(request["num_copies"]))  # not answered

    def _interrupt(self) -> None:
        self._client.close()
        if self._server is not None:
            self._server.close()

    def _close(self) -> None:
        with self._lock:
            self._mapped.clear()
