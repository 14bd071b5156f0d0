"""Greedy tokens equal to HF transformers' (float32), logprobs close, on batches of prompts of
different lengths: tiny random Llama / Llama-3.1 (llama3 rope scaling, sharded safetensors) /
Qwen2 / Qwen3 models, and the SmolLM2 GGUF read by transformers' own GGUF loader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_testlib import TINY_CONFIGS, TinyModel, hf_greedy, make_tiny_llm, random_prompts

from engine.llm import LLM, GenerateResult
from protocol.sampling import SamplingParams

LENGTHS = [3, 17, 40, 100]
ATOL = 1e-4
NUM_TOP = 3


def assert_matches_hf(model: torch.nn.Module, prompts: list[list[int]], results: list[GenerateResult],
                      max_new_tokens: int) -> None:
    for prompt, result in zip(prompts, results):
        completion = result.outputs[0]
        assert result.prompt_token_ids == prompt
        ref_tokens, ref_rows = hf_greedy(model, prompt, max_new_tokens)
        assert completion.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens"
        assert len(completion.logprobs) == max_new_tokens
        for step, (lp, row) in enumerate(zip(completion.logprobs, ref_rows)):
            assert lp.token_id == ref_tokens[step]
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=ATOL)
            assert len(lp.top) == NUM_TOP
            # The top alternatives: the same values (order-robust to near ties) at the same ids.
            ref_top = row.topk(NUM_TOP).values.tolist()
            assert sorted(lp.top.values(), reverse=True) == pytest.approx(ref_top, abs=ATOL)
            for token_id, value in lp.top.items():
                assert value == pytest.approx(float(row[token_id]), abs=ATOL)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("budget", [2048, 48], ids=["one-step-prefill", "chunked-mixed"])
def test_tiny_model_greedy_matches_hf(tiny_model: Callable[[str], TinyModel], name: str, budget: int) -> None:
    tiny = tiny_model(name)
    if "max_shard_size" in TINY_CONFIGS[name][2]:
        assert len(list(tiny.path.glob("*.safetensors"))) > 1  # really sharded
        assert (tiny.path / "model.safetensors.index.json").exists()
    # A budget of 48 chunks the long prompts and mixes their chunks with other decodes.
    llm = make_tiny_llm(str(tiny.path), max_num_batched_tokens=budget)
    prompts = random_prompts(LENGTHS, seed=len(name))
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=NUM_TOP)
    results = llm.generate(prompts, params)
    assert_matches_hf(tiny.hf_model, prompts, results, 20)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def hf_smollm(smollm_path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def test_smollm_gguf_greedy_matches_hf(smollm: LLM, hf_smollm: torch.nn.Module) -> None:
    tok = smollm.tokenizer
    assert tok is not None
    text = ("The history of the city begins with a small settlement on the river, where traders from the "
            "north and the south met to exchange salt, grain and cloth. Over the centuries the market grew "
            "into a town, and the town into a city with walls, churches and a university. ")
    ids = tok.encode(text * 3)
    # Different windows of the text: sequences must not read each other's KV.
    prompts = [ids[start:start + n] for start, n in zip([0, 11, 29, 53], LENGTHS)]
    assert [len(p) for p in prompts] == LENGTHS
    smollm.engine.block_manager.reset_prefix_cache()  # results must not depend on earlier tests
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=NUM_TOP)
    results = smollm.generate(prompts, params)
    assert_matches_hf(hf_smollm, prompts, results, 16)
