"""The block manager's host tier alone (pure Python): which device block is offloaded to which host
slot on eviction, which slot is loaded back into which device block on a prefix hit, in which
order, the host tier's own LRU, and the KV events with their medium. Every number is worked out
by hand in the comments."""

from __future__ import annotations

import copy

from engine.block_manager import BlockManager, HostBlock, HostCopy
from protocol.hashing import hash_blocks
from protocol.kv_events import AllBlocksCleared, BlockStored, Medium

BS = 4
HOST = Medium.HOST


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def run_request(bm: BlockManager, rid: str, token_ids: list[int]) -> list[int]:
    cached = bm.match_prefix(token_ids)
    assert bm.allocate(rid, len(token_ids), cached) is not None
    bm.commit(rid, token_ids, len(token_ids))
    return bm.block_table(rid)


def kinds(events: list) -> list[tuple[str, int, Medium | None]]:
    return [(type(e).__name__, getattr(e, "block_hash", 0), getattr(e, "medium", None)) for e in events]


def test_offload_on_eviction_then_load_on_a_hit_in_order() -> None:
    bm = BlockManager(4, BS, num_host_blocks=3)
    ha1, ha2 = hash_blocks(tokens(0, 8), BS)
    hb1, hb2, hb3, hb4 = hash_blocks(tokens(100, 16), BS)
    assert run_request(bm, "a", tokens(0, 9)) == [0, 1, 2]  # blocks 0, 1 cached (ha1, ha2); 2 partial
    bm.free("a")  # evictable, oldest first: 1, 0 (the tail before the head); free: 2, 3
    bm.take_events()
    # b needs 4 blocks: 2 and 3 free, then 1 (ha2) and 0 (ha1) evicted, to host slots 0 and 1.
    assert run_request(bm, "b", tokens(100, 16)) == [2, 3, 1, 0]
    assert bm.take_host_copies() == [HostCopy(True, 1, 0), HostCopy(True, 0, 1)]
    assert kinds(bm.take_events()) == [
        ("BlockStored", ha2, HOST), ("BlockRemoved", ha2, Medium.DEVICE),
        ("BlockStored", ha1, HOST), ("BlockRemoved", ha1, Medium.DEVICE),
        *[("BlockStored", h, Medium.DEVICE) for h in (hb1, hb2, hb3, hb4)]]
    assert bm.host_stats.num_offloaded == 2 and bm.num_host_cached_blocks == 2
    assert sorted(bm.host_snapshot()) == sorted([(ha1, 0), (ha2, ha1)])
    bm.free("b")  # evictable, oldest first: 0 (hb4), 1 (hb3), 3 (hb2), 2 (hb1)

    # a's prefix is only in the host tier now: the match goes on there.
    match = bm.match_prefix(tokens(0, 9))
    assert match == [HostBlock(ha1), HostBlock(ha2)]
    assert bm.allocate("c", 9, match) == [3]  # the loads are not new blocks
    assert bm.block_table("c") == [0, 1, 3]
    # ha1 takes block 0, evicting hb4 to the last free slot (2), then is loaded from slot 1; ha2 takes
    # block 1, evicting hb3: the host tier is full, its oldest not being loaded now is hb4 (ha2, older,
    # is kept for its load), so hb3 reuses slot 2; ha2 is loaded from slot 0. The new block evicts hb2
    # (block 3) over the host tier's oldest, ha1 (slot 1), whose load is queued before: order matters.
    assert bm.take_host_copies() == [HostCopy(True, 0, 2), HostCopy(False, 0, 1), HostCopy(True, 1, 2),
                                     HostCopy(False, 1, 0), HostCopy(True, 3, 1)]
    assert kinds(bm.take_events()) == [
        ("BlockStored", hb4, HOST), ("BlockRemoved", hb4, Medium.DEVICE), ("BlockStored", ha1, Medium.DEVICE),
        ("BlockRemoved", hb4, HOST), ("BlockStored", hb3, HOST), ("BlockRemoved", hb3, Medium.DEVICE),
        ("BlockStored", ha2, Medium.DEVICE),
        ("BlockRemoved", ha1, HOST), ("BlockStored", hb2, HOST), ("BlockRemoved", hb2, Medium.DEVICE)]
    assert bm.host_stats.num_loaded == 2 and bm.host_stats.num_evicted == 2 and bm.host_stats.num_offloaded == 5
    # The loaded blocks are findable on the device again, with their parents (for snapshots).
    assert bm.match_prefix(tokens(0, 9)) == [0, 1]
    assert sorted(bm.snapshot()[0]) == sorted([(ha1, 0), (ha2, ha1), (hb1, 0)])
    assert sorted(h for h, _ in bm.host_snapshot()) == sorted([hb3, ha2, hb2])


