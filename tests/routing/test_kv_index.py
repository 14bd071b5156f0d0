"""The router's KV index: exact overlap counts from workers' events, snapshots, workers
leaving, and the TTL index of routing decisions."""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from protocol.hashing import hash_blocks, prompt_hashes
from router.kv_events import EventCursor
from router.kv_index import ApproxKVIndex, KVIndex, merge_overlaps

BS = 4


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def cache(bm: BlockManager, rid: str, prompt: list[int]) -> None:
    """Run a prompt through a block manager as the engine does: allocate, compute, free."""
    cached = bm.match_prefix(prompt)
    assert bm.allocate(rid, len(prompt), cached) is not None
    bm.commit(rid, prompt, len(prompt))
    bm.free(rid)


def test_overlaps_for_prompts_sharing_none_some_or_all_blocks() -> None:
    x = tokens(0, 6 * BS)
    hx = hash_blocks(x, BS)
    index = KVIndex(BS)
    for h in hx:  # a: all six blocks
        index.store("a", h)
    for h in hx[:3]:  # b: the first three
        index.store("b", h)
    for h in (hx[0], hx[1], hx[3], hx[4]):  # c: a hole at block 2
        index.store("c", h)
    for h in hash_blocks(tokens(1, 6 * BS), BS):  # d: another prompt
        index.store("d", h)

    assert index.overlaps(hx) == {"a": 6, "b": 3, "c": 2}
    some = x[:2 * BS] + tokens(2, 4 * BS)  # shares two blocks with x
    assert index.overlaps(hash_blocks(some, BS)) == {"a": 2, "b": 2, "c": 2}
    assert index.overlaps(hash_blocks(tokens(3, 6 * BS), BS)) == {}
    assert index.overlaps(hx[:1]) == {"a": 1, "b": 1, "c": 1}
    assert index.overlaps([]) == {}
    assert index.num_blocks == 6 + 3 + 4 + 6


def test_same_overlap_as_the_worker_reuses() -> None:
    """Fed with a block manager's events, the index predicts exactly the blocks its
    ``match_prefix`` takes, for prompts of every length (full last block included)."""
    bm = BlockManager(num_blocks=24, block_size=BS)  # small: evictions happen
    index = KVIndex(BS)
    cursor = EventCursor(index, "w")
    cursor.load_snapshot([], 0)
    rng = random.Random(7)
    prefixes = [tokens(100 + i, rng.randrange(1, 5) * BS) for i in range(4)]
    for i in range(60):
        prompt = rng.choice(prefixes) + tokens(200 + i, rng.randrange(0, 3 * BS))
        if not prompt:
            continue
        assert index.overlaps(prompt_hashes(prompt, BS)).get("w", 0) == len(bm.match_prefix(prompt))
        cache(bm, f"r{i}", prompt)
        assert cursor.apply(bm.take_events())
        assert index.blocks_of("w") == set(bm._cached)


def test_prompt_hashes_leave_one_token_to_compute() -> None:
    p = tokens(0, 3 * BS)
    assert prompt_hashes(p, BS) == hash_blocks(p, BS)[:2]
    assert prompt_hashes([*p, 1], BS) == hash_blocks(p, BS)
    assert prompt_hashes([], BS) == []


def test_worker_leaving_disappears_and_its_slot_is_clean() -> None:
    hx = hash_blocks(tokens(0, 4 * BS), BS)
    index = KVIndex(BS)
    for w in ("a", "b"):
        for h in hx:
            index.store(w, h)
    index.remove_worker("a")
    assert index.overlaps(hx) == {"b": 4}
    assert "a" not in index.workers
    index.add_worker("c")  # takes a's slot: must not inherit its blocks
    assert index.overlaps(hx) == {"b": 4}
    index.remove_worker("b")
    assert index.overlaps(hx) == {}
    assert index.num_blocks == 0
    assert not index._holders


def test_snapshot_replaces_and_clear_empties() -> None:
    hx = hash_blocks(tokens(0, 4 * BS), BS)
    index = KVIndex(BS)
    for h in hx:
        index.store("a", h)
    index.load_snapshot("a", [*hx[:2], 12345])
    assert index.blocks_of("a") == {*hx[:2], 12345}
    assert index.overlaps(hx) == {"a": 2}
    index.clear("a")
    assert index.overlaps(hx) == {}
    assert "a" in index.workers


def test_approx_index_forgets_after_ttl_unless_refreshed() -> None:
    now = [100.0]
    index = ApproxKVIndex(BS, ttl_s=10.0, clock=lambda: now[0])
    hx = hash_blocks(tokens(0, 4 * BS), BS)
    index.record("a", hx)
    now[0] += 5
    index.record("b", hx[:2])
    assert index.overlaps(hx) == {"a": 4, "b": 2}
    now[0] += 4
    index.record("a", hx[:1])  # refreshes a's first block only
    now[0] += 2  # a's first record has expired; b's has not
    assert index.overlaps(hx) == {"a": 1, "b": 2}
    now[0] += 20
    assert index.overlaps(hx) == {}
    assert index.num_blocks == 0
    index.record("c", hx)
    index.remove_worker("c")
    assert index.overlaps(hx) == {}
    with pytest.raises(ValueError):
        ApproxKVIndex(BS, ttl_s=0)


def test_merge_takes_the_longest() -> None:
    assert merge_overlaps({"a": 2, "b": 5}, {"a": 4}, {}) == {"a": 4, "b": 5}


def test_tier_index_tells_blocks_on_their_way_from_blocks_held() -> None:
    from router.tier_index import TierIndex  # the tier's indexes together: exact, landed, in flight

    tier = TierIndex("decode", BS, kv_events=True, ttl_s=120.0)
    hx = hash_blocks(tokens(0, 6 * BS), BS)
    tier.exact.store("d1", hx[0])  # d1 holds the first block
    first = tier.expect("d1", hx[:4], blocks_left=3, prefill_worker="p1")  # handed off from p1
    again = tier.expect("d1", hx[:5], blocks_left=4)  # d1 computes this one itself
    assert tier.overlaps(hx) == {"d1": 5}  # routing counts them as held: the same prefix follows them
    assert tier.overlaps(hx, in_flight=False) == {"d1": 1}
    assert tier.resident_overlap("d1", hx) == 1
    assert tier.handoff_on("d1", hx) == (first, 4) and tier.handoff_on("d2", hx) == (None, 0)
    tier.land(again, ok=False)  # nothing of it arrives; the first still brings the shared blocks
    assert tier.overlaps(hx) == {"d1": 4} and again.arrived.is_set() and not first.arrived.is_set()
    tier.land(first, ok=True)
    tier.land(first, ok=False)  # once: later calls do nothing
    assert first.arrived.is_set() and first.blocks_left == 0
    assert tier.resident_overlap("d1", hx) == 4 and tier.handoff_on("d1", hx) == (None, 0)  # landed: held
    assert tier.in_flight.num_blocks == 0
    gone = tier.expect("d2", hx, blocks_left=6)
    tier.sync({})  # d2 left discovery: what was on its way there will not arrive
    assert gone.arrived.is_set() and tier.overlaps(hx).get("d2") is None
