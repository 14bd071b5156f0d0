"""End to end on a tiny random Llama: the same greedy tokens with prefix caching on and off,
chunked prefill on and off, and under preemption; prefix-cache hits counted exactly; n > 1
sharing the prompt's blocks."""

from __future__ import annotations

import pytest
from engine_testlib import make_tiny_llm, random_prompts

from engine.llm import LLM
from protocol.outputs import FinishReason
from protocol.sampling import SamplingParams

LENGTHS = [5, 33, 48, 70]
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    results = llm.generate(prompts, params)
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks  # everything freed (cached blocks are evictable)
    outputs = []
    for r in results:
        for c in r.outputs:
            assert c.finish_reason is FinishReason.LENGTH
            assert len(c.token_ids) == params.max_tokens
        outputs.append(r.outputs[0].token_ids)
    return outputs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=7)


@pytest.fixture(scope="module")
def reference(tiny_llama_path: str, prompts: list[list[int]]) -> list[list[int]]:
    """Prefix caching on, chunked prefill on with a budget large enough that nothing is chunked."""
    llm = make_tiny_llm(tiny_llama_path)
    out = run(llm, prompts)
    assert llm.engine.scheduler.stats.num_preemptions == 0
    assert len({tuple(o) for o in out}) == len(out)
    return out


def test_prefix_caching_off_same_output(tiny_llama_path: str, prompts: list[list[int]],
                                        reference: list[list[int]]) -> None:
    llm = make_tiny_llm(tiny_llama_path, enable_prefix_caching=False)
    assert run(llm, prompts) == reference
    # and again: nothing was cached, nothing is hit
    assert run(llm, prompts) == reference
    assert llm.engine.scheduler.stats.num_cached_tokens == 0
    assert llm.engine.block_manager.num_cached_blocks == 0
    assert llm.engine.take_kv_events() == []


def test_prefix_cache_hits_same_output(tiny_llama_path: str, prompts: list[list[int]],
                                       reference: list[list[int]]) -> None:
    llm = make_tiny_llm(tiny_llama_path)
    assert run(llm, prompts) == reference
    # The second run finds every prompt's full blocks cached (but always recomputes >= 1 token).
    results = llm.generate(prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in results] == reference
    assert [r.num_cached_tokens for r in results] == [0, 32, 32, 64]


def test_chunked_prefill_same_output(tiny_llama_path: str, prompts: list[list[int]],
                                     reference: list[list[int]]) -> None:
    unchunked = make_tiny_llm(tiny_llama_path, enable_chunked_prefill=False)
    assert run(unchunked, prompts) == reference
    chunked = make_tiny_llm(tiny_llama_path, max_num_batched_tokens=32)
    assert run(chunked, prompts) == reference
    # 156 prompt tokens at <= 32 per step (decodes included) take more steps than one prefill.
    assert chunked.engine.num_steps >= unchunked.engine.num_steps + 4


def test_unchunked_small_budget(tiny_llama_path: str, prompts: list[list[int]],
                                reference: list[list[int]]) -> None:
    """Without chunking, one step's budget bounds the context (a prompt, or a preempted
    sequence's recompute, must fit in one step): longer prompts are refused at once, and the
    others run to the end, through preemptions."""
    llm = make_tiny_llm(tiny_llama_path, max_num_batched_tokens=69, enable_chunked_prefill=False,
                        num_blocks=5)
    assert llm.engine.max_model_len == 69
    with pytest.raises(ValueError, match="70 tokens"):
        llm.generate([prompts[3]], GREEDY)
    assert run(llm, prompts[:3]) == reference[:3]
    assert llm.engine.scheduler.stats.num_preemptions > 0


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("budget", [2048, 32])
def test_preemption_same_output(tiny_llama_path: str, prompts: list[list[int]], reference: list[list[int]],
                                prefix_caching: bool, budget: int) -> None:
    # The four sequences need 2 + 4 + 5 + 6 = 17 blocks of 16 at their end; 8 cannot hold them.
    llm = make_tiny_llm(tiny_llama_path, num_blocks=8, enable_prefix_caching=prefix_caching,
                        max_num_batched_tokens=budget)
    assert run(llm, prompts) == reference
    assert llm.engine.scheduler.stats.num_preemptions > 0