def test_a_match_mixes_device_and_host_blocks_and_evicting_a_loaded_block_copies_nothing() -> None:
    bm = BlockManager(3, BS, num_host_blocks=2)
    h1, h2 = hash_blocks(tokens(0, 8), BS)
    (hb1,) = hash_blocks(tokens(50, 4), BS)
    run_request(bm, "a", tokens(0, 9))  # blocks 0 (h1), 1 (h2), 2 partial
    bm.free("a")  # evictable: 1 (h2), 0 (h1); free: 2
    assert run_request(bm, "b", tokens(50, 5)) == [2, 1]  # 2 (hb1), then 1 evicted: h2 to slot 0
    assert bm.take_host_copies() == [HostCopy(True, 1, 0)]
    bm.free("b")  # free: 1 (uncached); evictable: 0 (h1), 2 (hb1)
    match = bm.match_prefix(tokens(0, 9))
    assert match == [0, HostBlock(h2)]  # h1 still on the device, h2 only in the host tier
    assert bm.allocate("c", 9, match) == [2]
    # h1 is taken in place; h2 gets the free block 1 and is loaded from slot 0; the new block
    # evicts 2 (hb1) to slot 1.
    assert bm.block_table("c") == [0, 1, 2]
    assert bm.take_host_copies() == [HostCopy(False, 1, 0), HostCopy(True, 2, 1)]
    bm.free("c")  # free: 2 (never committed by c); evictable: 1 (h2), 0 (h1)
    bm.take_events()
    # d takes 2, then evicts h2, whose host copy is still there: no copy, only the device's event;
    # then h1, to the host tier's oldest slot (hb1's, 1: h2 was used since).
    assert bm.allocate("d", 12) == [2, 1, 0]
    assert bm.take_host_copies() == [HostCopy(True, 0, 1)]
    assert kinds(bm.take_events()) == [
        ("BlockRemoved", h2, Medium.DEVICE), ("BlockRemoved", hb1, HOST), ("BlockStored", h1, HOST),
        ("BlockRemoved", h1, Medium.DEVICE)]


def test_no_host_slot_but_the_ones_being_loaded_drops_the_evicted_block() -> None:
    bm = BlockManager(3, BS, num_host_blocks=1)
    h1, _ = hash_blocks(tokens(0, 8), BS)
    hx1, hx2 = hash_blocks(tokens(300, 8), BS)
    run_request(bm, "a", tokens(0, 8))  # blocks 0 (h1), 1 (h2)
    bm.free("a")  # evictable: 1 (h2), 0 (h1); free: 2
    # x: block 2, then h2 to slot 0, then h1 over it (the host tier's LRU drops h2).
    assert run_request(bm, "x", tokens(300, 9)) == [2, 1, 0]
    assert bm.take_host_copies() == [HostCopy(True, 1, 0), HostCopy(True, 0, 0)]
    assert bm.host_stats.num_evicted == 1 and [h for h, _ in bm.host_snapshot()] == [h1]
    bm.free("x")  # free: 0; evictable: 1 (hx2), 2 (hx1)
    assert bm.allocate("z", 4) == [0]  # no free block left
    bm.take_events()
    match = bm.match_prefix(tokens(0, 5))
    assert match == [HostBlock(h1)]
    # h1's block evicts hx2, and the host tier's one slot is h1's, kept for its load: hx2 is dropped.
    # The new block then evicts hx1 over h1 (loaded first).
    assert bm.allocate("y", 5, match) == [2]
    assert bm.block_table("y") == [1, 2] and bm.host_stats.num_dropped == 1
    assert bm.take_host_copies() == [HostCopy(False, 1, 0), HostCopy(True, 2, 0)]
    assert kinds(bm.take_events()) == [
        ("BlockRemoved", hx2, Medium.DEVICE), ("BlockStored", h1, Medium.DEVICE), ("BlockRemoved", h1, HOST),
        ("BlockStored", hx1, HOST), ("BlockRemoved", hx1, Medium.DEVICE)]


def test_failed_allocation_changes_nothing_and_reset_clears_the_host_tier() -> None:
    bm = BlockManager(3, BS, num_host_blocks=4)
    run_request(bm, "a", tokens(0, 9))
    bm.free("a")
    run_request(bm, "b", tokens(50, 12))  # evicts a's two cached blocks to the host tier
    match = bm.match_prefix(tokens(0, 9))
    assert len(match) == 2 and all(isinstance(b, HostBlock) for b in match)
    before = copy.deepcopy(vars(bm))
    assert bm.allocate("c", 9, match) is None  # b holds every block
    assert vars(bm) == before
    bm.free("b")
    bm.reset_prefix_cache()
    assert bm.host_snapshot() == [] and bm.match_prefix(tokens(0, 9)) == []
    assert isinstance(bm.take_events()[-1], AllBlocksCleared)


def test_tier_off_keeps_the_old_behaviour() -> None:
    bm = BlockManager(3, BS)
    run_request(bm, "a", tokens(0, 9))
    bm.free("a")
    run_request(bm, "b", tokens(50, 12))
    assert bm.take_host_copies() == [] and bm.host_snapshot() == []
    assert all(e.medium is Medium.DEVICE for e in bm.take_events() if not isinstance(e, AllBlocksCleared))
    assert bm.match_prefix(tokens(0, 9)) == []
    assert not [e for e in bm.take_events() if isinstance(e, BlockStored) and e.medium is HOST]
