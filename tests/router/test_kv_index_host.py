"""The router's view of workers' host tiers: the KV index keeps device and host blocks apart, fed by
events that carry the medium (and by snapshots that list both); an overlap counts host blocks as
held and says how many of them are host-only; the KV-aware cost counts such a block as a fraction
(``HOST_BLOCK_WEIGHT``) of a block to compute; the wire keeps the medium."""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager, HostBlock
from protocol.hashing import hash_blocks, prompt_hashes
from protocol.kv_events import BlockRemoved, BlockStored, Medium
from router import policy
from router.kv_events import EventCursor
from router.kv_index import KVIndex, Overlap
from runtime.convert import event_from_pb, event_to_pb
from runtime.pb import tandem_worker_pb2 as pb

BS = 4
HOST = Medium.HOST


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_overlap_counts_host_blocks_as_held_and_says_how_many() -> None:
    hx = hash_blocks(tokens(0, 6 * BS), BS)
    index = KVIndex(BS)
    for h in hx:  # a: all six on the device
        index.store("a", h)
    for h in hx[:2]:  # b: two on the device, then four in its host tier
        index.store("b", h)
    for h in hx[2:]:
        index.store("b", h, HOST)
    for h in hx[:3]:  # c: the first three on both media, the fourth on the host, then nothing
        index.store("c", h)
        index.store("c", h, HOST)
    index.store("c", hx[3], HOST)
    index.store("d", hx[1], HOST)  # d: not the first block
    found = index.overlaps(hx)
    assert found == {"a": 6, "b": 6, "c": 4}
    assert [found[w].num_host for w in "abc"] == [0, 4, 1]
    assert index.holds("b", hx[5]) and not index.holds("a", hash_blocks(tokens(1, BS), BS)[0])
    assert index.blocks_of("b") == set(hx[:2]) and index.blocks_of("b", HOST) == set(hx[2:])
    assert index.num_blocks == 6 + 6 + 7 + 1

    index.remove("b", hx[3], HOST)  # a hole in b's host tier
    index.remove("c", hx[0])  # c keeps block 0 in its host tier
    found = index.overlaps(hx)
    assert (found["b"], found["b"].num_host) == (3, 1) and (found["c"], found["c"].num_host) == (4, 2)
    index.remove("a", hx[0], HOST)  # not held there: nothing happens
    assert index.overlaps(hx)["a"] == 6
    index.clear("c")
    assert "c" not in index.overlaps(hx) and index.blocks_of("c", HOST) == frozenset()


def test_events_and_snapshots_move_blocks_between_media() -> None:
    index = KVIndex(BS)
    cursor = EventCursor(index, "w")
    cursor.load_snapshot([1, 2], next_event_id=0, host_hashes=[2, 3])
    assert index.blocks_of("w") == {1, 2} and index.blocks_of("w", HOST) == {2, 3}
    # Block 1 is offloaded (stored on the host, then removed from the device); 3 is loaded back.
    assert cursor.apply([BlockStored(0, 1, 0, (), HOST), BlockRemoved(1, 1), BlockStored(2, 3, 2, ()),
                         BlockRemoved(3, 2, HOST)])
    assert index.blocks_of("w") == {2, 3} and index.blocks_of("w", HOST) == {1, 3}
    cursor.load_snapshot([], next_event_id=9, host_hashes=[5])
    assert index.blocks_of("w") == frozenset() and index.blocks_of("w", HOST) == {5}


def test_the_index_follows_a_block_manager_with_a_host_tier() -> None:
    """Fed with a block manager's events, the index predicts the blocks ``match_prefix`` finds on
    either medium, and which of them are host-only; it holds what the snapshots hold."""
    bm = BlockManager(num_blocks=12, block_size=BS, num_host_blocks=10)  # both tiers evict
    index = KVIndex(BS)
    cursor = EventCursor(index, "w")
    cursor.load_snapshot([], 0)
    rng = random.Random(7)
    prefixes = [tokens(100 + i, rng.randrange(1, 5) * BS) for i in range(6)]
    num_host_hits = 0
    for i in range(80):
        prompt = rng.choice(prefixes) + tokens(200 + i, rng.randrange(1, 3 * BS))
        match = bm.match_prefix(prompt)
        found = index.overlaps(prompt_hashes(prompt, BS)).get("w", Overlap(0))
        host = sum(isinstance(b, HostBlock) for b in match)
        assert (found, found.num_host) == (len(match), host)
        num_host_hits += host
        assert bm.allocate(f"r{i}", len(prompt), match) is not None
        bm.commit(f"r{i}", prompt, len(prompt))
        bm.free(f"r{i}")
        assert cursor.apply(bm.take_events())
        assert index.blocks_of("w") == {h for h, _ in bm.snapshot()[0]}
        assert index.blocks_of("w", HOST) == {h for h, _ in bm.host_snapshot()}
    assert num_host_hits > 10 and bm.host_stats.num_evicted > 0


def test_the_cost_counts_a_host_block_as_a_fraction_of_a_new_one() -> None:
    loads = [policy.WorkerLoad("device"), policy.WorkerLoad("host"), policy.WorkerLoad("none")]
    overlaps = {"device": Overlap(8), "host": Overlap(8, 5)}
    costs = {c.worker_id: c for c in policy.kv_costs(10 * BS, overlaps, loads, BS)}
    scale, w = policy.PREFILL_LOAD_SCALE, policy.HOST_BLOCK_WEIGHT
    assert costs["device"].cost == scale * 2
    assert costs["host"].cost == pytest.approx(scale * (2 + w * 5)) and costs["host"].host_blocks == 5
    assert costs["none"].cost == scale * 10
    assert policy.choose("kv", 10 * BS, overlaps, loads, BS).worker_id == "device"
    # The device holder busier by more than the host copies' worth: the host holder wins.
    busy = [policy.WorkerLoad("device", num_active_blocks=int(scale * w * 5) + 1), *loads[1:]]
    decision = policy.choose("kv", 10 * BS, overlaps, busy, BS)
    assert decision.worker_id == "host" and decision.overlap_blocks.num_host == 5
    # Where the worker does not prefill (decode tier, the prompt goes to the prefill tier), no saving.
    far = {c.worker_id: c for c in policy.kv_costs(10 * BS, overlaps, loads, BS, max_local_prefill_tokens=0)}
    assert far["host"].cost == far["none"].cost == scale * 10 and far["host"].host_blocks == 0


def test_the_medium_crosses_the_wire() -> None:
    for ev in (BlockStored(4, 7, 3, (1, 2), HOST), BlockStored(5, 8, 7, (3,)), BlockRemoved(6, 7, HOST),
               BlockRemoved(7, 8)):
        assert event_from_pb(event_to_pb(ev)) == ev
    # A worker older than the medium sends none: the device.
    old = pb.KVEvent(event_id=1, block_removed=pb.BlockRemoved(block_hash=9))
    assert event_from_pb(old) == BlockRemoved(1, 9, Medium.DEVICE)
    # A medium this router does not know (a newer worker's): held, but not as a device hit.
    newer = pb.KVEvent(event_id=2, block_stored=pb.BlockStored(block_hash=9, medium=7))
    assert event_from_pb(newer).medium is HOST