def test_prefix_cache_hit_counts(tiny_llama_path: str) -> None:
    shared, tail_a, tail_b, other = random_prompts([48, 10, 7, 30], seed=11)
    a, b = shared + tail_a, shared + tail_b
    llm = make_tiny_llm(tiny_llama_path, block_size=16)
    stats = llm.engine.scheduler.stats
    bm = llm.engine.block_manager

    (ra,) = llm.generate([a], GREEDY)
    assert ra.num_cached_tokens == 0
    assert (stats.num_prompt_tokens, stats.num_cached_tokens) == (58, 0)
    # a's 3 full prompt blocks and the full block its output completed (tokens 48..63)
    assert bm.num_cached_blocks == 4

    (rb,) = llm.generate([b], GREEDY)
    assert rb.num_cached_tokens == 48
    assert (stats.num_prompt_tokens, stats.num_cached_tokens) == (58 + 55, 48)

    (rc,) = llm.generate([other], GREEDY)
    assert rc.num_cached_tokens == 0
    assert (stats.num_prompt_tokens, stats.num_cached_tokens) == (58 + 55 + 30, 48)

    # A prompt of exactly 4 cached blocks still computes its last block (its logits are needed).
    full = a + ra.outputs[0].token_ids[:6]
    assert len(full) == 64
    (rd,) = llm.generate([full], GREEDY)
    assert rd.num_cached_tokens == 48

    # Run in one batch, b cannot hit a's blocks: they are committed only after the step.
    fresh = make_tiny_llm(tiny_llama_path, block_size=16)
    ra2, rb2 = fresh.generate([a, b], GREEDY)
    assert (ra2.num_cached_tokens, rb2.num_cached_tokens) == (0, 0)
    assert fresh.engine.scheduler.stats.num_cached_tokens == 0
    # Cached or not, the tokens are the same.
    assert ra2.outputs[0].token_ids == ra.outputs[0].token_ids
    assert rb2.outputs[0].token_ids == rb.outputs[0].token_ids


@pytest.mark.parametrize("prompt_len", [40, 32])
def test_n_greedy_shares_prompt_blocks(tiny_llama_path: str, prompt_len: int) -> None:
    (prompt,) = random_prompts([prompt_len], seed=3)
    llm = make_tiny_llm(tiny_llama_path, block_size=16)
    (single,) = run(llm, [prompt])

    engine = make_tiny_llm(tiny_llama_path, block_size=16).engine
    bm = engine.block_manager
    engine.add_request("r", prompt, SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True))
    outputs: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in engine.step():  # the prompt's prefill: all three sample from its last row
        outputs[out.index] += out.new_token_ids
    tables = [bm.block_table(rid) for rid in ("r#0", "r#1", "r#2")]
    num_full = prompt_len // 16
    shared = tables[0][:num_full]
    for table in tables[1:]:
        assert table[:num_full] == shared
    for block_id in shared:
        assert bm.ref_counts[block_id] == 3
    if prompt_len % 16:  # the partial last block is copied, one private copy per child
        tails = [t[num_full] for t in tables]
        assert len(set(tails)) == 3
        assert all(bm.ref_counts[b] == 1 for b in tails)
        assert bm.num_used_blocks == num_full + 3
    else:
        assert all(len(t) == num_full for t in tables)
        assert bm.num_used_blocks == num_full
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.index] += out.new_token_ids
    assert outputs == {0: single, 1: single, 2: single}
    assert bm.num_free_blocks == bm.num_blocks


def test_n_greedy_parent_finishes_on_first_token(tiny_llama_path: str) -> None:
    """max_tokens=1: the parent finishes (and frees its blocks) on the token its children fork on."""
    (prompt,) = random_prompts([40], seed=3)
    llm = make_tiny_llm(tiny_llama_path)
    (one,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    (many,) = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=1))
    assert [c.token_ids for c in many.outputs] == [one.outputs[0].token_ids] * 3
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
