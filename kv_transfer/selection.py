"""Which transport (and direction) moves KV fastest between two workers: chosen from a measured table.

No I/O beyond reading a table file, no torch: the ``auto`` transport and the workers ask it, and a
unit test checks the choice from a given table.

The table (``default_table.json``, written by ``bench/kv_transfer.py --write-table``) holds, per
locality, the GB/s each transport measured pushing and pulling a request-sized transfer::

    {"size_mib": 256,
     "localities": {"same_gpu": {"source": "...", "gb_per_s": {"cuda_ipc": {"push": 1900, "pull": 1900}}}}}

Localities: ``same_gpu`` (two processes on one GPU), ``same_node`` (two GPUs of one machine),
``other_node`` (two machines), ``cpu`` (a KV tensor in host memory, one machine).

A locality may also name the (transport, mode) measured fastest end to end, in serving
(``bench/serve.py``: the decode worker's KV handoff time under load), which wins over the isolated
transfer rates whenever that transport is available: ``"serving": {"transport": "nixl", "mode":
"push", "source": "..."}``. On one GPU a CUDA IPC pull is the faster copy in isolation, but NIXL's
push hands a request's KV over 5-17x faster in serving at concurrency 16-64.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

LOCALITIES = ("same_gpu", "same_node", "other_node", "cpu")
MODES = ("push", "pull")
DEFAULT_TABLE = Path(__file__).with_name("default_table.json")

# What can work at all per locality (CUDA IPC needs one machine; NCCL cannot put two ranks on one
# GPU); loopback joins two transports in one process and is never chosen.
USABLE: dict[str, tuple[str, ...]] = {
    "same_gpu": ("cuda_ipc", "nixl", "tcp"),
    "same_node": ("cuda_ipc", "nixl", "nccl", "tcp"),
    "other_node": ("nixl", "nccl", "tcp"),
    "cpu": ("nixl", "nccl", "tcp"),
}
# Without any measurement for a locality: the first usable of these, pushed.
FALLBACK_ORDER = ("cuda_ipc", "nixl", "nccl", "tcp")


@dataclass(frozen=True)
class Choice:
    transport: str
    mode: Literal["push", "pull"]
    gb_per_s: float | None  # the table's figure; None when chosen by FALLBACK_ORDER
    locality: str


def locality(my_host: str, my_device: str, peer_host: str, peer_device: str) -> str:
    """The locality of a pair from their ``host_id``s and ``device_id``s (``cpu`` or ``cuda:<uuid>``)."""
    if my_host != peer_host or not my_host:
        return "other_node"
    if not my_device.startswith("cuda") or not peer_device.startswith("cuda"):
        return "cpu"
    return "same_gpu" if my_device == peer_device else "same_node"


def check_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` if it is well formed; ``ValueError`` naming the first problem otherwise."""
    localities = table.get("localities")
    if not isinstance(localities, dict):
        raise ValueError("transport table: 'localities' must be an object")
    for loc, entry in localities.items():
        if loc not in LOCALITIES:
            raise ValueError(f"transport table: unknown locality {loc!r}; expected one of {LOCALITIES}")
        rates = entry.get("gb_per_s") if isinstance(entry, dict) else None
        if not isinstance(rates, dict):
            raise ValueError(f"transport table: {loc}.gb_per_s must be an object")
        for transport, modes in rates.items():
            if not isinstance(modes, dict) or not set(modes) <= set(MODES):
                raise ValueError(f"transport table: {loc}.gb_per_s.{transport} must map push/pull to GB/s")
            for mode, value in modes.items():
                if not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"transport table: {loc}.gb_per_s.{transport}.{mode} must be a number >= 0")
        serving = entry.get("serving")
        if serving is not None and (not isinstance(serving, dict) or serving.get("mode") not in MODES
                                    or serving.get("transport") not in USABLE[loc]):
            raise ValueError(f"transport table: {loc}.serving must name a usable transport and push/pull")
    return dict(table)


def load_table(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return check_table(json.load(f))


@functools.cache
def default_table() -> dict[str, Any]:
    """The table shipped with the package (measured; see its ``source`` fields)."""
    return load_table(DEFAULT_TABLE)


def choose(table: Mapping[str, Any], loc: str, available: Iterable[str]) -> Choice:
    """The (transport, mode) measured fastest in serving at ``loc`` if available, else the fastest
    measured transfer among ``available`` transports (ties: push); without a measurement, the
    first usable one in ``FALLBACK_ORDER``, pushed. ``ValueError`` when
    none of ``available`` can work at ``loc``."""
    if loc not in LOCALITIES:
        raise ValueError(f"unknown locality {loc!r}; expected one of {LOCALITIES}")
    candidates = [t for t in available if t in USABLE[loc]]
    if not candidates:
        raise ValueError(f"none of the transports {sorted(set(available))} can reach a peer at locality {loc}")
    entry = table.get("localities", {}).get(loc, {})
    rates = entry.get("gb_per_s", {})
    serving = entry.get("serving")
    if serving is not None and serving["transport"] in candidates:
        transport, mode = serving["transport"], serving["mode"]
        return Choice(transport, mode, rates.get(transport, {}).get(mode), loc)
    measured = [
        (float(gbps), mode == "push", transport, mode)
        for transport in candidates
        for mode, gbps in rates.get(transport, {}).items()
    ]
    if measured:
        gbps, _, transport, mode = max(measured)
        return Choice(transport, mode, gbps, loc)
    transport = next((t for t in FALLBACK_ORDER if t in candidates), candidates[0])
    return Choice(transport, "push", None, loc)
