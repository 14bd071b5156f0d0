"""The asynchronous engine step on the GPU (CUDA graphs, Triton attention, in-flight decodes
reading their input ids from the previous step's sampled tokens on the device) against the
synchronous one: the same tokens, logprobs within float32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from engine.llm import LLM  # noqa: E402
from protocol.outputs import FinishReason  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=500000.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    path = tmp_path_factory.mktemp("llama-async")
    model.save_pretrained(path)
    return path


def _prompts(n: int, seed: int, low: int = 5, high: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, 1000, (k,), generator=g).tolist() for k in lens]


def _engines(model_dir: Path, **kwargs) -> tuple[LLM, LLM]:
    sync = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, async_scheduling=False, **kwargs)
    fast = LLM(str(model_dir), device="cuda", dtype="float32", progress=False, **kwargs)
    assert fast.engine.async_scheduling and not sync.engine.async_scheduling  # on by default on CUDA
    return sync, fast


def _run(llm: LLM, prompts: list[list[int]], params) -> list:
    out = llm.generate(prompts, params)
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    return [c for r in out for c in r.outputs]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
        assert [lp.token_id for lp in x.logprobs] == [lp.token_id for lp in y.logprobs]
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert abs(lx.logprob - ly.logprob) < 1e-4, (lx, ly)


@pytest.mark.parametrize("batch", [1, 6, 40])
def test_async_equals_sync_greedy_and_stops(model_dir: Path, batch: int) -> None:
    prompts = _prompts(batch, seed=10 + batch)
    sync, fast = _engines(model_dir, max_num_seqs=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    ref = _run(sync, prompts, greedy)
    _same(_run(fast, prompts, greedy), ref)
    # Stop tokens met early: the next step is already launched for those sequences.
    stops = [SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[c.token_ids[3 + i % 5]], logprobs=0)
             for i, c in enumerate(ref)]
    got = _run(fast, prompts, stops)
    _same(got, _run(sync, prompts, stops))
    assert all(c.finish_reason is FinishReason.STOP for c in got)


def test_async_equals_sync_sampling(model_dir: Path) -> None:
    prompts = _prompts(12, seed=3)
    kinds = [SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=24, ignore_eos=True, logprobs=1),
             SamplingParams(temperature=1.0, top_k=50, seed=2, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.2, frequency_penalty=0.3,
                            ignore_eos=True),
             SamplingParams(n=3, temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    sync, fast = _engines(model_dir)
    _same(_run(fast, prompts, params), _run(sync, prompts, params))


def test_async_equals_sync_preemption_and_chunks(model_dir: Path) -> None:
    prompts = _prompts(10, seed=6, low=40, high=120)
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    sync, fast = _engines(model_dir, num_blocks=40, block_size=16, max_num_batched_tokens=96)
    ref = _run(sync, prompts, greedy)
    _same(_run(fast, prompts, greedy), ref)
    assert fast.engine.scheduler.stats.num_preemptions > 0
    _same(_run(fast, prompts, greedy), ref)  # prefix-cache hits


def test_async_disaggregated_decode(model_dir: Path) -> None:
    """Prefill-only on one async engine, KV copied block by block into another (add_prefilled,
    kv_ready), decode there: the aggregated tokens."""
    prompts = _prompts(8, seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    sync, _ = _engines(model_dir)
    expected = [c.token_ids for c in _run(sync, prompts, greedy)]
    del sync
    p = LLM(str(model_dir), device="cuda", dtype="float32", progress=False).engine
    d = LLM(str(model_dir), device="cuda", dtype="float32", progress=False).engine
    first = {}
    for i, prompt in enumerate(prompts):
        p.add_request(f"r{i}", prompt, greedy, prefill_only=True)
    while p.has_unfinished():
        for out in p.step():
            first[out.request_id] = out.new_token_ids[0]
    decoded: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        indices = d.add_prefilled(rid, prompt, first[rid], greedy)
        if (waiter := d.launched_step_waiter()) is not None:  # a step still running may write into a freed block
            waiter()
        src, dst = p.block_manager.block_table(rid), d.block_manager.block_table(rid)
        for k in indices:
            d.runner.kv[dst[k]] = p.runner.kv[src[k]]
        d.kv_ready(rid, True)
        p.unpin(rid)
        decoded[rid] = [first[rid]]
        for out in d.step():
            decoded[out.request_id] += out.new_token_ids
    while d.has_unfinished():
        for out in d.step():
            decoded[out.request_id] += out.new_token_ids
    assert [decoded[f"r{i}"] for i in range(len(prompts))] == expected
