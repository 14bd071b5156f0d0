"""A small request/answer channel over TCP: the tcp transport's data path, and the control path of
the cuda_ipc, nixl and nccl transports (push notifications, transfer headers, pair set-up, releases).

Every message is a 4-byte big-endian length and that many bytes of JSON; raw bytes may follow a
message when it says so. A connection carries any number of exchanges, one at a time; a client
keeps idle connections per peer for reuse and closes any connection whose exchange failed, so a
failed or timed-out transfer never disturbs another one with the same peer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kv_transfer.errors import TransferError, TransferTimeoutError

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
MAX_MESSAGE = 64 << 20  # a request for a million runs is still far below this


def send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


class Stream:
    """Socket reads and writes against one absolute ``time.perf_counter()`` deadline (``None``: the
    socket's own timeout applies). ``TimeoutError`` when it passes, ``ConnectionError`` on EOF."""

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        self.sock = sock
        self.deadline = deadline

    def _arm(self) -> None:
        if self.deadline is not None:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            self.sock.settimeout(remaining)

    def recv_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            self._arm()
            n = self.sock.recv_into(buf[got:])
            if n == 0:
                raise ConnectionError("peer closed the connection")
            got += n

    def sendall(self, data: memoryview | bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def send_message(self, obj: dict[str, Any]) -> None:
        self._arm()
        send_message(self.sock, obj)

    def recv_message(self) -> dict[str, Any]:
        head = bytearray(_LEN.size)
        self.recv_into(memoryview(head))
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            raise ConnectionError(f"message of {n} bytes exceeds the {MAX_MESSAGE} byte limit")
        body = bytearray(n)
        self.recv_into(memoryview(body))
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ConnectionError("message is not a JSON object")
        return obj


Handler = Callable[[Stream, dict[str, Any]], None]


class ChannelServer:
    """Accepts connections on ``host:port`` (0: any free port) and calls ``handler(stream, request)``
    for each request, a thread per connection. The handler answers on ``stream`` (its deadline is
    ``timeout_s`` from the request); ``OSError``/``ValueError`` from it closes that connection only."""

    def __init__(self, name: str, host: str, port: int, handler: Handler, timeout_s: float) -> None:
        self._name = name
        self._handler = handler
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.settimeout(0.5)  # the accept loop notices close() within this
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-serve", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._closed:
                conn.settimeout(None)  # idle between requests for as long as the client keeps it
                stream = Stream(conn, None)
                request = stream.recv_message()
                stream.deadline = time.perf_counter() + self._timeout_s
                self._handler(stream, request)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.debug("%s: a connection ended: %r", self._name, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=2.0)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ChannelClient:
    """Connections to peers' ``ChannelServer``s, pooled per peer; ``close`` breaks those in use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int, str], list[socket.socket]] = {}
        self._busy: set[socket.socket] = set()
        self._closed = False

    @contextlib.contextmanager
    def connection(self, host: str, port: int, peer: str, deadline: float) -> Iterator[Stream]:
        """A connection to ``peer`` at ``host:port`` for one exchange before ``deadline``; returned to
        the pool when the block ends normally, closed when it raises."""
        key = (host, port, peer)
        sock = self._take(key)
        if sock is None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError("deadline passed before connecting")
            sock = socket.create_connection((host, port), timeout=remaining)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._closed:
                sock.close()
                raise ConnectionError("channel client closed")
            self._busy.add(sock)
        ok = False
        try:
            yield Stream(sock, deadline)
            ok = True
        finally:
            with self._lock:
                self._busy.discard(sock)
                keep = ok and not self._closed
                if keep:
                    self._idle.setdefault(key, []).append(sock)
            if not keep:
                sock.close()

    def ask(self, host: str, port: int, peer: str, message: dict[str, Any], deadline: float, label: str,
            answered: bool = True) -> dict[str, Any]:
        """Send ``message`` (its ``op`` names it in errors) to ``peer``'s server and return its answer,
        or ``{"ok": True}`` at once when ``answered`` is False (the peer acts on receipt and sends
        none). ``TransferTimeoutError`` past ``deadline``; ``TransferError`` (``label``: the transport,
        for the message) when the peer is unreachable, breaks the exchange or refuses."""
        op = message.get("op")
        try:
            with self.connection(host, port, peer, deadline) as stream:
                stream.send_message(message)
                reply = stream.recv_message() if answered else {"ok": True}
        except TimeoutError as e:
            raise TransferTimeoutError(f"{label} {op} to {peer!r} timed out") from e
        except (OSError, ValueError) as e:
            raise TransferError(f"{label} {op} to {peer!r} failed: {e}") from e
        if not reply.get("ok"):
            raise TransferError(f"{label} peer {peer!r} refused {op}: {reply.get('error')}")
        return reply

    def _take(self, key: tuple[str, int, str]) -> socket.socket | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                sock = idle.pop()
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:  # nothing pending: not closed by the peer
                return sock
            sock.close()  # EOF or stray bytes: the peer dropped it

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [s for socks in self._idle.values() for s in socks]
            busy = list(self._busy)
            self._idle.clear()
        for sock in idle:
            sock.close()
        for sock in busy:  # the exchange using it fails at once and closes it
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
