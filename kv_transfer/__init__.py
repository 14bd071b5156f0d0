"""Moving paged KV blocks between worker processes: NIXL (UCX), CUDA IPC, NCCL, plain TCP, in-process
loopback, and ``auto``, which picks one per peer from measured bandwidth.

transport = make_transport("auto")          # per peer: the fastest measured transport both sides have
transport.register(kv)                      # the engine's whole KV tensor, once
publish(transport.metadata())               # bytes, e.g. in the worker's etcd registration

# pull: the destination reads the owner's blocks
result = transport.pull(owner_metadata, remote_block_ids, local_block_ids, timeout_s=5.0)

# push: the destination expects, the owner writes, the destination waits
transfer_id = dest.expect(dest_block_ids, timeout_s=5.0)            # destination
owner.push(dest.metadata(), transfer_id, owner_block_ids, dest_block_ids, timeout_s=...)  # owner
result = dest.wait(transfer_id)                                     # destination
"""

from kv_transfer.base import DEFAULT_TIMEOUT_S, KVTransport, Mode, PeerMetadata
from kv_transfer.errors import (
    LayoutMismatchError,
    TransferError,
    TransferResult,
    TransferTimeoutError,
    TransportClosedError,
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
    "Mode",
    "PeerMetadata",
    "TransferError",
    "TransferResult",
    "TransferTimeoutError",
    "TransportClosedError",
    "make_transport",
    "merge_runs",
    "nixl_available",
]
