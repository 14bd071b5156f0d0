"""A parked engine keeps its host tier (tiny random Llama, CPU, float32; ``LLMEngine.park``): the
device's prefix cache goes (its blocks' contents are gone) and each of its hashes is published as
``BlockRemoved(device)``, so a router's index, fed by the engine's own events, keeps the host
entries and equals one loaded from a snapshot after the wake; the woken engine loads the prefix
back from the host tier (the greedy tokens of an engine that never evicted it). Nothing stale
survives: a prefix that was only on the device is recomputed after the wake, and
``reset_prefix_cache`` still clears both media."""

from __future__ import annotations

import pytest
from engine_testlib import make_tiny_llm
from test_host_tier import BS, DEVICE_BLOCKS, GREEDY, PREFIX, serve

from engine.llm import LLM
from protocol.hashing import prompt_hashes
from protocol.kv_events import AllBlocksCleared, BlockRemoved, Medium
from router.kv_events import EventCursor
from router.kv_index import KVIndex

W = "w"


@pytest.fixture(scope="module")
def prompts() -> dict[str, list]:
    from engine_testlib import random_prompts

    prefix = random_prompts([PREFIX], seed=21)[0]
    a, b, c = random_prompts([9, 9, 12], seed=22)
    return {"a": prefix + a, "fill": random_prompts([100, 100, 100], seed=23), "b": prefix + b, "c": prefix + c}


@pytest.fixture(scope="module")
def reference(tiny_llama_path: str, prompts: dict[str, list]) -> list[list[int]]:
    """B's and C's tokens from an engine whose device cache never evicted the prefix."""
    tokens, cached = serve(make_tiny_llm(tiny_llama_path, num_blocks=64, max_model_len=256), prompts)
    assert cached[-2:] == [PREFIX, PREFIX]
    return tokens[-2:]


def follow(llm: LLM) -> EventCursor:
    """A router's index of the engine, from a snapshot now; :func:`sync` applies its events."""
    cursor = EventCursor(KVIndex(BS), W)
    hashes, next_id = llm.engine.kv_snapshot()
    cursor.load_snapshot([h for h, _ in hashes], next_id, [h for h, _ in llm.engine.kv_host_snapshot()])
    return cursor


def sync(cursor: EventCursor, llm: LLM) -> list:
    events = llm.engine.take_kv_events()
    assert cursor.apply(events)
    return events


def snapshot_index(llm: LLM) -> KVIndex:
    return follow(llm).index


def media(index: KVIndex) -> tuple[frozenset[int], frozenset[int]]:
    return index.blocks_of(W), index.blocks_of(W, Medium.HOST)


def b_and_c(llm: LLM, prompts: dict[str, list]) -> tuple[list[list[int]], list[int]]:
    results = llm.generate([prompts["b"], prompts["c"]], GREEDY)
    return [r.outputs[0].token_ids for r in results], [r.num_cached_tokens for r in results]


def test_a_woken_engine_loads_the_prefix_back_from_the_host_tier(tiny_llama_path: str, prompts: dict[str, list],
                                                                 reference: list[list[int]]) -> None:
    llm = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=32)
    engine, bm = llm.engine, llm.engine.block_manager
    cursor = follow(llm)
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]]]:
        llm.generate(batch, GREEDY)  # the prefix is now only in the host tier
    sync(cursor, llm)
    device, host = media(cursor.index)
    assert device and len(host) == bm.num_host_cached_blocks > PREFIX // BS

    engine.park()
    events = sync(cursor, llm)
    assert events and all(isinstance(e, BlockRemoved) and e.medium is Medium.DEVICE for e in events)
    assert {e.block_hash for e in events} == device  # each device block, nothing of the host tier
    assert media(cursor.index) == (frozenset(), host)
    hashes = prompt_hashes(prompts["b"], BS)[:PREFIX // BS]
    found = cursor.index.overlaps(hashes)[W]
    assert (found, found.num_host) == (PREFIX // BS, PREFIX // BS)  # a router sends B here, to the host tier

    engine.unpark()
    assert media(snapshot_index(llm)) == media(cursor.index)  # the woken worker's snapshot: the same
    tokens, cached = b_and_c(llm, prompts)
    assert cached == [PREFIX, PREFIX] and bm.host_stats.num_loaded == PREFIX // BS
    assert tokens == reference
    sync(cursor, llm)
    assert media(cursor.index) == media(snapshot_index(llm))


def test_a_prefix_only_on_the_device_is_recomputed_after_the_wake(tiny_llama_path: str, prompts: dict[str, list],
                                                                   reference: list[list[int]]) -> None:
    """The device cache's hashes go with its contents (the host tier is on, and empty)."""
    llm = make_tiny_llm(tiny_llama_path, num_blocks=64, max_model_len=256, host_num_blocks=32)
    cursor = follow(llm)
    llm.generate([prompts["a"]], GREEDY)
    sync(cursor, llm)
    assert media(cursor.index)[0] and llm.engine.block_manager.num_host_cached_blocks == 0
    llm.engine.park()
    assert [type(e) for e in sync(cursor, llm)] == [AllBlocksCleared]
    llm.engine.unpark()
    tokens, cached = b_and_c(llm, prompts)
    assert cached == [0, PREFIX] and tokens == reference  # B computes the prefix again, C takes B's


def test_reset_prefix_cache_clears_the_host_tier_too(tiny_llama_path: str, prompts: dict[str, list],
                                                     reference: list[list[int]]) -> None:
    llm = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=32)
    cursor = follow(llm)
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]]]:
        llm.generate(batch, GREEDY)
    llm.engine.reset_prefix_cache()
    assert isinstance(sync(cursor, llm)[-1], AllBlocksCleared)
    assert media(cursor.index) == (frozenset(), frozenset()) == media(snapshot_index(llm))
    tokens, cached = b_and_c(llm, prompts)
    assert cached == [0, PREFIX] and tokens == reference
