"""The host tier in the real engine (tiny random Llama, CPU, float32): a shared prefix that other
prompts evicted from a small device cache comes back from the host tier, copied into fresh device
blocks, and the greedy tokens equal those of an engine whose cache never evicted it and of one
without the tier; the prompt's ``num_cached_tokens`` counts the reloaded blocks; the host tier's
own LRU keeps it within its capacity; and a prompt handed off by a prefill engine takes its
cached prefix from the decode engine's host tier."""

from __future__ import annotations

import pytest
from engine_testlib import make_tiny_llm, random_prompts

from engine.llm import LLM
from protocol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BS = 16
PREFIX = 96  # 6 blocks
DEVICE_BLOCKS = 16  # every fill below evicts the prefix from the device


@pytest.fixture(scope="module")
def prompts() -> dict[str, list]:
    prefix = random_prompts([PREFIX], seed=11)[0]
    a, b, c = random_prompts([9, 9, 12], seed=12)
    return {"a": prefix + a, "fill": random_prompts([100, 100, 100], seed=13), "b": prefix + b, "c": prefix + c}


def serve(llm: LLM, prompts: dict[str, list]) -> tuple[list[list[int]], list[int]]:
    """A's prompt, the fills one by one (they evict it), then B and C together (both on A's prefix):
    every greedy answer and every prompt's cached tokens."""
    tokens, cached = [], []
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]], [prompts["b"], prompts["c"]]]:
        for r in llm.generate(batch, GREEDY):
            tokens.append(r.outputs[0].token_ids)
            cached.append(r.num_cached_tokens)
    assert not llm.engine.has_unfinished()
    return tokens, cached


@pytest.fixture(scope="module")
def never_evicted(tiny_llama_path: str, prompts: dict[str, list]) -> list[list[int]]:
    llm = make_tiny_llm(tiny_llama_path, num_blocks=64, max_model_len=256)
    tokens, cached = serve(llm, prompts)
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]  # B and C hit A's prefix on the device
    return tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_evicted_prefix_comes_back_from_the_host_tier(tiny_llama_path: str, prompts: dict[str, list],
                                                      never_evicted: list[list[int]], async_scheduling: bool) -> None:
    without = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256,
                            async_scheduling=async_scheduling)
    tokens, cached = serve(without, prompts)
    assert tokens == never_evicted
    assert cached == [0, 0, 0, 0, 0, PREFIX]  # B recomputes the prefix (C takes it from B)

    llm = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=32,
                        async_scheduling=async_scheduling)
    tier, stats = llm.engine.host_tier, llm.engine.block_manager.host_stats
    assert tier is not None and tier.num_slots == 32
    tokens, cached = serve(llm, prompts)
    assert tokens == never_evicted
    assert cached == [0, 0, 0, 0, PREFIX, PREFIX]  # B loads the prefix back; C shares B's loaded blocks
    assert stats.num_loaded == PREFIX // BS and tier.num_loaded == stats.num_loaded
    assert tier.num_offloaded == stats.num_offloaded > 0 and stats.num_evicted == 0
    assert llm.engine.scheduler.stats.num_cached_tokens == 2 * PREFIX


def test_the_host_tier_keeps_to_its_capacity(tiny_llama_path: str, prompts: dict[str, list],
                                             never_evicted: list[list[int]]) -> None:
    """Four slots: the host tier's LRU keeps the fills' last offloaded blocks, not A's prefix."""
    llm = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=4)
    tokens, cached = serve(llm, prompts)
    assert tokens == never_evicted
    bm = llm.engine.block_manager
    assert cached[4] < PREFIX and bm.host_stats.num_loaded == cached[4] // BS
    assert bm.num_host_cached_blocks == 4
    assert bm.host_stats.num_evicted == bm.host_stats.num_offloaded - 4  # full since the fills


def test_a_handed_off_prompt_takes_its_prefix_from_the_host_tier(tiny_llama_path: str,
                                                                 prompts: dict[str, list]) -> None:
    """Prefill on one engine, decode on another whose host tier holds the prefix: only the blocks
    after it are transferred, and the answer is the prefill engine's own."""
    prefill = make_tiny_llm(tiny_llama_path, num_blocks=64, max_model_len=256)
    decode = make_tiny_llm(tiny_llama_path, num_blocks=DEVICE_BLOCKS, max_model_len=256, host_num_blocks=32)
    for batch in [[prompts["a"]], *[[f] for f in prompts["fill"]]]:
        decode.generate(batch, GREEDY)  # the prefix is now only in decode's host tier
    expected = prefill.generate([prompts["b"]], GREEDY)[0].outputs[0].token_ids
    engine = prefill.engine
    engine.add_request("h", prompts["b"], GREEDY, prefill_only=True)
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            first = out.new_token_ids[0]
    dec = decode.engine
    indices = dec.add_prefilled("h", prompts["b"], first, GREEDY)
    assert indices == list(range(PREFIX // BS, -(-len(prompts["b"]) // BS)))  # the prefix is not moved
    assert dec.block_manager.host_stats.num_loaded == PREFIX // BS
    src, dst = engine.block_table("h"), dec.block_table("h")
    for k in indices:
        dec.runner.kv[dst[k]] = engine.runner.kv[src[k]]
    dec.kv_ready("h", True)
    assert engine.unpin("h")
    got = [first]
    while dec.has_unfinished():
        for out in dec.step():
            got += out.new_token_ids
            assert out.num_cached_tokens == PREFIX
    assert got == expected
