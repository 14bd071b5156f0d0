"""NCCL transport: torch.distributed point-to-point send/recv, one communicator per pair of workers.

A pair's process group (NCCL for CUDA tensors, gloo for CPU ones) is made once, on the first
transfer between the two, straight from a ``torch.distributed.Store`` the caller provides (a
``TCPStore``, or one backed by etcd: anything implementing ``Store``), under the prefix
``tandem-kv/<initiator>/<responder>/<generation>``; the global ``init_process_group`` is never used.
The initiator (the side that pulls or pushes) is rank 0 and asks the responder, over the
responder's channel server, to join; both then build the group, which rendezvous through the store.

Each transfer: the initiator sends a header over the channel (``read``: runs to send back; ``write``:
transfer id, digest and destination runs), the responder answers ``ready``, then the data moves as
ONE send/recv (blocks gathered into a staging buffer unless they are one run), and the receiver
scatters it into its blocks. Transfers on one pair are serialized (send/recv match in order); a
failure or timeout breaks the pair's group, which the next transfer rebuilds as a new generation.

NCCL cannot put two ranks on one GPU: a pair on the same GPU never uses this transport.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kv_transfer import metrics
from kv_transfer.base import KVTransport, PeerMetadata
from kv_transfer.channel import ChannelClient, ChannelServer, Stream
from kv_transfer.errors import LayoutMismatchError, TransferError, TransferTimeoutError
from kv_transfer.inbox import blocks_digest
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_GROUP_TIMEOUT_S = 60.0  # building a pair's group (both sides join through the store)


@dataclass
class _Pair:
    key: str
    group: Any  # a ProcessGroup of 2: rank 0 the initiator, rank 1 the responder
    lock: threading.Lock = field(default_factory=threading.Lock)


class NcclTransport(KVTransport):
    """Point-to-point over a per-pair process group built from ``store``; ``backend`` defaults to
    nccl for CUDA tensors and gloo for CPU ones. ``host``/``port``: the channel server for headers."""

    transport_name = "nccl"
    # Its transfers name no address (send/recv of the blocks at call time), but a pair's communicator
    # and what NCCL cached of the old buffers were never tried across a park: NCCL puts one rank per
    # GPU, and our GPU machine has one.
    reregister_refusal = "re-registration after a park is untested (NCCL needs two GPUs to test it)"

    def __init__(
        self,
        *,
        store: dist.Store,
        backend: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        server_timeout_s: float = 30.0,
        model: str = "",
    ) -> None:
        super().__init__(model=model)
        if store is None:
            raise ValueError("the nccl transport needs a torch.distributed Store for the pairs' rendezvous")
        self._store = store
        self._backend = backend
        self._host, self._port = host, port
        self._advertise_host = advertise_host or host
        self._server_timeout_s = server_timeout_s
        self._server: ChannelServer | None = None
        self._client = ChannelClient()
        self._initiated: dict[str, _Pair] = {}  # peer name -> the pair we initiated
        self._joined: dict[str, _Pair] = {}  # pair key -> a pair a peer initiated with us
        self._generation = 0

    @property
    def backend(self) -> str:
        return self._backend or ("nccl" if self.kv.is_cuda else "gloo")

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._server = ChannelServer(self.name, self._host, self._port, self._handle, self._server_timeout_s)

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        assert self._server is not None
        return {"host": self._advertise_host, "port": self._server.port, "backend": self.backend}, b""

    def _make_group(self, key: str, rank: int, timeout_s: float) -> Any:
        store = dist.PrefixStore(key, self._store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._host)]
            return dist.ProcessGroupGloo(store, rank, 2, opts)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)

    # Initiating side.

    def _pair(self, peer: PeerMetadata, deadline: float) -> _Pair:
        """Our pair with ``peer``, built on first use (both sides join through the store)."""
        with self._lock:
            pair = self._initiated.get(peer.name)
            if pair is not None:
                return pair
            self._generation += 1
            key = f"tandem-kv/{self.name}/{peer.name}/{self._generation}"
        if peer.address.get("backend") != self.backend:
            raise LayoutMismatchError(f"peer {peer.name!r} uses {peer.address.get('backend')}, we {self.backend}")
        joined: list[BaseException | None] = []

        def ask() -> None:
            try:
                with self._connection(peer, deadline) as stream:
                    stream.send_message({"op": "pair", "name": peer.name, "key": key})
                    reply = stream.recv_message()
                    joined.append(None if reply.get("ok") else TransferError(str(reply.get("error"))))
            except (OSError, ValueError, TransferError) as e:
                joined.append(e)

        asker = threading.Thread(target=ask, name=f"{self.name}-pair", daemon=True)
        asker.start()
        try:
            group = self._make_group(key, 0, max(deadline - time.perf_counter(), 1.0))
        except RuntimeError as e:
            raise TransferError(f"cannot build the {self.backend} pair with {peer.name!r}: {e}") from e
        finally:
            asker.join(max(deadline - time.perf_counter(), 0.0))
        if not joined or joined[0] is not None:
            raise TransferError(f"peer {peer.name!r} did not join the pair: {joined[0] if joined else 'timeout'}")
        metrics.record_connect(self.transport_name)
        with self._lock:
            pair = self._initiated.setdefault(peer.name, _Pair(key, group))
        return pair

    def _drop_pair(self, peer_name: str, pair: _Pair) -> None:
        with self._lock:
            if self._initiated.get(peer_name) is pair:
                del self._initiated[peer_name]
        _abort(pair.group)

    @contextlib.contextmanager
    def _connection(self, peer: PeerMetadata, deadline: float) -> Iterator[Stream]:
        with self._client.connection(peer.address["host"], int(peer.address["port"]), peer.name, deadline) as s:
            yield s

    def _run(self, peer: PeerMetadata, header: dict[str, Any], deadline: float, sending: bool, runs: list[BlockRun]):
        """One transfer on the pair: header, ``ready`` (or a refusal: the pair stays), one send or recv,
        ``done``. A failure after ``ready`` breaks the pair's group: the next transfer rebuilds it."""
        pair = self._pair(peer, deadline)
        ids = [(r.local_start + i) for r in runs for i in range(r.num_blocks)]
        with pair.lock:
            ready = False
            try:
                with self._connection(peer, deadline) as stream:
                    stream.send_message({**header, "name": peer.name, "key": pair.key, "layout": self.layout.to_dict()})
                    _raise_unless_ok(stream.recv_message())
                    ready = True
                    if sending:
                        self._send(pair, 1, ids, deadline)
                    else:
                        self._recv(pair, 1, ids, deadline)
                    _raise_unless_ok(stream.recv_message())
            except TimeoutError as e:
                self._drop_pair(peer.name, pair)
                raise TransferTimeoutError(f"{self.backend} transfer with {peer.name!r} timed out") from e
            except (OSError, ValueError, RuntimeError) as e:
                if ready or not isinstance(e, TransferError):
                    self._drop_pair(peer.name, pair)
                if isinstance(e, TransferError):
                    raise
                raise TransferError(f"{self.backend} transfer with {peer.name!r} failed: {e}") from e
        return 1

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        header = {"op": "read", "runs": [[r.remote_start, r.num_blocks] for r in runs]}
        return self._run(peer, header, deadline, False, runs)

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        header = {
            "op": "write",
            "transfer_id": transfer_id,
            "digest": digest,
            "runs": [[r.remote_start, r.num_blocks] for r in runs],
        }
        return self._run(peer, header, deadline, True, runs)

    # Data: one send or recv of the blocks ``ids`` (gathered, or one run as is).

    def _send(self, pair: _Pair, dst_rank: int, ids: list[int], deadline: float) -> None:
        if not ids:
            return
        data = self._blocks(ids)
        if data is None:
            data = self.kv.index_select(0, torch.tensor(ids, device=self.kv.device))
        _wait(pair.group.send([data], dst_rank, 0), deadline)

    def _recv(self, pair: _Pair, src_rank: int, ids: list[int], deadline: float) -> None:
        if not ids:
            return
        data = self._blocks(ids)
        staged = data is None
        if data is None:
            data = torch.empty((len(ids), *self.layout.block_shape), dtype=self.kv.dtype, device=self.kv.device)
        _wait(pair.group.recv([data], src_rank, 0), deadline)
        if staged:
            self.kv.index_copy_(0, torch.tensor(ids, device=self.kv.device), data)

    def _blocks(self, ids: list[int]) -> torch.Tensor | None:
        """Our blocks ``ids`` as one view when they are consecutive, else None."""
        if ids == list(range(ids[0], ids[0] + len(ids))):
            return self.kv[ids[0] : ids[0] + len(ids)]
        return None

    # Responding side.

    def _handle(self, stream: Stream, request: dict[str, Any]) -> None:
        op = request.get("op")
        if request.get("name") != self.name:
            stream.send_message({"ok": False, "error": f"stale metadata: asked for {request.get('name')!r}"})
            return
        if op == "pair":
            self._join(stream, str(request["key"]))
            return
        with self._lock:
            pair = self._joined.get(str(request.get("key")))
        if pair is None:
            stream.send_message({"ok": False, "error": f"no pair {request.get('key')!r} here"})
            return
        diff = self.layout.mismatches(KVLayout.from_dict(request["layout"]))
        if diff:
            stream.send_message({"ok": False, "reason": "layout", "error": "; ".join(diff)})
            return
        runs = [(int(s), int(n)) for s, n in request["runs"]]
        ids = [s + i for s, n in runs for i in range(n)]
        if any(not 0 <= b < self.layout.num_blocks for b in ids):
            stream.send_message({"ok": False, "error": "runs out of range"})
            return
        if op == "read":
            self._serve_read(stream, pair, ids)
        elif op == "write":
            self._serve_write(stream, pair, request, ids)
        else:
            stream.send_message({"ok": False, "error": f"unknown operation {op!r}"})

    def _join(self, stream: Stream, key: str) -> None:
        try:
            group = self._make_group(key, 1, _GROUP_TIMEOUT_S)
        except RuntimeError as e:
            stream.send_message({"ok": False, "error": f"joining {key}: {e}"})
            return
        with self._lock:
            stale = [k for k in self._joined if k.rsplit("/", 1)[0] == key.rsplit("/", 1)[0]]
            old = [self._joined.pop(k) for k in stale]  # the initiator rebuilt the pair
            self._joined[key] = _Pair(key, group)
        for pair in old:
            _abort(pair.group)
        stream.send_message({"ok": True})

    def _serve_read(self, stream: Stream, pair: _Pair, ids: list[int]) -> None:
        stream.send_message({"ok": True})
        try:
            self._send(pair, 0, ids, stream.deadline or time.perf_counter() + self._server_timeout_s)
        except (RuntimeError, TimeoutError) as e:
            self._forget(pair)
            stream.send_message({"ok": False, "error": f"send failed: {e}"})
            return
        stream.send_message({"ok": True})

    def _serve_write(self, stream: Stream, pair: _Pair, request: dict[str, Any], ids: list[int]) -> None:
        transfer_id, digest = str(request["transfer_id"]), str(request["digest"])
        try:
            if blocks_digest(ids) != digest:
                raise TransferError("the runs do not match the digest")
            _, deadline = self._inbox.claim(transfer_id, digest)
        except TransferError as e:
            stream.send_message({"ok": False, "error": str(e)})
            return
        stream.send_message({"ok": True})
        try:
            self._recv(pair, 0, ids, deadline)
        except (RuntimeError, TimeoutError) as e:
            self._forget(pair)
            self._inbox.fail(transfer_id, TransferError(f"{self.backend} push of {transfer_id!r} failed: {e}"))
            stream.send_message({"ok": False, "error": f"recv failed: {e}"})
            return
        landed = self._inbox.complete(transfer_id, digest, 1)
        stream.send_message({"ok": landed, "error": "the destination does not await it (any more)"})

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            if self._joined.get(pair.key) is pair:
                del self._joined[pair.key]
        _abort(pair.group)

    def _interrupt(self) -> None:
        self._client.close()
        if self._server is not None:
            self._server.close()

    def _close(self) -> None:
        with self._lock:
            pairs = list(self._initiated.values()) + list(self._joined.values())
            self._initiated.clear()
            self._joined.clear()
        for pair in pairs:
            _abort(pair.group)


def _wait(work: Any, deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    try:
        work.wait(datetime.timedelta(seconds=remaining))
    except RuntimeError as e:
        if "imed out" in str(e) or time.perf_counter() >= deadline:
            raise TimeoutError(str(e)) from e
        raise


def _abort(group: Any) -> None:
    """Tear a pair's group down without waiting for its peer (best effort)."""
    for name in ("abort", "shutdown"):
        method = getattr(group, name, None)
        if method is not None:
            with contextlib.suppress(Exception):
                method()
            return


def _raise_unless_ok(reply: dict[str, Any]) -> None:
    if not reply.get("ok"):
        error = str(reply.get("error", "unknown error"))
        raise LayoutMismatchError(error) if reply.get("reason") == "layout" else TransferError(error)
