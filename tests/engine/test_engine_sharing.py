"""A real engine (tiny Llama, float32, CPU) where requests share: a prompt handed off while every
seat of the decode engine is taken is pulled, not recomputed; prompts that share a prefix not
cached yet, submitted together, compute it once. Counted by the prompt tokens the engine computed
(``LLMEngine.step_totals[1]``); greedy tokens as one engine alone gives them."""

from __future__ import annotations

from engine_testlib import random_prompts

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from protocol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def engine(path: str, max_num_seqs: int = 256) -> LLMEngine:
    return LLM(path, dtype="float32", num_blocks=96, num_threads=1, max_num_seqs=max_num_seqs,
               progress=False).engine


def run(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def test_a_handoff_at_the_seat_limit_is_pulled_not_recomputed(tiny_llama_path: str) -> None:
    prompts = {f"r{i}": p for i, p in enumerate(random_prompts([37, 20, 45, 33], seed=8))}
    want = run(engine(tiny_llama_path), prompts)
    prefill, decode = engine(tiny_llama_path), engine(tiny_llama_path, max_num_seqs=2)
    for rid, prompt in prompts.items():
        prefill.add_request(rid, prompt, GREEDY, prefill_only=True)
    got = {rid: [] for rid in prompts}
    while prefill.has_unfinished():
        for out in prefill.step():
            got[out.request_id] += out.new_token_ids
    for rid, prompt in prompts.items():  # r2 and r3 find both seats taken
        indices = decode.add_prefilled(rid, prompt, got[rid][0], GREEDY)
        if indices is not None:  # (None: it is recomputed here)
            src, dst = prefill.block_table(rid), decode.block_table(rid)
            for k in indices:
                decode.runner.kv[dst[k]] = prefill.runner.kv[src[k]]
            decode.kv_ready(rid, True)
        assert prefill.unpin(rid)
        for out in decode.step():
            got[out.request_id] += out.new_token_ids
    while decode.has_unfinished():
        for out in decode.step():
            got[out.request_id] += out.new_token_ids
    assert got == want
    assert decode.step_totals[1] == 0  # no prompt token computed on the decode engine
    assert decode.scheduler.stats.num_kv_waiting == 2
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_same_prefix_prompts_together_compute_the_prefix_once(tiny_llama_path: str) -> None:
    shared, a, b, other = random_prompts([128, 20, 30, 40], seed=9)
    prompts = {"a": shared + a, "b": shared + b, "other": other}
    alone = engine(tiny_llama_path)
    want: dict[str, list[int]] = {}
    for rid, prompt in prompts.items():
        alone.reset_prefix_cache()
        want.update(run(alone, {rid: prompt}))
    together = engine(tiny_llama_path)
    assert run(together, prompts) == want
    assert together.step_totals[1] == 128 + 20 + 30 + 40  # the prefix once
    assert together.scheduler.stats.num_cached_tokens == 128 and together.scheduler.stats.num_prefix_holds == 1
