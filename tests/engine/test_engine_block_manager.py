"""The block manager alone (pure Python): exact block ids, reference counts, LRU eviction
order, all-or-nothing allocation, fork, and the KV event sequence."""

from __future__ import annotations

import copy

import pytest

from engine.block_manager import BlockManager
from protocol.hashing import NONE_HASH, hash_block, hash_blocks
from protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def state(bm: BlockManager) -> dict:
    """Everything observable about a block manager, for 'nothing changed' checks."""
    return copy.deepcopy({k: v for k, v in vars(bm).items()})


def run_request(bm: BlockManager, rid: str, token_ids: list[int]) -> list[int]:
    """Allocate, compute (commit) and return a request's table (still held)."""
    cached = bm.match_prefix(token_ids)
    assert bm.allocate(rid, len(token_ids), cached) is not None
    bm.commit(rid, token_ids, len(token_ids))
    return bm.block_table(rid)


def test_import_has_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, engine.block_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hashes_are_chained_and_stable() -> None:
    t = tokens(0, 10)
    h0 = hash_block(NONE_HASH, t[0:4])
    h1 = hash_block(h0, t[4:8])
    assert hash_blocks(t, BS) == [h0, h1]  # the partial block has no hash
    assert hash_block(NONE_HASH, t[4:8]) != h1  # the same tokens under another parent differ
    assert hash_blocks(t, BS, parent_hash=h0)[0] == hash_block(h0, t[0:4])
    assert 0 <= h0 < 1 << 64
    # The router hashes prompts too: the values are pinned (blake2b-64 over int64 LE tokens).
    assert hash_block(NONE_HASH, (1, 2, 3, 4)) == 2821693476514209883
    assert hash_blocks(list(range(1, 10)), BS) == [2821693476514209883, 4335464902204770104]


def test_allocate_exact_ids_and_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate("a", 10) == [0, 1, 2]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", 4) == [3]
    # Growing a table allocates only what the new length needs.
    assert bm.allocate("a", 12) == []
    assert bm.allocate("a", 13) == [4]
    assert bm.block_table("a") == [0, 1, 2, 4]
    assert bm.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (3, 5)
    assert bm.usage == pytest.approx(5 / 8)
    bm.free("a")
    assert bm.ref_counts == [0, 0, 0, 1, 0, 0, 0, 0]
    assert not bm.has_request("a") and bm.block_table("a") == []
    bm.free("a")  # freeing twice (an unknown id) is a no-op
    bm.free("b")
    assert bm.num_free_blocks == 8
    # The frontier: blocks below it were handed out once. Recycled blocks (freed to the front
    # of the free list, the last freed table first, each table from its head) go before the
    # never-used ones (5-7), whose pages a CPU cache has not mapped yet.
    assert bm.frontier == 5
    assert bm.allocate("c", 8) == [3, 0] and bm.frontier == 5
    assert bm.allocate("d", 16) == [1, 2, 4, 5] and bm.frontier == 6


def test_allocate_out_of_blocks_returns_none_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    run_request(bm, "a", tokens(0, 9))  # blocks 0, 1 (cached), 2
    bm.take_events()
    assert bm.allocate("b", 4) == [3]
    before = state(bm)
    assert bm.allocate("c", 4) is None
    assert bm.allocate("b", 9) is None  # growing b needs 2 more
    assert state(bm) == before
    bm.free("a")  # blocks 0 and 1 become evictable, block 2 free
    # a's cached prefix (blocks 0, 1) plus 2 new blocks: only 1 is free once the prefix is taken.
    cached = bm.match_prefix([*tokens(0, 9), 99, 99, 99, 99, 99, 99, 99])
    assert cached == [0, 1]
    before = state(bm)
    assert bm.allocate("c", 16, cached) is None
    assert state(bm) == before
    assert bm.take_events() == []  # nothing was evicted
    assert bm.allocate("c", 12, cached) == [2]
    assert bm.block_table("c") == [0, 1, 2]
    assert bm.ref_counts == [1, 1, 1, 1]


