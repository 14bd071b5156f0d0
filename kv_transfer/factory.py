"""Build a KV transport by name."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from kv_transfer.base import KVTransport

TRANSPORT_NAMES = ("auto", "nixl", "cuda_ipc", "nccl", "tcp", "loopback")


@functools.cache
def nixl_available() -> bool:
    """Whether the ``nixl`` package and one of its native backends import in this environment."""
    try:
        importlib.import_module("nixl._api")
    except ImportError:
        return False
    return True


def make_transport(name: str, **opts: Any) -> KVTransport:
    """A new, unregistered transport by name (see ``TRANSPORT_NAMES``).

    ``auto`` picks per peer by measured bandwidth (``auto.AutoTransport``); ``opts`` go to the
    implementation's constructor (all: model; tcp: host, port; nccl: store; auto: table, store...).
    """
    if name == "auto":
        from kv_transfer.auto import AutoTransport

        return AutoTransport(make_child=make_transport, **opts)
    if name == "nixl":
        from kv_transfer.nixl_transport import NixlTransport

        return NixlTransport(**opts)
    if name == "cuda_ipc":
        from kv_transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(**opts)
    if name == "nccl":
        from kv_transfer.nccl import NcclTransport

        return NcclTransport(**opts)
    if name == "tcp":
        from kv_transfer.tcp import TcpTransport

        return TcpTransport(**opts)
    if name == "loopback":
        from kv_transfer.loopback import LoopbackTransport

        return LoopbackTransport(**opts)
    raise ValueError(f"unknown KV transport {name!r}; expected one of {TRANSPORT_NAMES}")
