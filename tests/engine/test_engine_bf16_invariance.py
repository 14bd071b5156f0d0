"""bfloat16 on the CPU kernels: a greedy request gives the same tokens and the same logprobs,
bit for bit, whatever the thread count, the prefill chunking, the prefix cache, and whether its
prompt was prefilled by the engine that decodes it or by another one (disaggregated: KV pulled
over the loopback transport), as aggregated and disaggregated serving need."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from engine import cpu_kernels
from engine.attention.cpu_backend import CpuAttention
from engine.llm import LLM, GenerateResult
from kv_transfer import make_transport
from protocol.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels.turned_off(), reason="TANDEM_CPU_KERNELS=0 turns the kernels off")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
TEXT = ("The history of the city begins with a small settlement on the river, where traders from the north and "
        "the south met to exchange salt, grain and cloth. Over the centuries the market grew into a town. ")


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engines(smollm_path: Path) -> tuple[LLM, LLM]:
    """SmolLM2 in bfloat16 twice: one prefilling in one step (2048-token budget), one in 64-token
    chunks."""
    whole = LLM(str(smollm_path), dtype="bfloat16", num_blocks=256, progress=False)
    chunked = LLM(str(smollm_path), dtype="bfloat16", num_blocks=256, max_num_batched_tokens=64, progress=False)
    for llm in (whole, chunked):  # the path under test really runs
        assert isinstance(llm.engine.runner.attn, CpuAttention)
        assert llm.engine.runner.model.lm_head_cpu is not None
    return whole, chunked


@pytest.fixture(scope="module")
def prompts(engines: tuple[LLM, LLM]) -> list[list[int]]:
    tok = engines[0].tokenizer
    assert tok is not None
    ids = tok.encode(TEXT * 12)
    return [ids[:600], ids[7:40], ids[100:101 + 16 * 5]]  # long, short, an exact number of blocks


def key(results: list[GenerateResult]) -> list[tuple[list[int], list[float], list[dict[int, float]]]]:
    return [(r.outputs[0].token_ids, [lp.logprob for lp in r.outputs[0].logprobs],
             [lp.top for lp in r.outputs[0].logprobs]) for r in results]


def generate(llm: LLM, prompts: list[list[int]]) -> list[GenerateResult]:
    llm.engine.block_manager.reset_prefix_cache()
    return llm.generate(prompts, GREEDY)


def test_same_bits_for_any_threads_chunking_or_cache(engines: tuple[LLM, LLM], prompts: list[list[int]]) -> None:
    whole, chunked = engines
    with threads(2):
        ref = key(generate(whole, prompts))
    with threads(1):
        assert key(generate(whole, prompts)) == ref
        assert key(generate(chunked, prompts)) == ref
    with threads(2):
        # One prompt alone, then all of them: the later ones find its blocks cached (prefilled on top).
        chunked.engine.block_manager.reset_prefix_cache()
        chunked.generate([prompts[0][:300]], GREEDY)
        results = chunked.generate(prompts, GREEDY)
        assert results[0].num_cached_tokens >= 288
        assert key(results) == ref


def test_disaggregated_prefill_and_decode_equal_one_engine(engines: tuple[LLM, LLM], prompts: list[list[int]]) -> None:
    """Prefill-only on the chunked engine with one thread, the KV pulled over the loopback
    transport into the other engine, which decodes with two threads: the one-engine result."""
    whole, chunked = engines
    with threads(2):
        ref = key(generate(whole, prompts))
    p, d = chunked.engine, whole.engine
    p.block_manager.reset_prefix_cache()
    d.block_manager.reset_prefix_cache()
    first: dict[str, tuple[int, float, dict[int, float]]] = {}
    with threads(1):
        for i, prompt in enumerate(prompts):
            p.add_request(f"r{i}", prompt, GREEDY, prefill_only=True)
        while p.has_unfinished():
            for out in p.step():
                lp = out.new_logprobs[0]
                first[out.request_id] = (out.new_token_ids[0], lp.logprob, lp.top)
    decoded: dict[str, tuple[list[int], list[float], list[dict[int, float]]]] = {}
    with make_transport("loopback") as owner, make_transport("loopback") as puller, threads(2):
        owner.register(p.runner.kv)
        puller.register(d.runner.kv)
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            token, logprob, top = first[rid]
            indices = d.add_prefilled(rid, prompt, token, GREEDY)
            assert indices is not None
            src, dst = p.block_manager.block_table(rid), d.block_manager.block_table(rid)
            result = puller.pull(owner.metadata(), [src[k] for k in indices], [dst[k] for k in indices])
            assert result.num_blocks == len(indices) > 0
            d.kv_ready(rid, True)
            assert p.unpin(rid)
            decoded[rid] = ([token], [logprob], [top])
        while d.has_unfinished():
            for out in d.step():
                tokens, logprobs, tops = decoded[out.request_id]
                tokens += out.new_token_ids
                logprobs += [lp.logprob for lp in out.new_logprobs]
                tops += [lp.top for lp in out.new_logprobs]
    assert [decoded[f"r{i}"] for i in range(len(prompts))] == ref
    assert p.block_manager.num_free_blocks == p.block_manager.num_blocks
