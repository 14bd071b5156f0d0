"""The destination side of a push: the transfers a transport expects to be written into its blocks.

The destination (decode) ``expect``s a transfer into blocks it has allocated and passes the returned
id, its metadata and the block ids to the owner (prefill), which pushes. The transport's receiving
side (a socket message, a NIXL notification) ``complete``s the entry; ``wait`` returns when it is
complete, failed, or past its deadline. Each entry is independent: one timing out fails no other.

Ownership: the blocks belong to the destination throughout. After a failure (``TransferError``) they
hold undefined data; a one-sided writer (nixl, cuda_ipc) may still land a late write until the
pusher's own deadline, which the protocol keeps at or below the destination's (the pusher's
``timeout_s`` is what the destination has left when it asks).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kv_transfer.errors import TransferError, TransferResult, TransferTimeoutError

logger = logging.getLogger(__name__)


def blocks_digest(block_ids: Iterable[int]) -> str:
    """A short digest of a set of destination block ids: a push names the blocks it wrote by it."""
    data = ",".join(str(b) for b in sorted(block_ids)).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class _Expected:
    transfer_id: str
    block_ids: tuple[int, ...]
    digest: str
    start: float
    deadline: float  # time.perf_counter()
    done: threading.Event = field(default_factory=threading.Event)
    result: TransferResult | None = None
    error: TransferError | None = None
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    ahead: bool = False  # expected ahead of its write: receivers that poll leave it until ``hurry``


class Inbox:
    """Expected pushes by transfer id; thread-safe. ``bytes_per_block`` sizes the results."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Expected] = {}  # expected, not yet landed
        self._finished: dict[str, _Expected] = {}  # landed or failed, until waited for (or cancelled)
        self._busy_blocks: dict[int, str] = {}  # block id -> transfer id that will write it
        self._closed: TransferError | None = None
        self._changed = threading.Condition(self._lock)
        self.bytes_per_block = 0
        self.last_deadline = 0.0  # the latest deadline (time.perf_counter) of any transfer ever expected

    def expect(self, block_ids: Sequence[int], timeout_s: float, num_blocks: int, ahead: bool = False) -> str:
        """Register a transfer into ``block_ids`` (distinct, in range, not awaited by another transfer).
        ``ahead``: its write starts only after something the caller learns of (the owner's prefill):
        a receiver that polls for landings (nixl) does not poll for it until ``hurry``."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        bad = [b for b in block_ids if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"local block ids out of range [0, {num_blocks}): {bad[:8]}")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("local block ids repeat: a local block can receive only one remote block")
        now = time.perf_counter()
        entry = _Expected(uuid.uuid4().hex, tuple(block_ids), blocks_digest(block_ids), now, now + timeout_s,
                          ahead=ahead)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            taken = [b for b in block_ids if b in self._busy_blocks]
            if taken:
                raise ValueError(f"local blocks {taken[:8]} already await transfer {self._busy_blocks[taken[0]]}")
            self._entries[entry.transfer_id] = entry
            self.last_deadline = max(self.last_deadline, entry.deadline)
            for b in block_ids:
                self._busy_blocks[b] = entry.transfer_id
            self._changed.notify_all()
        return entry.transfer_id

    def hurry(self, transfer_id: str) -> None:
        """A transfer expected ``ahead`` is about to land (or has): receivers that poll look for it now."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is not None and entry.ahead:
                entry.ahead = False
                self._changed.notify_all()

    def pending(self, ahead: bool = False) -> int:
        """Expected transfers that a receiver polling for landings looks for: not those ``ahead``
        and not hurried (with ``ahead``: every expected transfer)."""
        with self._lock:
            return sum(1 for e in self._entries.values() if ahead or not e.ahead)

    def wait_for_pending(self, timeout_s: float) -> bool:
        """Block until ``pending`` (or ``timeout_s``, or ``close``): receivers that poll sleep here,
        also while the inbox is closed (a released transport: nothing can be expected until it
        registers again). True when something is pending."""
        with self._lock:
            if not any(not e.ahead for e in self._entries.values()):
                self._changed.wait(timeout_s)
            return any(not e.ahead for e in self._entries.values())

    def claim(self, transfer_id: str, digest: str) -> tuple[tuple[int, ...], float]:
        """A message-based receiver is about to write ``transfer_id``: its block ids and deadline.

        Raises ``TransferError`` when the id is unknown (never expected, already failed or timed out)
        or the blocks differ from the expected ones; the receiver then refuses the write.
        """
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None:
                raise TransferError(f"no transfer {transfer_id!r} is expected (timed out, cancelled or unknown)")
            if entry.digest != digest:
                raise TransferError(f"transfer {transfer_id!r} names other blocks than the destination expects")
            return entry.block_ids, entry.deadline

    def complete(self, transfer_id: str, digest: str, num_descriptors: int) -> bool:
        """The blocks of ``transfer_id`` have landed; False (and a log line) when nobody waits for it."""
        entry = self._finish(transfer_id)
        if entry is None:
            logger.info("a push completed transfer %s, which nobody awaits any more", transfer_id)
            return False
        if entry.digest != digest:
            entry.error = TransferError(f"transfer {transfer_id!r} wrote other blocks than the destination expected")
        else:
            n = len(entry.block_ids)
            duration_s = time.perf_counter() - entry.start
            entry.result = TransferResult(n, n * self.bytes_per_block, duration_s, num_descriptors)
        self._signal(entry)
        return entry.error is None

    def fail(self, transfer_id: str, error: TransferError) -> None:
        entry = self._finish(transfer_id)
        if entry is not None:
            entry.error = error
            self._signal(entry)

    def cancel(self, transfer_id: str) -> None:
        """Forget a transfer (its request was aborted): a later push of it is refused or ignored."""
        self.fail(transfer_id, TransferError(f"transfer {transfer_id!r} was cancelled"))
        with self._lock:
            self._finished.pop(transfer_id, None)

    def close(self, error: TransferError) -> None:
        """Fail every expected transfer with ``error`` and refuse new ones."""
        with self._lock:
            self._closed = error
            ids = list(self._entries)
            self._changed.notify_all()
        for transfer_id in ids:
            self.fail(transfer_id, error)

    def reopen(self) -> None:
        """Accept expected transfers again after ``close`` (the transport re-registered its cache)."""
        with self._lock:
            self._closed = None

    def wait(self, transfer_id: str) -> TransferResult:
        """Block until ``transfer_id`` completes; ``TransferError`` if it failed, timed out or is unknown."""
        entry = self._get(transfer_id)
        if not entry.done.wait(max(entry.deadline - time.perf_counter(), 0.0)):
            self.fail(transfer_id, TransferTimeoutError(f"push of transfer {transfer_id!r} timed out"))
        return self._outcome(entry)

    async def wait_async(self, transfer_id: str) -> TransferResult:
        """``wait`` without a thread: the receiving side resolves a future on the running loop."""
        entry = self._get(transfer_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

        with self._lock:
            entry.callbacks.append(wake)
        if entry.done.is_set():
            wake()
        try:
            await asyncio.wait_for(future, max(entry.deadline - time.perf_counter(), 0.0))
        except TimeoutError:
            self.fail(transfer_id, TransferTimeoutError(f"push of transfer {transfer_id!r} timed out"))
        return self._outcome(entry)

    def _get(self, transfer_id: str) -> _Expected:
        with self._lock:
            entry = self._entries.get(transfer_id) or self._finished.get(transfer_id)
        if entry is None:
            raise TransferError(f"no transfer {transfer_id!r} is expected (already waited for, or unknown)")
        return entry

    def _finish(self, transfer_id: str) -> _Expected | None:
        with self._lock:
            entry = self._entries.pop(transfer_id, None)
            if entry is not None:
                for b in entry.block_ids:
                    self._busy_blocks.pop(b, None)
                self._finished[transfer_id] = entry
            return entry

    def _signal(self, entry: _Expected) -> None:
        entry.done.set()
        with self._lock:
            callbacks, entry.callbacks = entry.callbacks, []
        for callback in callbacks:
            callback()

    def _outcome(self, entry: _Expected) -> TransferResult:
        with self._lock:
            self._finished.pop(entry.transfer_id, None)
        if entry.error is not None:
            raise entry.error
        assert entry.result is not None
        return entry.result