def test_match_prefix_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_request(bm, "a", tokens(0, 12))  # 3 full blocks, all cached
    assert bm.num_cached_blocks == 3
    assert bm.match_prefix(tokens(0, 12)) == [0, 1]  # the last block is recomputed
    assert bm.match_prefix(tokens(0, 13)) == [0, 1, 2]
    assert bm.match_prefix(tokens(0, 6)) == [0]
    assert bm.match_prefix(tokens(0, 4) + [77] * 8) == [0]
    assert bm.match_prefix([77, *tokens(1, 11)]) == []
    # Shared prefix blocks are referenced, not copied.
    assert bm.allocate("b", 13, [0, 1, 2]) == [3]
    assert bm.ref_counts[:4] == [2, 2, 2, 1]
    bm.free("a")
    assert bm.ref_counts[:4] == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        bm.allocate("b", 20, [0])  # cached blocks only on the first allocation


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_request(bm, "a", tokens(0, 12))
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(tokens(0, 13)) == []
    bm.free("a")
    assert bm.take_events() == []
    assert bm.allocate("b", 32) == [0, 1, 2, 3, 4, 5, 6, 7]  # free order: freed (head first), then never used


def test_eviction_order_lru_tail_first_and_free_blocks_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = tokens(100, 12), tokens(200, 8)
    assert run_request(bm, "a", a) == [0, 1, 2]
    assert run_request(bm, "b", b) == [3, 4]
    bm.free("a")
    bm.free("b")
    assert bm.num_cached_blocks == 5 and bm.num_free_blocks == 8
    bm.take_events()
    # Never-cached blocks (5, 6, 7) go first; nothing is evicted for them.
    assert bm.allocate("x", 12) == [5, 6, 7]
    assert bm.take_events() == []
    assert bm.num_cached_blocks == 5
    # Then cached blocks: least recently freed first, and within a request its tail first.
    hash_a, hash_b = hash_blocks(a, BS), hash_blocks(b, BS)
    assert bm.allocate("x", 16) == [2]
    assert bm.allocate("x", 24) == [1, 0]
    assert bm.allocate("x", 28) == [4]
    events = bm.take_events()
    assert [type(e) for e in events] == [BlockRemoved] * 4
    assert [e.block_hash for e in events] == [hash_a[2], hash_a[1], hash_a[0], hash_b[1]]
    assert bm.match_prefix([*b, 0]) == [3]  # b's head is still cached
    assert bm.match_prefix([*a, 0]) == []


def test_reused_cached_block_moves_to_the_back_of_the_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    run_request(bm, "a", tokens(0, 4))  # block 0
    run_request(bm, "b", tokens(50, 4))  # block 1
    bm.free("a")
    bm.free("b")  # LRU: 0, 1
    run_request(bm, "c", [*tokens(0, 4), 9])  # hits block 0 and takes block 2
    assert bm.block_table("c") == [0, 2]
    bm.free("c")  # block 2 is not full: free (before never-used 3); block 0 re-enters the LRU behind 1
    assert bm.allocate("x", 8) == [2, 3]
    assert bm.allocate("x", 12) == [1]  # b's block is older than a's reused one
    assert bm.allocate("x", 16) == [0]
    assert bm.allocate("x", 20) is None


def test_identical_block_computed_twice_stays_private() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    t = tokens(0, 8)
    assert bm.allocate("a", 8) == [0, 1]
    assert bm.allocate("b", 8) == [2, 3]  # same tokens, admitted before a's were committed
    bm.commit("a", t, 8)
    bm.commit("b", t, 8)
    events = bm.take_events()
    assert len(events) == 2  # b's copies are not announced
    assert bm.block_hashes[2:4] == [None, None]
    bm.free("b")
    assert bm.allocate("c", 8) == [2, 3]  # b's private blocks rejoin the plain free list (at its front)
    assert bm.num_cached_blocks == 2


def test_commit_only_full_computed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    t = tokens(0, 11)
    bm.allocate("a", 11)
    bm.commit("a", t, 3)
    assert bm.num_cached_blocks == 0
    bm.commit("a", t, 5)  # chunked prefill: first block complete
    assert bm.block_hashes[:3] == [hash_blocks(t, BS)[0], None, None]
    bm.commit("a", t, 11)
    assert bm.block_hashes[:3] == [*hash_blocks(t, BS), None]
    # decode fills the last block
    t.append(11)
    bm.allocate("a", 12)
    bm.commit("a", t, 12)
    assert bm.block_hashes[:3] == hash_blocks(t, BS)


