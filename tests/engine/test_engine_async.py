"""Asynchronous scheduling (step N+1 planned and launched before step N's tokens are read) gives
the synchronous engine's outputs token for token: greedy and seeded sampling, logprobs, penalties
(which fall back to a synchronous step), stop tokens and strings, n > 1, chunked prefill,
preemption, prefix caching, abort mid-flight, prefill-only requests and disaggregated decode.
On the CPU the same code runs, without the overlap."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_testlib import make_tiny_llm, random_prompts

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from protocol.outputs import FinishReason, RequestOutput
from protocol.sampling import SamplingParams

LENGTHS = [5, 33, 48, 70, 17]


def both(path: str, **kwargs) -> tuple[LLM, LLM]:
    """The same engine, synchronous and asynchronous."""
    return (make_tiny_llm(path, async_scheduling=False, **kwargs),
            make_tiny_llm(path, async_scheduling=True, **kwargs))


class Close(float):
    """A logprob: equal to another within float32 rounding (a different batch layout, e.g. a
    preemption or a chunk boundary a step apart, reorders sums)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(self - other) < 1e-4

    __hash__ = float.__hash__


def results(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list:
    out = llm.generate(prompts, params)
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text,
              [(lp.token_id, Close(lp.logprob), {k: Close(v) for k, v in lp.top.items()}) for lp in c.logprobs])
             for c in r.outputs] for r in out]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=21)


def test_config_default_and_switch(tiny_llama_path: str) -> None:
    assert not make_tiny_llm(tiny_llama_path).engine.async_scheduling  # CPU: off unless asked
    assert make_tiny_llm(tiny_llama_path, async_scheduling=True).engine.async_scheduling
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM("dummy:smollm2-135m", backend="sim", async_scheduling=True, progress=False)


def test_greedy_and_stop_tokens(tiny_llama_path: str, prompts: list[list[int]]) -> None:
    sync, fast = both(tiny_llama_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    ref = results(sync, prompts, greedy)
    assert results(fast, prompts, greedy) == ref
    # Stop on a token each sequence meets a few tokens in: async has already launched the next
    # step for it, whose row must be dropped.
    stops = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[r[0][0][4]], logprobs=0)
             for r in ref]
    got = results(fast, prompts, stops)
    assert got == results(sync, prompts, stops)
    assert all(r[0][1] is FinishReason.STOP and len(r[0][0]) <= 5 for r in got)
    assert fast.engine.num_steps > 0


def test_seeded_sampling_penalties_and_n(tiny_llama_path: str, prompts: list[list[int]]) -> None:
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5,
                       ignore_eos=True),  # penalties: a synchronous step while it runs
        SamplingParams(n=3, temperature=0.7, seed=3, max_tokens=10, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.9, min_p=0.1, seed=4, max_tokens=18, min_tokens=6),
    ]
    sync, fast = both(tiny_llama_path)
    assert results(fast, prompts, params) == results(sync, prompts, params)


@pytest.mark.parametrize(("budget", "num_blocks", "caching"), [(32, 64, True), (2048, 8, True), (32, 9, False)])
def test_chunked_prefill_preemption_prefix_cache(tiny_llama_path: str, prompts: list[list[int]], budget: int,
                                                 num_blocks: int, caching: bool) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=25, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.6, seed=6, max_tokens=22, ignore_eos=True)]
    sync, fast = both(tiny_llama_path, max_num_batched_tokens=budget, num_blocks=num_blocks,
                      enable_prefix_caching=caching)
    assert results(fast, prompts, params) == results(sync, prompts, params)
    # Again: prefix-cache hits where caching is on (logprobs may move by rounding from the first run).
    assert results(fast, prompts, params) == results(sync, prompts, params)
    assert fast.engine.scheduler.stats.num_cached_tokens == sync.engine.scheduler.stats.num_cached_tokens
    if num_blocks < 16:
        assert fast.engine.scheduler.stats.num_preemptions > 0


def test_context_limit(tiny_llama_path: str) -> None:
    """A request that reaches the context length is not planned past it."""
    (prompt,) = random_prompts([200], seed=3)
    sync, fast = both(tiny_llama_path, max_model_len=230)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    got = results(fast, [prompt], params)
    assert got == results(sync, [prompt], params)
    assert len(got[0][0][0]) == 30 and got[0][0][1] is FinishReason.LENGTH


def drive(engine: LLMEngine, abort_at: dict[int, str]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    k = 0
    while engine.has_unfinished():
        if k in abort_at:
            engine.abort(abort_at[k])
        out: RequestOutput
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        k += 1
    engine.step()  # a step launched for finished requests only: its result is dropped
    assert not engine.has_work()
    return tokens


def test_abort_mid_flight(tiny_llama_path: str, prompts: list[list[int]]) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    got = {}
    for mode in (False, True):
        engine = make_tiny_llm(tiny_llama_path, async_scheduling=mode).engine
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, greedy)
        got[mode] = drive(engine, {3: "r1", 6: "r3"})
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    for rid in ("r0", "r2", "r4"):
        assert got[True][rid] == got[False][rid] and len(got[True][rid]) == 20
    for rid in ("r1", "r3"):  # cut short, a step's worth apart at most; what came is right
        assert got[True][rid] == got[False][rid][:len(got[True][rid])]


