"""KV events: every change to the set of blocks in a worker's prefix cache, with an id that
increases by one per event. The block manager emits them; the router's KV index applies them
(DESIGN.md, "Planes": the event plane)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    event_id: int
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlockRemoved:
    event_id: int
    block_hash: int


@dataclass(frozen=True)
class AllBlocksCleared:
    event_id: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
