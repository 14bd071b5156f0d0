"""Plain TCP transport: works everywhere, the baseline the others are measured against.

The block owner serves its registered tensor on a ``ChannelServer`` (a thread per connection); the
bytes of a run go straight between the socket and the tensor (CPU tensors: no copy; CUDA tensors:
through pinned staging buffers). Connections are pooled per peer, one exchange at a time each.

Exchanges (JSON messages, see ``channel``):
  pull   puller -> owner  {"op": "read", "name": owner's name, "layout": puller's layout, "runs": [[start, n]]}
         owner -> puller  {"ok": true, "name", "layout", "num_bytes"} then num_bytes raw bytes
  push   owner -> dest    {"op": "write", "name": dest's name, "layout", "transfer_id", "digest",
                           "runs": [[dest start, n]], "num_bytes"}
         dest -> owner    {"ok": true} (the destination awaits this transfer), then the owner sends the
                          raw bytes, then dest -> owner {"ok": true} once they are in its blocks
  errors                  {"ok": false, "reason": "layout" | "peer", "error": "..."}
Both sides check the layout; the initiator also checks the name, so stale metadata (another process
now on that port) fails cleanly instead of touching someone else's blocks.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Iterator
from typing import Any

import torch

from kv_transfer.base import (
    KVTransport,
    LayoutMismatchError,
    PeerMetadata,
    TransferError,
    TransferTimeoutError,
)
from kv_transfer.channel import ChannelClient, ChannelServer, Stream
from kv_transfer.inbox import blocks_digest
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_STAGING_BYTES = 8 << 20  # CUDA tensors move through pinned host buffers of this size


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous CPU tensor, sharing its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class TcpTransport(KVTransport):
    """Serves our blocks on ``host:port`` (port 0: any free port); pulls and pushes over plain TCP.

    ``advertise_host`` is the address peers dial (defaults to ``host``; set it when binding 0.0.0.0).
    ``server_timeout_s`` bounds one exchange on the serving side.
    """

    transport_name = "tcp"
    reregister_refusal = ""  # it copies through the tensor, wherever its memory is: nothing to register

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        server_timeout_s: float = 30.0,
        model: str = "",
    ) -> None:
        super().__init__(model=model)
        self._host, self._port = host, port
        self._advertise_host = advertise_host or host
        self._server_timeout_s = server_timeout_s
        self._server: ChannelServer | None = None
        self._client = ChannelClient()
        self._served_layout: KVLayout | None = None  # outlives close() for in-flight serving threads
        self._bytes: torch.Tensor | None = None  # kv flattened to uint8, same memory
        self._host_view: memoryview | None = None  # bytes of kv when it lives in host memory
        self._staging_pool: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # pinned, for CUDA kv

    @property
    def port(self) -> int:
        """The port we serve on (after ``register``)."""
        if self._server is None:
            raise RuntimeError("tcp transport: register(kv) first")
        return self._server.port

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._bytes = kv.reshape(-1).view(torch.uint8)
        self._host_view = _byte_view(kv) if kv.device.type == "cpu" else None
        self._served_layout = layout
        self._server = ChannelServer(self.name, self._host, self._port, self._handle, self._server_timeout_s)

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._bytes = kv.reshape(-1).view(torch.uint8)
        self._host_view = _byte_view(kv) if kv.device.type == "cpu" else None

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        return {"host": self._advertise_host, "port": self.port}, b""

    # Serving side: peers pull from us and push into us.

    def _handle(self, stream: Stream, request: dict[str, Any]) -> None:
        layout = self._served_layout
        assert layout is not None
        runs, error = self._check_request(layout, request)
        if error is None and self._released:
            error = {"reason": "peer", "error": f"{self.name!r} released its KV cache (parked)"}
        op = request.get("op", "read")
        if error is None and op not in ("read", "write"):
            error = {"reason": "peer", "error": f"unknown operation {op!r}"}
        if error is not None:
            stream.send_message({"ok": False, **error})
            return
        bpb = layout.bytes_per_block
        if op == "read":
            num_bytes = sum(n for _, n in runs) * bpb
            stream.send_message({"ok": True, "name": self.name, "layout": layout.to_dict(), "num_bytes": num_bytes})
            for start, n in runs:
                self._send_bytes(stream, start * bpb, n * bpb)
            return
        transfer_id = str(request.get("transfer_id"))
        digest = blocks_digest(b for start, n in runs for b in range(start, start + n))
        try:
            if digest != request.get("digest"):
                raise TransferError("the runs do not match the digest")
            _, deadline = self._inbox.claim(transfer_id, digest)
        except TransferError as e:
            stream.send_message({"ok": False, "reason": "peer", "error": str(e)})
            return
        stream.deadline = min(deadline, stream.deadline or deadline)
        stream.send_message({"ok": True})
        try:
            for start, n in runs:
                self._recv_bytes(stream, start * bpb, n * bpb)
        except (OSError, ValueError) as e:
            self._inbox.fail(transfer_id, TransferError(f"tcp push of {transfer_id!r} broke off: {e}"))
            raise
        landed = self._inbox.complete(transfer_id, digest, len(runs))
        stream.send_message({"ok": landed, "reason": "peer", "error": "the destination stopped awaiting it"})

    def _check_request(
        self, layout: KVLayout, request: dict[str, Any]
    ) -> tuple[list[tuple[int, int]], dict[str, str] | None]:
        """The request's (start block, num blocks) runs, or an error reply."""
        if request.get("name") != self.name:
            error = f"stale metadata: asked for {request.get('name')!r}, this server is {self.name!r}"
            return [], {"reason": "peer", "error": error}
        try:
            diff = layout.mismatches(KVLayout.from_dict(request["layout"]))
            runs = [(int(start), int(n)) for start, n in request["runs"]]
        except (KeyError, TypeError, ValueError) as e:
            return [], {"reason": "peer", "error": f"malformed request: {e!r}"}
        if diff:
            error = f"KV layout mismatch with peer {self.name!r}: {'; '.join(diff)}"
            return [], {"reason": "layout", "error": error}
        bad = [r for r in runs if not (r[0] >= 0 and r[1] > 0 and r[0] + r[1] <= layout.num_blocks)]
        if bad:
            return [], {"reason": "peer", "error": f"runs out of range [0, {layout.num_blocks}): {bad[:8]}"}
        return runs, None

    # Initiating side.

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        request = {"op": "read", "runs": [[r.remote_start, r.num_blocks] for r in runs]}
        with self._exchange(peer, request, deadline) as (stream, reply):
            self._check_reply(peer, runs, reply)
            bpb = self.layout.bytes_per_block
            for run in runs:
                self._recv_bytes(stream, run.local_start * bpb, run.num_blocks * bpb)
        return len(runs)

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        bpb = self.layout.bytes_per_block
        request = {
            "op": "write",
            "transfer_id": transfer_id,
            "digest": digest,
            "runs": [[r.remote_start, r.num_blocks] for r in runs],
            "num_bytes": sum(r.num_blocks for r in runs) * bpb,
        }
        with self._exchange(peer, request, deadline) as (stream, reply):
            _raise_unless_ok(reply)
            for run in runs:
                self._send_bytes(stream, run.local_start * bpb, run.num_blocks * bpb)
            _raise_unless_ok(stream.recv_message())
        return len(runs)

    @contextlib.contextmanager
    def _exchange(
        self, peer: PeerMetadata, request: dict[str, Any], deadline: float
    ) -> Iterator[tuple[Stream, dict[str, Any]]]:
        """Send ``request`` to the peer and yield its first reply; socket errors become TransferErrors."""
        host, port = peer.address["host"], int(peer.address["port"])
        try:
            with self._client.connection(host, port, peer.name, deadline) as stream:
                stream.send_message({**request, "name": peer.name, "layout": self.layout.to_dict()})
                yield stream, stream.recv_message()
        except TimeoutError as e:
            raise TransferTimeoutError(f"tcp transfer with {peer.name!r} at {host}:{port} timed out") from e
        except (OSError, ValueError) as e:  # refused, reset, closed, garbage
            raise TransferError(f"tcp transfer with {peer.name!r} at {host}:{port} failed: {e}") from e

    def _check_reply(self, peer: PeerMetadata, runs: list[BlockRun], reply: dict[str, Any]) -> None:
        _raise_unless_ok(reply)
        if reply.get("name") != peer.name:
            raise TransferError(f"peer answered as {reply.get('name')!r}, expected {peer.name!r}")
        diff = self.layout.mismatches(KVLayout.from_dict(reply["layout"]))
        if diff:
            raise LayoutMismatchError(f"KV layout mismatch with peer {peer.name!r}: {'; '.join(diff)}")
        expected = sum(r.num_blocks for r in runs) * self.layout.bytes_per_block
        if reply.get("num_bytes") != expected:
            raise TransferError(f"peer announced {reply.get('num_bytes')} bytes, expected {expected}")

    # Bytes between a socket and our tensor.

    def _send_bytes(self, stream: Stream, offset: int, nbytes: int) -> None:
        if self._host_view is not None:
            stream.sendall(self._host_view[offset : offset + nbytes])
            return
        assert self._bytes is not None
        with self._staging() as (staging, view):
            for start in range(offset, offset + nbytes, _STAGING_BYTES):
                end = min(start + _STAGING_BYTES, offset + nbytes)
                staging[: end - start].copy_(self._bytes[start:end])
                stream.sendall(view[: end - start])

    def _recv_bytes(self, stream: Stream, offset: int, nbytes: int) -> None:
        if self._host_view is not None:
            stream.recv_into(self._host_view[offset : offset + nbytes])
            return
        assert self._bytes is not None
        with self._staging() as (staging, view):
            for start in range(offset, offset + nbytes, _STAGING_BYTES):
                end = min(start + _STAGING_BYTES, offset + nbytes)
                stream.recv_into(view[: end - start])
                self._bytes[start:end].copy_(staging[: end - start])

    @contextlib.contextmanager
    def _staging(self) -> Iterator[tuple[torch.Tensor, memoryview]]:
        """A pinned host buffer (and its bytes) for one CUDA chunk at a time; pooled, never freed early."""
        try:
            staging = self._staging_pool.get_nowait()
        except queue.Empty:
            staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
        try:
            yield staging, _byte_view(staging)
        finally:
            self._staging_pool.put(staging)

    def _interrupt(self) -> None:
        self._client.close()  # our pulls and pushes fail at once
        if self._server is not None:
            self._server.close()  # peers' transfers with us fail at once

    def _close(self) -> None:
        self._interrupt()


def _raise_unless_ok(reply: dict[str, Any]) -> None:
    if not reply.get("ok"):
        error = str(reply.get("error", "unknown error"))
        raise LayoutMismatchError(error) if reply.get("reason") == "layout" else TransferError(error)