def test_prefill_only_and_disaggregated_decode(tiny_llama_path: str, prompts: list[list[int]]) -> None:
    """Prefill-only on one engine (blocks pinned), its KV copied into another engine's blocks
    (add_prefilled, kv_ready), decoding there: the aggregated greedy tokens, both engines async."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [r[0][0] for r in results(make_tiny_llm(tiny_llama_path, async_scheduling=False), prompts, greedy)]
    p = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    d = make_tiny_llm(tiny_llama_path, async_scheduling=True).engine
    first: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        p.add_request(f"r{i}", prompt, greedy, prefill_only=True)
    while p.has_unfinished():
        for out in p.step():
            assert out.finished and out.finish_reason is None
            first[out.request_id] = out.new_token_ids[0]
    assert set(p.scheduler.pinned) == set(first)
    decoded: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        indices = d.add_prefilled(rid, prompt, first[rid], greedy)
        waiter = d.launched_step_waiter()  # a step still running may write into a block it freed
        if waiter is not None:
            waiter()
        assert indices is not None
        src, dst = p.block_manager.block_table(rid), d.block_manager.block_table(rid)
        for k in indices:
            d.runner.kv[dst[k]] = p.runner.kv[src[k]]
        d.kv_ready(rid, True)
        assert p.unpin(rid)
        decoded[rid] = [first[rid]]
        if i % 2:  # some decode while others join
            for out in d.step():
                decoded[out.request_id] += out.new_token_ids
    while d.has_unfinished():
        for out in d.step():
            decoded[out.request_id] += out.new_token_ids
    assert [decoded[f"r{i}"] for i in range(len(prompts))] == expected
    assert p.block_manager.num_free_blocks == p.block_manager.num_blocks
    assert d.block_manager.num_free_blocks == d.block_manager.num_blocks


def test_stop_strings(smollm_path: Path, smollm: LLM) -> None:
    prompts = ["The three primary colors are", "Once upon a time", "def fibonacci(n):"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = smollm.generate(prompts, greedy)
    # Stop strings met at different tokens; one request never meets its own.
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[b.outputs[0].text[12:15]])
              for b in base[:2]] + [SamplingParams(temperature=0.0, max_tokens=24, stop=["never there"])]
    ref = results(smollm, prompts, params)
    fast = LLM(str(smollm_path), dtype="float32", num_blocks=128, progress=False, async_scheduling=True)
    assert results(fast, prompts, params) == ref
    assert [r[0][1] for r in ref][:2] == [FinishReason.STOP] * 2


def test_n_children_out_of_blocks(tiny_llama_path: str) -> None:
    """n > 1 children that find no block for their private tail prefill by themselves, keeping the
    first token they sampled from the parent's row (seeded: the same tokens either way)."""
    prompts = random_prompts([40, 20, 33, 50], seed=1)
    params = [SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.5, seed=3, max_tokens=18, ignore_eos=True)]
    sync, fast = both(tiny_llama_path, num_blocks=6)
    assert results(fast, prompts, params) == results(sync, prompts, params)
    assert fast.engine.scheduler.stats.num_preemptions > 0


def test_a_transfer_waits_for_the_launched_step_only_when_it_touches_the_blocks(tiny_llama_path: str) -> None:
    """``launched_step_waiter(blocks)``: no wait for blocks the launched step does not touch; the
    launched step's wait for a block it uses, among them one freed (aborted) while it runs and
    handed at once to a prefilled request (a cache of 4 blocks: the free queue wraps)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = make_tiny_llm(tiny_llama_path, async_scheduling=True, num_blocks=4,
                           enable_prefix_caching=False).engine
    assert engine.launched_step_waiter([0]) is None  # nothing launched
    engine.add_request("r0", list(range(3, 20)), greedy)  # 17 tokens: 2 blocks
    engine.step()
    running = engine.block_table("r0")
    assert engine.has_work() and len(running) == 2
    idle = [b for b in range(4) if b not in running]
    assert engine.launched_step_waiter(idle) is None
    assert engine.launched_step_waiter(running[1:]) is not None
    assert engine.launched_step_waiter() is not None  # no blocks named: always the step's wait
    engine.abort("r0")  # its step is still launched: the blocks it freed may still be written
    indices = engine.add_prefilled("r1", list(range(3, 60)), 5, greedy)  # 57 tokens: all 4 blocks
    assert indices == [0, 1, 2, 3]
    table = engine.block_table("r1")
    assert set(running) <= set(table)
    assert engine.launched_step_waiter([table[i] for i in indices]) is not None
    assert engine.launched_step_waiter([b for b in table if b not in running]) is None
