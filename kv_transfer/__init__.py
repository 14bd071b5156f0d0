"""Moving paged KV blocks between worker processes: NIXL (UCX), plain TCP, in-process loopback.

transport = make_transport("auto")          # nixl if importable, else tcp
transport.register(kv)                      # the engine's whole KV tensor, once
publish(transport.metadata())               # bytes, e.g. in the worker's etcd registration
result = transport.pull(peer_metadata, remote_block_ids, local_block_ids, timeout_s=5.0)
"""

from kv_transfer.base import (
    DEFAULT_TIMEOUT_S,
    KVTransport,
    LayoutMismatchError,
    PeerMetadata,
    TransferError,
    TransferResult,
    TransferTimeoutError,
)
from kv_transfer.factory import TRANSPORT_NAMES, make_transport, nixl_available
from kv_transfer.layout import BlockRun, KVLayout, merge_runs

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TRANSPORT_NAMES",
    "BlockRun",
    "KVLayout",
    "KVTransport",
    "LayoutMismatchError",
    "PeerMetadata",
    "TransferError",
    "TransferResult",
    "TransferTimeoutError",
    "make_transport",
    "merge_runs",
    "nixl_available",
]
