"""KV events: every change to the set of blocks in a worker's prefix cache, with an id that
increases by one per event. The block manager emits them; the router's KV index applies them
(DESIGN.md, "Planes": the event plane).

A block lives on a ``Medium``: the device's KV cache, or the worker's host tier (``engine.kv_host_tier``:
blocks the device evicted, kept in host memory and copied back on a hit). The same hash may be held on
both at once (a block loaded back keeps its host copy). An event without a medium (an older worker,
an older router) means the device."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Medium(enum.IntEnum):
    """Where a worker holds a cached block (the proto's ``KVMedium``, same values)."""

    DEVICE = 0  # the KV cache the model reads: a hit costs nothing
    HOST = 1  # the host tier: a hit costs a copy back to the device, far less than a recompute


@dataclass(frozen=True)
class BlockStored:
    event_id: int
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]
    medium: Medium = Medium.DEVICE


@dataclass(frozen=True)
class BlockRemoved:
    event_id: int
    block_hash: int
    medium: Medium = Medium.DEVICE


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every block of the worker is gone, on every medium."""

    event_id: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
