"""What a transfer returns, and how it fails: every failure a caller answers by recomputing is a
``TransferError``; bad arguments (a bug in the caller) are ``ValueError``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class TransferError(RuntimeError):
    """A transfer failed: the peer is dead or unreachable, or broke the protocol. The caller recomputes."""

    reason: ClassVar[str] = "peer"


class TransferTimeoutError(TransferError):
    """A transfer did not finish within its ``timeout_s``."""

    reason: ClassVar[str] = "timeout"


class LayoutMismatchError(TransferError):
    """The peer's KV layout (shape, dtype, block size, model) or transport differs from ours."""

    reason: ClassVar[str] = "layout"


class TransportClosedError(TransferError):
    """Our own transport was closed (shutdown) before or while the transfer ran."""

    reason: ClassVar[str] = "closed"


@dataclass(frozen=True)
class TransferResult:
    """What one successful transfer moved and how long it took (wall time, request to completion)."""

    num_blocks: int
    num_bytes: int
    duration_s: float
    num_descriptors: int  # contiguous runs actually issued (NIXL: as counted by the backend when known)

    @property
    def gib_per_s(self) -> float:
        return self.num_bytes / self.duration_s / 2**30 if self.duration_s > 0 else 0.0

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0
