"""Plain TCP transport, the fallback where NIXL is not installed.

The block owner serves READs of its registered tensor on a socket (a thread per connection). A pull
opens one connection and sends one request; the server answers with a header and the raw bytes of
the runs, in request order, which the puller receives straight into its own blocks (CPU tensors: no
copy; CUDA tensors: through a pinned staging buffer).

Wire format: every message is a 4-byte big-endian length and that many bytes of JSON.
  puller -> owner  {"name": owner's name from its metadata, "layout": puller's layout, "runs": [[start, n]]}
  owner -> puller  {"ok": true, "name", "layout", "num_bytes"} then num_bytes raw bytes,
                   or {"ok": false, "reason": "layout" | "peer", "error": "..."}
Both sides check the layout; the puller also checks the name, so stale metadata (another process now
on that port) fails cleanly instead of reading someone else's blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import struct
import threading
import time
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
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_MAX_MESSAGE = 64 << 20  # a request for a million runs is still far below this
_STAGING_BYTES = 8 << 20  # CUDA tensors move through pinned host buffers of this size


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous CPU tensor, sharing its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


class _Deadline:
    """Socket reads against one absolute deadline (``None``: the socket's own timeout applies)."""

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            if self.deadline is not None:
                remaining = self.deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError("deadline passed")
                self.sock.settimeout(remaining)
            n = self.sock.recv_into(buf[got:])
            if n == 0:
                raise ConnectionError("peer closed the connection")
            got += n

    def recv_message(self) -> dict[str, Any]:
        head = bytearray(_LEN.size)
        self.recv_into(memoryview(head))
        (n,) = _LEN.unpack(head)
        if n > _MAX_MESSAGE:
            raise ConnectionError(f"message of {n} bytes exceeds the {_MAX_MESSAGE} byte limit")
        body = bytearray(n)
        self.recv_into(memoryview(body))
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ConnectionError("message is not a JSON object")
        return obj


class TcpTransport(KVTransport):
    """Serves our blocks on ``host:port`` (port 0: any free port) and pulls over plain TCP.

    ``advertise_host`` is the address peers dial (defaults to ``host``; set it when binding 0.0.0.0).
    ``server_timeout_s`` bounds every socket operation of the serving side.
    """

    transport_name = "tcp"

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
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._served_layout: KVLayout | None = None  # outlives close() for in-flight serving threads
        self._bytes: torch.Tensor | None = None  # kv flattened to uint8, same memory
        self._host_view: memoryview | None = None  # bytes of kv when it lives in host memory
        self._staging_pool: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # pinned, for CUDA kv

    @property
    def port(self) -> int:
        """The port we serve on (after ``register``)."""
        if self._listener is None:
            raise RuntimeError("tcp transport: register(kv) first")
        return int(self._listener.getsockname()[1])

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._bytes = kv.reshape(-1).view(torch.uint8)
        self._host_view = _byte_view(kv) if kv.device.type == "cpu" else None
        self._served_layout = layout
        self._listener = socket.create_server((self._host, self._port), backlog=128)
        self._listener.settimeout(0.5)  # the accept loop notices close() within this
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        return {"host": self._advertise_host, "port": self.port}, b""

    # Serving side.

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-serve", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._server_timeout_s)
            request = _Deadline(conn, None).recv_message()
            layout = self._served_layout
            assert layout is not None
            runs, error = self._check_request(layout, request)
            if error is not None:
                _send_message(conn, {"ok": False, **error})
                return
            bpb = layout.bytes_per_block
            _send_message(
                conn,
                {
                    "ok": True,
                    "name": self.name,
                    "layout": layout.to_dict(),
                    "num_bytes": sum(n for _, n in runs) * bpb,
                },
            )
            runs = [(start * bpb, n * bpb) for start, n in runs]
            for offset, nbytes in runs:
                self._send_bytes(conn, offset, nbytes)
        except (OSError, ValueError) as e:
            logger.debug("%s: serving a pull failed: %s", self.name, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

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

    def _send_bytes(self, conn: socket.socket, offset: int, nbytes: int) -> None:
        if self._host_view is not None:
            conn.sendall(self._host_view[offset : offset + nbytes])
            return
        assert self._bytes is not None
        with self._staging() as (staging, view):
            for start in range(offset, offset + nbytes, _STAGING_BYTES):
                end = min(start + _STAGING_BYTES, offset + nbytes)
                staging[: end - start].copy_(self._bytes[start:end])
                conn.sendall(view[: end - start])

    # Pulling side.

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        host, port = peer.address["host"], int(peer.address["port"])
        try:
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                raise TimeoutError("deadline passed before connecting")
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(max(deadline - time.perf_counter(), 1e-3))
                _send_message(
                    sock,
                    {
                        "name": peer.name,
                        "layout": self.layout.to_dict(),
                        "runs": [[r.remote_start, r.num_blocks] for r in runs],
                    },
                )
                stream = _Deadline(sock, deadline)
                reply = stream.recv_message()
                self._check_reply(peer, runs, reply)
                bpb = self.layout.bytes_per_block
                for run in runs:
                    self._recv_bytes(stream, run.local_start * bpb, run.num_blocks * bpb)
        except TimeoutError as e:
            raise TransferTimeoutError(f"tcp pull from {peer.name!r} at {host}:{port} timed out") from e
        except (OSError, ValueError) as e:  # refused, reset, closed, garbage
            raise TransferError(f"tcp pull from {peer.name!r} at {host}:{port} failed: {e}") from e
        return len(runs)

    def _check_reply(self, peer: PeerMetadata, runs: list[BlockRun], reply: dict[str, Any]) -> None:
        if not reply.get("ok"):
            error = str(reply.get("error", "unknown error"))
            raise LayoutMismatchError(error) if reply.get("reason") == "layout" else TransferError(error)
        if reply.get("name") != peer.name:
            raise TransferError(f"peer answered as {reply.get('name')!r}, expected {peer.name!r}")
        diff = self.layout.mismatches(KVLayout.from_dict(reply["layout"]))
        if diff:
            raise LayoutMismatchError(f"KV layout mismatch with peer {peer.name!r}: {'; '.join(diff)}")
        expected = sum(r.num_blocks for r in runs) * self.layout.bytes_per_block
        if reply.get("num_bytes") != expected:
            raise TransferError(f"peer announced {reply.get('num_bytes')} bytes, expected {expected}")

    def _recv_bytes(self, stream: _Deadline, offset: int, nbytes: int) -> None:
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

    def _close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