def test_event_sequence() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = tokens(0, 9)
    run_request(bm, "a", a)  # blocks 0, 1 stored
    bm.free("a")
    run_request(bm, "b", tokens(40, 12))  # takes 2 (free), then evicts 1 and 0
    h = hash_blocks(a, BS)
    hb = hash_blocks(tokens(40, 12), BS)
    events = bm.take_events()
    assert events == [
        BlockStored(0, h[0], NONE_HASH, tuple(a[0:4])),
        BlockStored(1, h[1], h[0], tuple(a[4:8])),
        BlockRemoved(2, h[1]),
        BlockRemoved(3, h[0]),
        BlockStored(4, hb[0], NONE_HASH, tuple(range(40, 44))),
        BlockStored(5, hb[1], hb[0], tuple(range(44, 48))),
        BlockStored(6, hb[2], hb[1], tuple(range(48, 52))),
    ]
    assert bm.take_events() == []
    bm.free("b")
    bm.reset_prefix_cache()
    assert bm.take_events() == [AllBlocksCleared(7)]
    assert bm.num_cached_blocks == 0 and bm.match_prefix(tokens(40, 13)) == []
    # Ids keep increasing across take_events and resets.
    run_request(bm, "c", tokens(0, 4))
    (stored,) = bm.take_events()
    assert stored == BlockStored(8, h[0], NONE_HASH, tuple(a[0:4]))


def test_reset_prefix_cache_with_running_request() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    t = tokens(0, 8)
    run_request(bm, "a", t)
    bm.take_events()
    bm.reset_prefix_cache()
    assert bm.take_events() == [AllBlocksCleared(2)]
    assert bm.ref_counts[:2] == [1, 1]  # still owned by a
    # a's blocks are announced again when it commits next.
    t.append(8)
    bm.allocate("a", 9)
    bm.commit("a", t, 9)
    assert [type(e) for e in bm.take_events()] == [BlockStored, BlockStored]
    bm.free("a")
    assert bm.num_free_blocks == 4
    # A reset puts the cleared blocks (0, 1, in id order) at the front of the free list, before
    # a's partial block 2 (freed) and the never-used block 3.
    bm.reset_prefix_cache()
    assert bm.frontier == 3 and bm.allocate("b", 16) == [0, 1, 2, 3]
    bm.free("b")
    run_request(bm, "c", tokens(0, 8))
    run_request(bm, "d", tokens(50, 8))
    bm.free("c")
    bm.free("d")
    bm.reset_prefix_cache()
    assert bm.allocate("e", 16) == [0, 1, 2, 3]


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    t = tokens(0, 10)
    run_request(bm, "p", t)  # [0, 1, 2]
    assert bm.fork("p", "c1", 10) == [(2, 3)]
    assert bm.fork("p", "c2", 10) == [(2, 4)]
    assert bm.block_table("c1") == [0, 1, 3]
    assert bm.block_table("c2") == [0, 1, 4]
    assert bm.ref_counts[:5] == [3, 3, 1, 1, 1]
    # An exact multiple of the block size: nothing to copy.
    assert bm.fork("p", "c3", 8) == []
    assert bm.block_table("c3") == [0, 1]
    assert bm.ref_counts[:2] == [4, 4]
    with pytest.raises(ValueError):
        bm.fork("p", "c1", 10)
    # The child's later blocks are its own and hash under the shared chain.
    t1 = [*t, 77, 78]
    assert bm.allocate("c1", 12) == []
    bm.commit("c1", t1, 12)
    assert bm.block_hashes[3] == hash_blocks(t1, BS)[2]
    for rid in ("p", "c1", "c2", "c3"):
        bm.free(rid)
    assert bm.ref_counts == [0] * 8
    assert bm.num_free_blocks == 8


def test_fork_out_of_blocks_returns_none_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    run_request(bm, "p", tokens(0, 10))
    before = state(bm)
    assert bm.fork("p", "c", 10) is None
    assert state(bm) == before
    assert bm.fork("p", "c", 8) == []  # full blocks only: still possible


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=BS)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)
