"""Build a KV transport by name."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from kv_transfer.base import KVTransport

TRANSPORT_NAMES = ("nixl", "tcp", "loopback")


@functools.cache
def nixl_available() -> bool:
    """Whether the ``nixl`` package and one of its native backends import in this environment."""
    try:
        importlib.import_module("nixl._api")
    except ImportError:
        return False
    return True


def make_transport(name: str, **opts: Any) -> KVTransport:
    """A new, unregistered transport: "nixl", "tcp", "loopback", or "auto" (nixl if importable, else tcp).

    ``opts`` go to the implementation's constructor (e.g. tcp: host, port; all: model).
    """
    if name == "auto":
        name = "nixl" if nixl_available() else "tcp"
    if name == "nixl":
        from kv_transfer.nixl_transport import NixlTransport

        return NixlTransport(**opts)
    if name == "tcp":
        from kv_transfer.tcp import TcpTransport

        return TcpTransport(**opts)
    if name == "loopback":
        from kv_transfer.loopback import LoopbackTransport

        return LoopbackTransport(**opts)
    raise ValueError(f"unknown KV transport {name!r}; expected one of {(*TRANSPORT_NAMES, 'auto')}")
